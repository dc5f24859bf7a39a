"""The Hugging Face Hub face: ``HF_ENDPOINT=http://server:PORT`` and the Hub's own clients read the store.

``huggingface_hub`` (``hf_hub_download``, ``snapshot_download``, ``HfApi``,
the ``hf`` CLI), transformers, sentence-transformers and vLLM's downloader
all honour ``HF_ENDPOINT``; this module answers the part of the Hub's read
API they use, on the HTTP plane (:mod:`mzstore.server.http`):

``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{revision}``
    Model info: ``id``, ``sha`` (the commit), ``siblings``, ``lastModified``,
    ``private``/``gated``/``disabled`` (all false), ``tags``. With
    ``?blobs=true`` the siblings carry ``size`` and ``lfs``.
``GET /api/models/{repo}/tree/{revision}[/{path}]?recursive=true|false``
    The file listing ``snapshot_download`` and ``list_repo_files`` read:
    ``{type, path, size, oid, lfs: {oid, size, pointerSize}}`` per file,
    ``{type: "directory", path, oid}`` per folder, paged with
    ``Link: <absolute URL>; rel="next"`` (:data:`TREE_PAGE` entries a page).
``HEAD|GET /{repo}/resolve/{revision}/{path}``
    The file, exactly as ``mzstore pull -o`` writes it, decoded by the
    server from its stored chunks (:mod:`mzstore.pull.fileview`): memory
    stays at a few chunks per response whatever the file size, a ``Range``
    (``bytes=N-``, ``N-M``, ``-N``) maps to the chunks that cover it and
    gets ``206``, and a bounded LRU of decoded chunks serves concurrent
    readers of one model. Headers: ``X-Repo-Commit``, ``ETag`` and
    ``X-Linked-Etag`` = the sha256 of the bytes served (known before the
    first byte: the pushed file's sha256 for lossless files, the sha256
    recorded at push for files with lossy tensors), ``X-Linked-Size``,
    ``Content-Length``, ``Accept-Ranges: bytes``. No ``X-Xet-*`` header is
    ever sent, so clients with ``hf_xet`` installed download over plain HTTP.

**Names.** A Hub repo id is ``name`` or ``namespace/name``; it is the
mzstore model name itself, so only mzstore names of one or two components
(``org/model``, ``model``) are reachable here, and the Hub's own rules apply
on top (each part at most 96 characters, no ``--`` or ``..``). Anything else
is ``404 RepoNotFound`` with a message saying why.

**Revisions.** A revision is an mzstore tag, except:

* ``main`` (the Hub's default branch) is the tag ``main`` when the model has
  one, else the default tag ``latest``;
* 40 lowercase hex digits are a commit: the manifest whose digest starts
  with them. Every response names the commit of the manifest it served
  (``X-Repo-Commit``, ``sha``): the first 40 hex digits of the manifest
  digest, so a commit pins exactly one stored version.

A lossy tag serves the dequantized safetensors (the tensors in their own
dtype, as a plain ``mzstore pull`` writes them). The revision
``<tag>+compressed-tensors`` (``main+compressed-tensors`` too) serves what
``mzstore pull --keep-quantized`` writes instead: int8/fp8/int4 weights as
their stored codes in the compressed-tensors layout vLLM and transformers
load, with ``quantization_config`` in ``config.json``. That form is its own
commit (the 40 hex digits of the plain form's commit, each one's complement
to 15), so a Hub cache never mixes the two; the server writes the export
once to its local disk (:class:`Exports`, an LRU bounded in bytes) and
sends its files with ``sendfile``.

**Errors** are what the clients map to their exceptions: ``404`` with
``X-Error-Code: RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``
(with ``X-Repo-Commit``, so a client caches the absence; transformers probes
optional files this way), ``400`` for a malformed path, ``416`` for a range
it cannot serve, ``401``/``403`` for tokens. Tokens are mzstore's, sent as
``Authorization: Bearer`` (``HF_TOKEN``), with the ``read`` scope.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from mzstore.errors import FormatError, InvalidArgument, MzstoreError, UsageError
from mzstore.format.manifest import Manifest, validate_relpath
from mzstore.format.refs import DEFAULT_TAG, validate_name, validate_tag
from mzstore.pull.fileview import FileLayout
from mzstore.pull.puller import Puller
from mzstore.server.files import DigestFile, ServedFiles, byte_range, iso_utc, start_body
from mzstore.storage.node import temp_prefix
from mzstore.storage.store import Store, manifest_key

#: Tree entries per page (the Hub pages its listings too; clients follow ``Link: rel="next"``).
TREE_PAGE = 1000
#: The Hub's default branch.
MAIN = "main"
#: A revision ending so asks for the compressed-tensors form of a lossy tag.
FORM_SUFFIX = "+compressed-tensors"
COMPRESSED = "compressed-tensors"
#: Bytes of compressed-tensors exports kept on the server's disk (least recently used go first).
EXPORT_BYTES = 16 * 1024**3
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HUB_PART = re.compile(r"[\w.-]{1,96}")
#: A repo id in a route: one or two path segments.
REPO = r"{repo:[^/]+(?:/[^/]+)?}"


class HubError(Exception):
    """A Hub-style error: status, ``X-Error-Code`` and message (and the commit, for a missing file)."""

    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.commit = commit

    def response(self) -> web.Response:
        headers = {"X-Error-Code": self.code, "X-Error-Message": str(self)}
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return web.json_response({"error": str(self)}, status=self.status, headers=headers)


def repo_name(repo_id: str) -> str:
    """The mzstore model name of a Hub repo id (the same string), or :class:`HubError` if it does not map."""
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(_HUB_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts):
        raise HubError(404, "RepoNotFound", f"{repo_id[:120]!r} is not a Hub repo id (name or namespace/name)")
    try:
        return validate_name(repo_id)
    except MzstoreError as exc:
        raise HubError(404, "RepoNotFound", f"{repo_id!r} does not name an mzstore model: {exc}") from None


def commit_of(digest: str, form: str = "") -> str:
    """The 40-hex commit of a manifest digest on this face: its first 40 hex digits, or (the
    compressed-tensors form) each of those digits' complement to 15."""
    head = digest.split(":", 1)[1][:40]
    return _complement(head) if form else head


