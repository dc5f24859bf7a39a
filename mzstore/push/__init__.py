"""Push: from a user's checkpoint to committed shards.

Data flow (client → server)::

    source.py    [client] SOURCE (file, HF dir, .bin/.pt) → files (kind, size, opener)
    upload.py    [client] files → upload events; push_resumable drives an upload session over a transport
    protocol.py  [both]   the upload events, UploadState (the checks every event passes), validate_begin
    ── transport (mzstore.transport): StartUpload / Upload stream(s) / CommitUpload, or one Push stream ──
    sessions.py  [server] resumable uploads: raw bytes kept until the commit replays them
    ingest.py    [server] strict safetensors parse → planner → codec → shard writer
    planner.py   (pure) tensor → row chunks of about 16 MiB
    shards.py    [server] encoded chunks → spooled safetensors shards → blobs
    storage      [server] blobs, then manifest, then ref (mzstore.storage.store.Store.commit)

Client and server modules share this package because they share the
protocol; the server's gRPC glue is :mod:`mzstore.server.service`, and
nothing here imports it.
"""
