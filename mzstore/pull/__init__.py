"""Pull: from a ref to verified tensors on a device or files on disk.

Data flow::

    manifest        GetManifest → canonical JSON, sha256 checked → parse_manifest
    plan.py         (pure) manifest → chunk tasks (what to fetch, where it lands)
    pipeline.py     worker pool: fetch(blob, offset, length) → decode → verify sha256
    sinks.py        DirectorySink (source layout, staged then renamed into place)
                    StateDictSink (tensors, then device placement)

``fetch`` is any callable; the gRPC client passes one that does ranged
``ReadBlob`` calls, tests can pass one over a :class:`~mzstore.storage.Store`.
"""
