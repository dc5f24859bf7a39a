"""The Python client: push, pull, load and admin calls against one store.

How it works: a :class:`Client` holds a transport
(:class:`~mzstore.transport.grpc.GrpcTransport`; wrapped in a
:class:`~mzstore.transport.direct.DirectTransport` for ``direct=True``), the
local chunk cache and the settings. It resolves refs to verified manifests
(the bytes are checked against their digest; a ``name@sha256:…`` found in
the cache needs no server) and hands the work to the library:

* push: :func:`mzstore.push.upload.push_resumable` (or ``push_streamed``)
  over the transport;
* every pull output: a :class:`~mzstore.pull.puller.Puller` whose ``fetch``
  is :meth:`Client.fetch` (the transport's ranged blob read).

Nothing here knows gRPC; errors are domain errors (:mod:`mzstore.errors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mzstore.errors import (
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    MzstoreError,
    NotFound,
    Unavailable,
    UsageError,
)
from mzstore.format.manifest import Manifest, digest_of, parse_manifest, path_selected
from mzstore.format.refs import Ref, parse_ref
from mzstore.settings import KEEPALIVE_TIMEOUT_S, TRANSPORTS, Settings, load_settings
from mzstore.transport.base import RefInfo, Topology, Transport

if TYPE_CHECKING:
    from mzstore.pull.cache import ChunkCache
    from mzstore.pull.pipeline import Parts, PullStats
    from mzstore.pull.puller import Puller
    from mzstore.push.protocol import UploadBegin
    from mzstore.push.source import Source

log = logging.getLogger("mzstore.client")
ProgressFn = Callable[[int], None]
#: ``(tensor-name regex, split dim or None)`` tensor-parallel rules (see :mod:`mzstore.pull.tp`).
TpRules = list[tuple[str, int | None]]


@dataclass(frozen=True)
class PushInfo:
    ref: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    bytes_transferred: int
    seconds: float
    tensors: int
    chunks: int
    shards: int
    skipped: list[str]
    worst: dict[str, Any] | None = None
    #: ``ecsq`` pushes: the allocation recorded in the manifest (its ``source``: probe, roles or uniform).
    allocation: dict[str, Any] | None = None


@dataclass(frozen=True)
class PullInfo:
    ref: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    bytes_transferred: int
    seconds: float
    files: list[str]
    chunks: int
    bytes_cached: int = 0
    chunks_cached: int = 0

    @classmethod
    def of(
        cls, name: str, digest: str, manifest: Manifest, start: float, finals: list[Path], stats: PullStats
    ) -> PullInfo:
        """What a pull that wrote ``finals`` reports, from its pipeline counts."""
        return cls(
            ref=name,
            digest=digest,
            bytes_raw=manifest.bytes_raw,
            bytes_stored=manifest.stored_total,
            bytes_transferred=stats.bytes_transferred,
            seconds=time.perf_counter() - start,
            files=[str(p) for p in finals],
            chunks=stats.chunks,
            bytes_cached=stats.bytes_cached,
            chunks_cached=stats.chunks_cached,
        )


def _cosine(fidelity: dict[str, Any] | None) -> float:
    value = (fidelity or {}).get("cosine")
    return float(value) if value is not None else 1.0


class Client:
    """A connection to an mzstore server.

    Args:
        server: ``HOST:PORT``; default from ``MZSTORE_SERVER`` or ``127.0.0.1:50051``.
        settings: defaults for everything else (see :class:`~mzstore.settings.Settings`).
        timeout: deadline in seconds for short calls; default ``settings.timeout``. Every call has a
            finite deadline: a push ``settings.push_timeout``, each blob range read on pull
            ``settings.fetch_timeout`` (retried like an unreachable server). A call past its deadline
            raises :class:`~mzstore.errors.DeadlineExceeded` naming the call and the deadline.
        cache: use the local chunk cache (:mod:`mzstore.pull.cache`); default ``settings.cache``.
        direct: read blob bytes straight from the storage nodes the server reports
            (:mod:`mzstore.transport.direct`) instead of through the server.
        token: bearer token sent as ``authorization`` metadata on every call; default ``settings.token``.
        tls_ca: PEM CA bundle to verify the server with; given (or ``settings.tls_ca``), the channel is TLS,
            with ``settings.tls_cert``/``tls_key`` as the client certificate for mutual TLS.
        data_plane: where blob bytes come from (default ``settings.transport``, ``MZSTORE_TRANSPORT``):
            ``auto`` (the server's HTTP plane when it advertises one, else gRPC; each range falls
            back to gRPC if HTTP fails), ``http`` (the same, but a server without one is an error),
            ``grpc``, or ``direct`` (as ``direct=True``). ``settings.blob_url`` (``MZSTORE_BLOB_URL``)
            replaces the advertised base (a site cache, a CDN). A resumable push sends its bytes
            by HTTP PUT when the server offers it, except with ``grpc`` (:mod:`mzstore.transport.uploads`).
        offline: never contact the server (default ``settings.offline``, ``MZSTORE_OFFLINE``): refs
            resolve through the cache's tag → digest mapping and chunks come from the cache; what
            is not there fails at once. Online, a tag whose server is unreachable also falls back to
            the cached mapping, with a warning that the tag may have moved.
        transport: talk to the store through this transport instead of opening a gRPC channel
            (``server``, ``timeout``, ``token`` and ``tls_ca`` are then not used).

    Raises:
        InvalidArgument: a token with a plaintext, non-loopback server (it would cross the network in
            clear text); an unreadable TLS file.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        settings: Settings | None = None,
        timeout: float | None = None,
        cache: bool | None = None,
        direct: bool = False,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        data_plane: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        plane = data_plane or self.settings.transport
        if plane not in TRANSPORTS:
            raise UsageError(f"data_plane must be one of {', '.join(TRANSPORTS)}, got {plane!r}")
        direct = direct or plane == "direct"
        self.direct = direct
        self.data_plane = "direct" if direct else plane
        self.offline = self.settings.offline if offline is None else offline
        if transport is None and self.offline:
            from mzstore.settings import server_address
            from mzstore.transport.offline import OfflineTransport

            transport = OfflineTransport(server_address(server or self.settings.server))
        if transport is None:
            from mzstore.transport.grpc import GrpcTransport

            transport = GrpcTransport(
                server or self.settings.server, settings=self.settings, timeout=timeout, token=token, tls_ca=tls_ca
            )
            transport.http_uploads = plane != "grpc"  # a push's bytes go by HTTP when the server offers it
        if direct:
            from mzstore.transport.direct import DirectTransport

            transport = DirectTransport(transport)
        self.transport: Transport = transport
        self.server = transport.address
        self._token = token or self.settings.token
        self._tls_ca = str(tls_ca or self.settings.tls_ca or "") or None
        if self.settings.blob_url and self.data_plane in ("auto", "http"):
            self._use_http(self.settings.blob_url)
        use_cache = self.settings.cache if cache is None else cache
        self.cache: ChunkCache | None = None
        if use_cache:
            from mzstore.pull.cache import ChunkCache

            self.cache = ChunkCache(self.settings.cache_dir)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- push -------------------------------------------------------------
    def push(
        self,
        source: str | os.PathLike[str] | Source,
        ref: str,
        *,
        codec: str = "lossless",
        keep: tuple[str, ...] | list[str] = (),
        annotations: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
        resumable: bool = True,
        retries: int = 5,
        origin: str | os.PathLike[str] | None = None,
        allow_no_weights: bool = False,
        probe: bool = False,
        base: str | None = None,
    ) -> PushInfo:
        """Upload ``source`` (file or directory) and store it as ``ref``, encoded with ``codec``.

        Args:
            codec: policy (see :mod:`mzstore.codecs.policy`), e.g. ``"int8"`` or ``"auto:cos=0.99"``.
            keep: tensor-name patterns that lossy policies keep exact.
            annotations: free ``key: value`` notes recorded in the manifest (lineage such as
                ``fine-tuned-from``), shown by ``mzstore inspect``.
            progress: called with the bytes read from the source as they go out.
            resumable: upload through a session (:mod:`mzstore.push.sessions`): a dropped
                connection is retried up to ``retries`` times, each resuming at the offsets the
                server holds. ``False`` streams straight into the ingest (one stream, no resume).
            origin: the path ``source`` was opened from, when ``source`` is an opened
                :class:`Source`; with it a rerun of a killed push resumes its session.
            allow_no_weights: store a source with no weights (only configs, ONNX, GGUF…),
                which is refused by default as the likely mistake it is.
            probe: ``ecsq`` policies: measure each tensor's sensitivity with random tokens through the
                model (a Hugging Face directory; needs torch and transformers) instead of the role
                table (:mod:`mzstore.push.probe`). ``PushInfo.allocation`` says which ran.
            base: a model in the store (``name:tag`` or ``name@sha256:…``) this one derives from: each
                tensor the policy stores lossless is stored as an exact XOR delta against the base's
                tensor of the same name, dtype and shape (:mod:`mzstore.codecs.delta`), so a fine-tune
                costs what changed, and a client that holds the base's chunks fetches only the deltas.

        Raises:
            InvalidArgument: bad source, ref or policy, a policy with nothing to apply to, or a
                source with no weights (raised before anything is uploaded); FormatError: malformed safetensors;
            IntegrityError: the upload was altered; Unavailable: no server, or the connection broke;
            DeadlineExceeded: the push took longer than ``settings.push_timeout``.
            A failed push stores no ref; pushing again is safe (content-addressed, nothing duplicated).
        """
        from mzstore.codecs.allocation import Allocation
        from mzstore.codecs.policy import parse_policy
        from mzstore.push.allocate import plan_allocation
        from mzstore.push.protocol import validate_begin
        from mzstore.push.source import Source, check_has_weights, check_policy_applies, open_source
        from mzstore.push.upload import (
            begin_for,
            file_hashes,
            file_identities,
            forget_hashes,
            push_resumable,
            push_streamed,
            remember_hashes,
        )

        src = source if isinstance(source, Source) else open_source(source)
        if not allow_no_weights:
            named = origin or source
            check_has_weights(src, os.fspath(named) if isinstance(named, (str, os.PathLike)) else "the source")
        policy = parse_policy(codec, keep)
        # Ref, files and annotations are checked before any work (the allocation comes next, then the whole).
        validate_begin(begin_for(src, ref, "lossless", annotations, tuple(keep), base=base or ""))
        check_policy_applies(src, policy)
        allocation: Allocation | None = None
        if policy.ecsq is not None:  # the client holds the whole model: it decides each tensor's step
            named = origin or source
            where = Path(os.fspath(named)) if isinstance(named, (str, os.PathLike)) else None
            allocation = plan_allocation(src, policy, probe=probe, origin=where if where and where.is_dir() else None)
        begin = begin_for(
            src,
            ref,
            codec,
            annotations,
            tuple(keep),
            allocation=allocation.to_json() if allocation else "",
            base=base or "",
        )
        validate_begin(begin)  # fail before any upload on what the client can check
        remembered = self.settings.cache_dir / "file-hashes.json"
        if resumable:  # a file's sha256 goes first where the store may hold it, so it can skip the file
            held = self.transport.held_sizes([f.size for f in src.files])  # no file of that size: none to skip
            hashes = file_hashes(src, remembered, only=held)
            begin = begin_for(src, ref, codec, annotations, tuple(keep), hashes, begin.allocation, begin.base)
        start = time.perf_counter()
        if resumable:
            record = self._session_record(begin, origin or source)
            busy_wait = self.settings.keepalive_s + KEEPALIVE_TIMEOUT_S
            identities = file_identities(src)
            sent_hashes: dict[int, str] = {}
            try:
                result, sent = push_resumable(
                    self.transport,
                    src,
                    begin,
                    progress=progress,
                    retries=retries,
                    record=record,
                    busy_wait=busy_wait,
                    hashed=sent_hashes,
                )
                # Files hashed as they were sent (no file of their size was in the store) are remembered too.
                remember_hashes(src, remembered, sent_hashes, identities)
            except IntegrityError as exc:
                # The files are not hashed again as they are sent: the server checks the digests sent
                # first, so a file changed since fails here. Its remembered hash goes; a rerun rehashes.
                forget_hashes(src, remembered)
                raise IntegrityError(f"{exc} (a file changed after it was hashed? push again)") from exc
        else:
            result, sent = push_streamed(self.transport, src, begin, progress)
        return PushInfo(
            ref=result.ref,
            digest=result.digest,
            bytes_raw=result.bytes_raw,
            bytes_stored=result.bytes_stored,
            bytes_transferred=sent,
            seconds=time.perf_counter() - start,
            tensors=result.tensors,
            chunks=result.chunks,
            shards=result.shards,
            skipped=src.skipped,
            worst=self._worst(result.ref, result.digest) if policy.lossy else None,
            allocation=allocation.record() if allocation is not None else None,
        )

    def _session_record(self, begin: UploadBegin, origin: object) -> Path | None:
        """Where this push remembers its upload session, so a rerun after a crash resumes it."""
        where = str(Path(os.fspath(origin)).resolve()) if isinstance(origin, (str, os.PathLike)) else None
        if where is None:
            return None
        key = json.dumps(
            [
                self.server,
                where,
                begin.ref,
                begin.storage_policy,
                list(begin.keep),
                [(f.path, f.size) for f in begin.files],
            ]
        )
        return self.settings.cache_dir / "uploads" / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def _worst(self, ref: str, digest: str) -> dict[str, Any] | None:
        """The lossy tensor with the lowest cosine to its original, from the stored manifest."""
        _, _, manifest = self.manifest(f"{parse_ref(ref).name}@{digest}")
        lossy = [t for t in manifest.tensors if t.fidelity is not None and t.codec != "lossless"]
        if not lossy:
            return None
        t = min(lossy, key=lambda t: _cosine(t.fidelity))
        return {"tensor": t.name, "codec": t.codec, **(t.fidelity or {})}

    # -- reading ----------------------------------------------------------
    def manifest(self, ref: str) -> tuple[str, str, Manifest]:
        """Return ``(ref, digest, manifest)``; the manifest bytes are checked against the digest.

        A ``name@sha256:…`` ref found in the local cache needs no server (digests are immutable).
        """
        parsed = parse_ref(ref)
        if parsed.digest and self.cache is not None:
            cached = self.cache.get_manifest(parsed.digest)
            if cached is not None:
                return str(parsed), parsed.digest, cached
        try:
            name, digest, data = self.transport.manifest(ref)
        except (Unavailable, DeadlineExceeded, NotFound) as exc:
            remembered = self._cached_tag(parsed, exc)
            if remembered is None:
                raise
            return remembered
        self._pick_data_plane()
        if digest_of(data) != digest:
            raise IntegrityError(f"manifest of {ref} does not match its digest {digest}")
        if self.cache is not None:
            self.cache.put_manifest(name, self.server, digest, data)
        return name, digest, parse_manifest(data)

    def _use_http(self, base_url: str) -> None:
        from mzstore.settings import is_loopback
        from mzstore.transport.http import HttpTransport

        host = base_url.partition("://")[2].split("/", 1)[0]
        proxy = self.settings.blob_proxy
        proxy_host = proxy.partition("://")[2].split("/", 1)[0] if proxy else None
        if (
            self._token
            and base_url.startswith("http://")
            and not (is_loopback(host) and (proxy_host is None or is_loopback(proxy_host)))
        ):
            log.warning("not reading blobs from %s: a token would cross the network in clear text", base_url)
            return
        cert, key = self.settings.tls_cert, self.settings.tls_key
        self.transport = HttpTransport(
            self.transport,
            base_url,
            self.settings,
            self._token,
            self._tls_ca,
            str(cert) if cert else None,
            str(key) if key else None,
            proxy,
        )

    def _pick_data_plane(self) -> None:
        """After a manifest reply: read blobs over the HTTP plane the server advertised, if asked to."""
        from mzstore.transport.http import HttpTransport

        if self.data_plane not in ("auto", "http") or isinstance(self.transport, HttpTransport):
            return
        advertised = getattr(self.transport, "advertised", None)
        if advertised:
            self._use_http(advertised)
        elif self.data_plane == "http":
            raise Unavailable(
                f"{self.server} advertises no HTTP data plane (serve --http); set MZSTORE_BLOB_URL or use grpc"
            )

    def _cached_tag(self, parsed: Ref, exc: MzstoreError) -> tuple[str, str, Manifest] | None:
        """The manifest the cache says ``parsed`` (a tag) last resolved to, when the server cannot say.

        Offline, that is the answer; online, only an unreachable server (not an unknown tag) falls
        back to it, with a one-line warning. ``None`` when the cache cannot answer either.
        """
        if parsed.digest or self.cache is None or (isinstance(exc, NotFound) and not self.offline):
            return None
        tag = f"{parsed.name}:{parsed.tag}"
        digest = self.cache.cached_tag(tag, self.server)
        manifest = self.cache.get_manifest(digest) if digest else None
        if digest is None or manifest is None:
            return None
        if not self.offline:
            log.warning(
                "warning: %s is unreachable (%s); using the cached %s → %s, which may be stale",
                self.server,
                str(exc).split("\n", 1)[0],
                tag,
                digest,
            )
        return tag, digest, manifest

    def fetch(self, digest: str, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Read ``length`` stored bytes of a blob at ``offset`` (through the server, or the nodes with ``direct``).

        Raises:
            Unavailable, DeadlineExceeded: transient; the pull pipeline retries them.
            IntegrityError: other bytes than asked for arrived.
        """
        return self.transport.read_blob(digest, offset, length)

    def topology(self) -> Topology:
        """The server's storage nodes and replica count."""
        return self.transport.topology()

    def _chunk_cache(self) -> ChunkCache | None:
        """The chunk cache, unless direct reads come from directories on this machine (nothing to save)."""
        direct = sys.modules.get("mzstore.transport.direct")  # not loaded: no direct transport (and no import)
        if direct is None:
            return self.cache
        if isinstance(self.transport, direct.DirectTransport) and self.transport.local:
            return None
        return self.cache

    def puller(self, workers: int | None = None) -> Puller:
        """The pull path every output of this client goes through (fetch, cache, budget, workers)."""
        from mzstore.pull.puller import Puller

        return Puller(
            # looked up on each call, so a wrapper of this client's fetch (tests, benches) is used
            lambda digest, offset, length: self.fetch(digest, offset, length),
            cache=self._chunk_cache(),
            workers=workers or self.settings.pull_workers,
            streams=max(workers or 0, self.settings.pull_streams),
            refetch=lambda digest, offset, length: self.transport.read_blob_again(digest, offset, length),
            inflight_bytes=self.settings.pull_inflight_bytes,
            coalesce_bytes=self.settings.pull_coalesce_bytes,
            durable=self.settings.pull_fsync,
            parts=self._read_parts(),
        )

    def _read_parts(self) -> Parts | None:
        """The transport's ``read_parts`` (HTTP: runs of chunks in one request), unless ``fetch`` is
        wrapped (tests, benches): then every read goes through the wrapper."""
        if "fetch" in vars(self) or type(self).fetch is not Client.fetch:
            return None
        return getattr(self.transport, "read_parts", None)

    def pull(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        workers: int | None = None,
        keep_quantized: bool = False,
        tp_size: int = 1,
        tp_rank: int = 0,
        tp_rules: TpRules | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> PullInfo:
        """Pull ``ref`` into ``out_dir`` in its source layout.

        Nothing appears under a final file name until every chunk is verified. Files already in
        ``out_dir`` under the model's file names are replaced; others are left (the CLI checks the
        folder first, see :mod:`mzstore.pull.destination`).

        Args:
            keep_quantized: write quantized weights in the compressed-tensors layout vLLM
                serves (see :mod:`mzstore.pull.keep_quantized`) instead of dequantizing.
            tp_size, tp_rank: write only this tensor-parallel rank's slice of every tensor
                (same file names, sliced tensors; see :meth:`load_state_dict`).
            tp_rules: ``(name regex, split dim or None)`` rules replacing the defaults.
            include, exclude: only the files whose paths match an ``include`` glob (all when
                empty) and no ``exclude`` glob, as ``hf download`` does; a plain pull only.

        Raises:
            InvalidArgument: the patterns select no file of the model.
        """
        start = time.perf_counter()
        name, digest, manifest = self.manifest(ref)
        files = None
        if include or exclude:
            files = [f.path for f in manifest.files if path_selected(f.path, include, exclude)]
            if not files:
                raise InvalidArgument(f"no file of {name} matches --include/--exclude")
        finals, stats = self.puller(workers).to_directory(
            manifest,
            out_dir,
            progress=progress,
            keep_quantized=keep_quantized,
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_rules=tp_rules,
            ref=name,
            files=files,
        )
        info = PullInfo.of(name, digest, manifest, start, finals, stats)
        if tp_size > 1 or tp_rank or keep_quantized or files is not None:  # what was written: the slices, or the codes
            return dataclasses.replace(info, bytes_raw=sum(p.stat().st_size for p in finals))
        return info

    def load_state_dict(
        self,
        ref: str,
        *,
        device: str | Any = "cpu",
        files: list[str] | None = None,
        workers: int | None = None,
        expand_on_device: bool | None = None,
        tp_size: int = 1,
        tp_rank: int = 0,
        tp_rules: TpRules | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Pull the tensors of ``ref`` into memory: ``{name: torch.Tensor}`` on ``device``.

        Args:
            device: where the tensors go (``"cpu"``, ``"cuda:1"``…).
            files: only the tensors of these source files.
            expand_on_device: move quantized chunks to ``device`` in compact form and
                expand them there (default: for any device but the CPU).
            tp_size, tp_rank: load only this tensor-parallel rank's slices (see
                :mod:`mzstore.pull.tp`); chunks outside the rank's rows are not fetched.
            tp_rules: ``(name regex, split dim or None)`` rules replacing the defaults.
            progress: called with the decoded size of each verified chunk.

        Raises:
            MissingDependency: torch is not installed (``pip install 'mzstore[torch]'``).
        """
        _, _, manifest = self.manifest(ref)
        return self.puller(workers).state_dict(
            manifest,
            device=device,
            files=files,
            expand_on_device=expand_on_device,
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_rules=tp_rules,
            progress=progress,
        )

    def load_into(
        self,
        model: Any,
        ref: str,
        *,
        device_map: Any = None,
        devices: list[Any] | None = None,
        strict: bool = True,
        prefix: str | None = None,
        files: list[str] | None = None,
        workers: int | None = None,
        expand_on_device: bool | None = None,
        in_place: bool = True,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Load the tensors of ``ref`` into ``model``, each straight onto its device.

        The checkpoint is matched to the model and placed before anything is
        fetched; then every tensor is pulled onto its device (GPU targets get
        quantized chunks in compact form and expand them there) and put in with
        ``model.load_state_dict(..., assign=True)``, so a model built under
        ``torch.device("meta")`` ends up materialized on the mapped devices, and a
        normal model's parameters move there. Tensors keep the checkpoint's dtype.
        Tied parameters (``lm_head`` sharing the embeddings) stay one tensor,
        loaded through the first of their names the checkpoint holds.
        Non-persistent buffers are set when the checkpoint holds them; those it
        lacks keep their value, and on a meta model stay on ``meta``
        (listed in the report's ``meta``).

        A model tensor that already holds memory on its mapped device, with the
        checkpoint's dtype and shape (a model built normally, or loaded before),
        is filled in place: the chunks decode straight into it, so the model is
        never held twice and the ``Parameter`` objects stay the same (see
        :func:`mzstore.pull.load_into.in_place_targets`).

        Args:
            model: a ``torch.nn.Module``.
            device_map: ``None`` (each tensor where the model's tensor is now, the
                CPU for ``meta``), one device (``"cuda:1"``, ``1``),
                ``{module prefix: device}`` (longest dotted prefix wins, ``""`` for
                the rest) or ``"balanced"`` (whole layers, in order, spread by bytes
                over ``devices``, default every visible GPU); see
                :mod:`mzstore.pull.device_map`.
            strict: the checkpoint must provide every state-dict key of the model
                and nothing else; ``strict=False`` loads what matches and fetches
                nothing else.
            prefix: added to every checkpoint name to give the model's name;
                default: the names as stored, or one prefix added or removed when
                that matches more (``0.model.`` for a sentence-transformers model).
            files: only the tensors of these source files.
            expand_on_device: force the device path for CPU targets too (tests).
            in_place: fill materialized tensors in place (the default). A load
                that fails part way then leaves them partly overwritten (the error
                is raised; load again). ``False`` pulls every tensor into new memory
                and changes nothing in the model until all of them have arrived and
                verified, at the cost of a second copy of the model at the peak.

        Returns:
            A report: ``devices`` (``{device: {"tensors", "bytes"}}``), ``missing``
            and ``unexpected`` keys, ``tied`` (name → the name it shares a tensor
            with), ``names`` (the name mapping used), ``meta`` (what is still on
            the meta device) and ``in_place`` (the names filled in place).

        Raises:
            InvalidArgument: names or shapes that do not match (with ``strict``),
                or a bad ``device_map``; raised before any byte is fetched.
        """
        _, _, manifest = self.manifest(ref)
        return self.puller(workers).into_model(
            model,
            manifest,
            device_map=device_map,
            devices=devices,
            strict=strict,
            prefix=prefix,
            files=files,
            expand_on_device=expand_on_device,
            in_place=in_place,
            progress=progress,
        )

    # -- admin ------------------------------------------------------------
    def ls(self, name: str | None = None) -> list[tuple[str, str, str]]:
        """``(name, tag, digest)`` of every tag, or of ``name``'s tags (:meth:`refs` has sizes and times too)."""
        return [(r.name, r.tag, r.digest) for r in self.transport.list_refs(name)]

    def refs(self, name: str | None = None) -> list[RefInfo]:
        """Every tag, or ``name``'s tags, with the model's sizes and when the tag was last written."""
        return self.transport.list_refs(name)

    def tag(self, source: str, target: str) -> tuple[str, str]:
        """Point ``target`` at the model ``source`` resolves to; ``(target, digest)``."""
        return self.transport.tag(source, target)

    def rm(self, ref: str) -> tuple[str, str]:
        """Remove the tag ``ref``; ``(ref, the digest it pointed at)``."""
        return self.transport.delete(ref)


__all__ = ["Client", "PullInfo", "PushInfo"]
