"""Prometheus metrics of a server, served at ``/metrics`` on the HTTP listener.

One registry per process (``REGISTRY``); every metric is named
``mzstore_*``. What is counted, and where:

* ``mzstore_grpc_requests_total{method,code}`` and
  ``mzstore_grpc_in_flight{method}``: every Store call
  (:class:`MetricsInterceptor`);
* ``mzstore_http_requests_total{route,status}``: every HTTP request
  (the HTTP plane's middleware);
* ``mzstore_blob_bytes_served_total{plane}``: blob bytes sent to clients,
  ``plane="grpc"`` (``ReadBlob``) or ``"http"`` (the blob endpoint, the bytes
  of each response body; a redirect to object storage counts nothing);
* ``mzstore_face_file_reads_total{source}``: reads of model files through
  the Hugging Face and S3 faces, ``source="sendfile"`` (a file kept decoded
  on disk) or ``"decode"`` (decoded as it was sent), and
  ``mzstore_decoded_files_bytes``: the bytes of files kept decoded;
* ``mzstore_push_bytes_total{kind}`` (``raw``, ``stored``) and
  ``mzstore_push_seconds``: committed pushes;
* ``mzstore_blobs_repaired_total``, ``mzstore_integrity_failures_total``:
  what reads found broken and fixed, and ``mzstore_pull_through_total{result}``
  (``hit``, ``miss``): blobs a pull-through cache served from its nodes or had
  to fetch upstream — counted by the store itself (``Store.counts``) and read
  at scrape time (:class:`StoreCollector`), so storage imports no metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

GRPC_REQUESTS = Counter(
    "mzstore_grpc_requests_total", "Store calls, by method and status code.", ["method", "code"], registry=REGISTRY
)
GRPC_IN_FLIGHT = Gauge("mzstore_grpc_in_flight", "Store calls running now, by method.", ["method"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "mzstore_http_requests_total", "HTTP requests, by route and status.", ["route", "status"], registry=REGISTRY
)
BLOB_BYTES = Counter(
    "mzstore_blob_bytes_served_total",
    "Blob bytes sent to clients, by plane (hub, s3: decoded file bytes of the Hugging Face and S3 faces).",
    ["plane"],
    registry=REGISTRY,
)
FACE_FILE_READS = Counter(
    "mzstore_face_file_reads_total",
    "Reads of model files through the Hugging Face and S3 faces, by source (sendfile: kept decoded; decode).",
    ["source"],
    registry=REGISTRY,
)
DECODED_FILES_BYTES = Gauge(
    "mzstore_decoded_files_bytes", "Bytes of model files kept decoded on disk for the faces.", registry=REGISTRY
)
PUSH_BYTES = Counter(
    "mzstore_push_bytes_total", "Bytes of committed pushes (raw, stored).", ["kind"], registry=REGISTRY
)
PUSH_SECONDS = Histogram(
    "mzstore_push_seconds",
    "Seconds from a push's first message to its commit.",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200),
    registry=REGISTRY,
)
for _plane in ("grpc", "http", "hub", "s3"):
    BLOB_BYTES.labels(_plane)  # present (as 0) before the first byte
for _source in ("sendfile", "decode"):
    FACE_FILE_READS.labels(_source)
for _kind in ("raw", "stored"):
    PUSH_BYTES.labels(_kind)


class StoreCollector:
    """The store's own counts (``Store.counts``), read at scrape time: storage knows nothing of metrics."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        counts = self.store.counts
        yield CounterMetricFamily(
            "mzstore_blobs_repaired", "Blob copies rewritten from an intact one.", value=counts["repaired"]
        )
        yield CounterMetricFamily(
            "mzstore_integrity_failures", "Stored copies found corrupt on read.", value=counts["corrupt"]
        )
        family = CounterMetricFamily(
            "mzstore_pull_through",
            "Blobs a pull-through cache served (hit) or fetched upstream (miss).",
            labels=["result"],
        )
        for result in ("hit", "miss"):
            family.add_metric([result], counts[result])
        yield family

    def describe(self) -> list[Any]:
        return []


_watched: StoreCollector | None = None


def watch_store(store: Any) -> None:
    """Export ``store``'s counts (one store per server process: a later one replaces the earlier)."""
    global _watched
    if _watched is not None:
        REGISTRY.unregister(_watched)
    _watched = StoreCollector(store)
    REGISTRY.register(_watched)


def _method(details: grpc.HandlerCallDetails) -> str:
    name: str = details.method  # type: ignore[attr-defined]
    return name.rsplit("/", 1)[-1] or "unknown"


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every call by method and final status code, and the calls in flight."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = _method(details)

        def done(context: grpc.ServicerContext) -> None:
            code = context.code() if hasattr(context, "code") else None
            GRPC_REQUESTS.labels(method, getattr(code, "name", None) or "OK").inc()

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                GRPC_IN_FLIGHT.labels(method).inc()
                try:
                    return behavior(request, context)
                finally:
                    GRPC_IN_FLIGHT.labels(method).dec()
                    done(context)

            return wrapped

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
                GRPC_IN_FLIGHT.labels(method).inc()
                try:
                    yield from behavior(request, context)
                finally:
                    GRPC_IN_FLIGHT.labels(method).dec()
                    done(context)

            return wrapped

        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))  # type: ignore[attr-defined,no-any-return]
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary))  # type: ignore[attr-defined,no-any-return]
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming(handler.unary_stream))  # type: ignore[attr-defined,no-any-return]
        if handler.stream_stream:
            return handler._replace(stream_stream=streaming(handler.stream_stream))  # type: ignore[attr-defined,no-any-return]
        return handler
