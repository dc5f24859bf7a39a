"""Pull: from a ref to verified tensors on a device or files on disk.

Data flow::

    manifest        GetManifest → canonical JSON, sha256 checked → parse_manifest
    plan.py         (pure) manifest → chunk tasks (what to fetch, where it lands)
    cache.py        local chunk cache: a hit is verified like fetched bytes
    pipeline.py     worker pool under a byte budget: fetch(blob, offset, length) → decode → verify BLAKE3
    direct.py       (--direct) fetch = ranged reads straight from the storage nodes
    sinks.py        DirectorySink (source layout, staged then renamed into place)
                    StateDictSink (tensors) | TensorParallelSink (one rank's slices)
    device.py       DeviceStateDictSink / DeviceMapSink: compact chunks expanded on the device
    device_map.py   (pure) load_into's device_map → a device per tensor
    tp.py           (pure) tensor-parallel split rules

``fetch`` is any callable; the gRPC client passes one that does ranged
``ReadBlob`` calls, ``--direct`` one over the nodes, tests one over a
:class:`~mzstore.storage.Store`.
"""
