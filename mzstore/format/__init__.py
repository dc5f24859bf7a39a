"""Format layer: pure parsing and building of everything mzstore stores.

``safetensors`` (strict header parser and builder), ``dtypes`` (dtypes,
row sizes), ``refs`` (names), ``hashing`` (decoded-chunk hashes) and
``manifest``. The shard layout is written by :mod:`mzstore.push.shards`
with the safetensors builder. Nothing here imports grpc, fsspec, an S3
client or torch (an import contract in ``make lint`` checks it).
"""
