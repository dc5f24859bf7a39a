"""Transports: how a client reaches a store. One seam, several implementations.

Everything the client and the pull-through cache need from a server goes
through :class:`~mzstore.transport.base.Transport`: the control plane
(resolve a ref to its manifest, list, tag, remove, topology, push and
resumable uploads) and the data plane (ranged and streamed blob reads).
The workflows above it — the pull pipeline, the resumable push loop, the
cache fills — take a transport (or just its ``read_blob``) and never see
gRPC::

    base.py     the Transport interface and its value types
    grpc.py     GrpcTransport: the mzstore.v1.Store service over one channel
                (TLS, bearer token, keepalive, deadlines); the client's one
                grpc.RpcError → domain error translation point
    wire.py     the hand-written BlobChunk wire format both ends use
    direct.py   DirectTransport: control through another transport, blob
                bytes straight from the storage nodes (pull --direct)

The HTTP data plane (issue 14) is a third implementation of the blob reads.
"""

from mzstore.transport.base import Topology, Transport

__all__ = ["Topology", "Transport"]