def _complement(hex_digits: str) -> str:
    return "".join("0123456789abcdef"[15 - int(c, 16)] for c in hex_digits)


def _lfs(sha256: str, size: int) -> tuple[dict[str, Any], str]:
    """The ``lfs`` block of a file and its git oid (the sha1 of the git-lfs pointer file, as on the Hub)."""
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
    return {"oid": sha256, "size": size, "pointerSize": len(pointer)}, oid


@dataclass
class Revision:
    """A resolved request: the model name, its manifest, and when that version was written."""

    name: str
    digest: str
    manifest: Manifest
    modified: float
    form: str = ""  # "" (as a pull writes it) or COMPRESSED

    @property
    def commit(self) -> str:
        return commit_of(self.digest, self.form)


@dataclass(frozen=True)
class Exported:
    """A file of a compressed-tensors export on the server's disk."""

    path: Path
    size: int
    sha256: str


class Exports:
    """``pull --keep-quantized`` of a manifest, written once into a local folder and kept (LRU by bytes).

    A response that already opened a file keeps reading it if its export is evicted meanwhile (the
    file is unlinked, not truncated).
    """

    def __init__(self, store: Store, limit_bytes: int = EXPORT_BYTES, parent: Path | None = None) -> None:
        self.store = store
        self.limit_bytes = limit_bytes
        self._parent = parent
        self._root: Path | None = None
        self._lock = threading.Lock()
        self._building: dict[str, threading.Lock] = {}
        self._done: OrderedDict[str, dict[str, Exported]] = OrderedDict()

    def files(self, digest: str, manifest: Manifest) -> dict[str, Exported]:
        """The export's files by path (built on first use; blocking)."""
        with self._lock:
            hit = self._done.get(digest)
            if hit is not None:
                self._done.move_to_end(digest)
                return hit
            if self._root is None:
                if self._parent is not None:
                    self._parent.mkdir(parents=True, exist_ok=True)
                # named for its writer: a restarted server sweeps a killed one's folder (sweep_temp)
                self._root = Path(tempfile.mkdtemp(prefix=temp_prefix("hub-exports"), dir=self._parent))
            lock = self._building.setdefault(digest, threading.Lock())
        with lock:  # one build per manifest; others wait for it
            with self._lock:
                hit = self._done.get(digest)
            if hit is not None:
                return hit
            files = self._build(digest, manifest)
            with self._lock:
                self._done[digest] = files
                self._building.pop(digest, None)
                self._evict()
            return files

    def _build(self, digest: str, manifest: Manifest) -> dict[str, Exported]:
        assert self._root is not None
        out = self._root / digest.split(":", 1)[1]
        shutil.rmtree(out, ignore_errors=True)
        puller = Puller(self.store.read_blob, durable=False, workers=2)
        try:
            puller.to_directory(manifest, out, keep_quantized=True)
        except (InvalidArgument, UsageError) as exc:
            shutil.rmtree(out, ignore_errors=True)
            raise HubError(404, "RevisionNotFound", f"this version has no {COMPRESSED} form: {exc}") from None
        files = {}
        for p in sorted(out.rglob("*")):
            if p.is_file():
                with open(p, "rb") as fh:
                    sha = hashlib.file_digest(fh, "sha256").hexdigest()
                files[p.relative_to(out).as_posix()] = Exported(p, p.stat().st_size, sha)
        return files

    def _evict(self) -> None:
        held = sum(f.size for files in self._done.values() for f in files.values())
        while held > self.limit_bytes and len(self._done) > 1:
            _, files = self._done.popitem(last=False)
            for f in files.values():
                held -= f.size
                f.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


