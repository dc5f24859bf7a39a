"""Format layer: pure parsing and building of everything mzstore stores.

``safetensors`` (strict header parser and builder), ``dtypes``, ``refs``
(names), ``hashing`` (decoded-chunk hashes), ``manifest`` and ``shard`` (the
stored shard layout). Nothing here imports grpc, fsspec, boto3 or torch.
"""
