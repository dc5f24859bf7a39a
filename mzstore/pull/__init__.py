"""Pull: from a ref to verified tensors on a device or files on disk.

Data flow (one path for every output, :mod:`mzstore.pull.puller`)::

    manifest        the client resolves the ref; bytes checked against the digest, then parse_manifest
    plan.py         (pure) manifest → chunk tasks (what to fetch, where it lands)
    puller.py       Puller.run: plan → the sink's tasks → pipeline → sink.finish (or sink.abort)
    pipeline.py     worker pool under a byte budget: fetch(blob, offset, length) → decode → verify hash;
                    small adjacent chunks share one range read; transient failures retried
    cache.py        local chunk cache: a hit is verified like fetched bytes
    sinks.py        the Sink interface; DirectorySink (source layout) | StateDictSink | TensorParallelSink
                    | TensorParallelFilesSink
    staging.py      files staged in OUT/.mzstore-partial-<pid>-<id>/, renamed into place when verified
    device.py       DeviceStateDictSink / DeviceMapSink: compact chunks expanded on the device
    load_into.py    the model side of load_into: names, ties, shapes, placement, then assign
    device_map.py   (pure) load_into's device_map → a device per tensor
    tp.py           (pure) tensor-parallel split rules
    compressed_tensors.py  (pure) what a keep-quantized export writes
    keep_quantized.py      KeepQuantizedSink: the compressed-tensors export

``fetch`` is any callable: a transport's ranged blob read
(:mod:`mzstore.transport`: through the gRPC server, or straight from the
storage nodes with ``--direct``), or one over a
:class:`~mzstore.storage.Store` in tests.
"""