class HubFace:
    """The Hub routes over a :class:`Store` (see the module docstring)."""

    def __init__(self, store: Store, files: ServedFiles | None = None) -> None:
        self.store = store
        self.files = files or ServedFiles(store)
        self.exports = Exports(store, parent=self.files.temp_dir)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"/api/models/{REPO}/revision/{{rev:.+}}", self._info)
        router.add_get(f"/api/models/{REPO}/tree/{{rev:[^/]+}}{{path:(/.*)?}}", self._tree)
        router.add_get(f"/api/models/{REPO}", self._info)
        router.add_get("/api/models/{rest:.+}", self._unknown_repo)
        router.add_route("GET", f"/{REPO}/resolve/{{rev:[^/]+}}/{{path:.+}}", self._resolve)
        router.add_route("HEAD", f"/{REPO}/resolve/{{rev:[^/]+}}/{{path:.+}}", self._resolve)

    def close(self) -> None:
        self.exports.close()

    # -- resolution ---------------------------------------------------------------------

    def resolve(self, repo_id: str, revision: str) -> Revision:
        """The stored version ``repo_id@revision`` stands for (blocking: call it on a worker thread)."""
        name = repo_name(repo_id)
        form = ""
        if revision.endswith(FORM_SUFFIX):
            revision, form = revision[: -len(FORM_SUFFIX)], COMPRESSED
        if _COMMIT.fullmatch(revision):
            digest, commit_form = self._by_commit(name, revision)
            form = form or commit_form
            modified = self.store.written(manifest_key(digest))
        else:
            tags = [revision] if revision != MAIN else [MAIN, DEFAULT_TAG]
            try:
                for tag in tags:
                    validate_tag(tag)
            except MzstoreError:
                raise HubError(404, "RevisionNotFound", f"{revision[:140]!r} is not a revision of {repo_id}") from None
            found = None
            for tag in tags:
                found = self.files.tag(name, tag)
                if found is not None:
                    break
            if found is None:
                if not self._has_model(name):
                    raise HubError(404, "RepoNotFound", f"repository {repo_id} not found")
                raise HubError(404, "RevisionNotFound", f"revision {revision} of {repo_id} not found")
            digest, modified = found
        return Revision(name, digest, self.files.manifest(digest), modified, form)

    def _has_model(self, name: str) -> bool:
        try:
            return any(e.name == name for e in self.store.list_refs(name))
        except MzstoreError:
            return False

    def _by_commit(self, name: str, commit: str) -> tuple[str, str]:
        """The manifest a commit names, and the form (a commit of the compressed-tensors form is the
        complement of the manifest's own)."""
        for head, form in ((commit, ""), (_complement(commit), COMPRESSED)):
            prefix = f"manifests/sha256/{head[:2]}"
            for node in self.store.nodes:
                try:
                    keys = list(node.walk(prefix))
                except (MzstoreError, OSError):
                    continue
                for key in keys:
                    digest = "sha256:" + key.rsplit("/", 1)[-1]
                    if commit_of(digest) == head:
                        return digest, form
        if not self._has_model(name):
            raise HubError(404, "RepoNotFound", f"repository {name} not found")
        raise HubError(404, "RevisionNotFound", f"commit {commit} not found")

    def layout(self, rev: Revision, path: str) -> FileLayout:
        """Where the bytes of ``path`` come from (``EntryNotFound`` if the version has no such file)."""
        try:
            validate_relpath(path)
        except FormatError as exc:
            raise HubError(400, "BadPath", f"bad file path: {exc}") from None
        try:
            return self.files.layout(rev.digest, rev.manifest, path)
        except FileNotFoundError:
            raise HubError(404, "EntryNotFound", f"{path} is not in {rev.name}@{rev.commit}", rev.commit) from None

    def served_sha256(self, rev: Revision, layout: FileLayout) -> str:
        """The sha256 of the file as served (see :meth:`ServedFiles.sha256`)."""
        return self.files.sha256(rev.digest, layout)

    # -- routes -----------------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self.files.run(fn, *args)

    async def _unknown_repo(self, request: web.Request) -> web.Response:
        rest = request.match_info["rest"]
        return HubError(404, "RepoNotFound", f"no such Hub API route or repo id: /api/models/{rest[:200]}").response()

    async def _info(self, request: web.Request) -> web.Response:
        repo = request.match_info["repo"]
        revision = request.match_info.get("rev", MAIN)
        try:
            rev = await self._run(self.resolve, repo, revision)
            blobs = request.query.get("blobs", "").lower() == "true"
            siblings = await self._run(self._siblings, rev, blobs)
        except HubError as exc:
            return exc.response()
        body = {
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0] if "/" in repo else None,
            "sha": rev.commit,
            "lastModified": iso_utc(rev.modified),
            "createdAt": iso_utc(rev.modified),
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["mzstore", f"mzstore-codec:{rev.manifest.codec}"],
            "siblings": siblings,
        }
        return web.json_response(body, headers={"X-Repo-Commit": rev.commit})

    def listing(self, rev: Revision) -> list[tuple[str, int, str]]:
        """``(path, size, sha256)`` of every file of the revision, as served (blocking)."""
        if rev.form:
            return [(p, f.size, f.sha256) for p, f in self.exports.files(rev.digest, rev.manifest).items()]
        out = []
        for f in rev.manifest.files:
            layout = self.layout(rev, f.path)
            out.append((f.path, layout.size, self.served_sha256(rev, layout)))
        return out

    def _siblings(self, rev: Revision, blobs: bool) -> list[dict[str, Any]]:
        if not blobs and not rev.form:
            return [{"rfilename": f.path} for f in rev.manifest.files]
        out = []
        for path, size, sha in self.listing(rev):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                lfs, oid = _lfs(sha, size)
                entry |= {
                    "size": size,
                    "blobId": oid,
                    "lfs": {"sha256": sha, "size": size, "pointerSize": lfs["pointerSize"]},
                }
            out.append(entry)
        return out

    async def _tree(self, request: web.Request) -> web.Response:
        repo = request.match_info["repo"]
        sub = request.match_info.get("path", "").strip("/")
        recursive = request.query.get("recursive", "false").lower() == "true"
        try:
            start = int(request.query.get("cursor", "0"))
        except ValueError:
            return HubError(400, "BadCursor", "cursor must be an entry index").response()
        try:
            rev = await self._run(self.resolve, repo, request.match_info["rev"])
            entries = await self._run(self._entries, rev, sub, recursive)
        except HubError as exc:
            return exc.response()
        page = entries[start : start + TREE_PAGE]
        headers = {"X-Repo-Commit": rev.commit}
        if start + TREE_PAGE < len(entries):
            nxt = request.url.update_query({"cursor": str(start + TREE_PAGE)})
            headers[hdrs.LINK] = f'<{nxt}>; rel="next"'
        return web.json_response(page, headers=headers)

    def _entries(self, rev: Revision, sub: str, recursive: bool) -> list[dict[str, Any]]:
        if sub:
            try:
                validate_relpath(sub)
            except FormatError as exc:
                raise HubError(400, "BadPath", f"bad path: {exc}") from None
        prefix = f"{sub}/" if sub else ""
        files = [f for f in self.listing(rev) if f[0].startswith(prefix)]
        if sub and not files:
            raise HubError(404, "EntryNotFound", f"{sub} is not a folder of {rev.name}@{rev.commit}", rev.commit)
        out: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path, size, sha in files:
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folders.add(prefix + "/".join(parts[:depth]))
            if not recursive and len(parts) > 1:
                continue
            lfs, oid = _lfs(sha, size)
            out.append({"type": "file", "oid": oid, "size": size, "path": path, "lfs": lfs})
        for folder in sorted(folders):
            oid = hashlib.sha1(f"{rev.digest}:{folder}".encode()).hexdigest()
            out.append({"type": "directory", "oid": oid, "size": 0, "path": folder})
        return sorted(out, key=lambda e: e["path"])

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo, revision, path = request.match_info["repo"], request.match_info["rev"], request.match_info["path"]
        try:
            rev = await self._run(self.resolve, repo, revision)
            if rev.form:
                return await self._exported(request, rev, path)
            layout = await self._run(self.layout, rev, path)
            sha = await self._run(self.served_sha256, rev, layout)
        except HubError as exc:
            return exc.response()
        size = layout.size
        headers = self._headers(rev, revision, path, sha, size)
        span = _span(request, headers, size)
        if isinstance(span, web.Response):
            return span
        start, end, status = span
        if status == 206:
            headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{size}"
        response = await start_body(request, status, headers, end - start)
        if request.method == "HEAD":
            return response
        await self.files.send(request, response, layout, sha, start, end, "hub")
        await response.write_eof()
        return response

    def _headers(self, rev: Revision, revision: str, path: str, sha: str, size: int) -> dict[str, str]:
        headers = {
            "X-Repo-Commit": rev.commit,
            hdrs.ETAG: f'"{sha}"',
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(size),
            hdrs.ACCEPT_RANGES: "bytes",
            hdrs.CONTENT_DISPOSITION: f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if _COMMIT.fullmatch(revision):
            headers[hdrs.CACHE_CONTROL] = "private, max-age=31536000, immutable"  # a commit never changes
        return headers

    async def _exported(self, request: web.Request, rev: Revision, path: str) -> web.StreamResponse:
        """A file of the compressed-tensors form: from its export on disk, with ``sendfile``."""
        try:
            validate_relpath(path)
        except FormatError as exc:
            raise HubError(400, "BadPath", f"bad file path: {exc}") from None
        files = await self._run(self.exports.files, rev.digest, rev.manifest)
        found = files.get(path)
        if found is None:
            raise HubError(404, "EntryNotFound", f"{path} is not in {rev.name}@{rev.commit}", rev.commit)
        headers = self._headers(rev, request.match_info["rev"], path, found.sha256, found.size)
        span = _span(request, headers, found.size)
        if isinstance(span, web.Response):
            return span
        return DigestFile(found.path, found.sha256, headers, plane="hub")  # it sends the range itself


def _span(request: web.Request, headers: dict[str, str], size: int) -> tuple[int, int, int] | web.Response:
    """``(start, end, status)`` of what to send: the one ``Range`` (``206``; unless ``If-Range`` names
    another version), else all (``200``); or the response that answers instead: ``304`` for a matching
    ``If-None-Match``, ``416`` for a range that cannot be served."""
    etag = headers[hdrs.ETAG]
    none_match = request.headers.get(hdrs.IF_NONE_MATCH)
    if none_match is not None and etag in [t.strip().removeprefix("W/") for t in none_match.split(",")]:
        return web.Response(status=304, headers=headers)
    if request.headers.get(hdrs.RANGE) is None or request.headers.get(hdrs.IF_RANGE, etag).strip() != etag:
        return 0, size, 200
    try:
        start, end = byte_range(request, size)
    except ValueError as exc:
        response = HubError(416, "BadRange", str(exc)).response()
        response.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
        return response
    return start, end, 206
