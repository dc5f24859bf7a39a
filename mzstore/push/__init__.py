"""Push: from a user's checkpoint to committed shards.

Data flow (client → server)::

    source.py    SOURCE (file, HF dir, .bin/.pt) → upload plan (files, kinds, sizes)
    upload.py    files → (file, offset, ~1 MiB data) … FileEnd(size, sha256)   [client]
    ── gRPC: StartUpload / Upload stream(s) / CommitUpload (or one Push stream) ──
    sessions.py  resumable uploads: raw bytes kept until the commit replays them [server]
    ingest.py    strict safetensors parse → planner → codec → shard writer      [server]
    planner.py   (pure) tensor → row chunks of about 16 MiB
    shards.py    encoded chunks → spooled safetensors shards → blobs
    storage      blobs, then manifest, then ref (mzstore.storage.store.Store.commit)
"""
