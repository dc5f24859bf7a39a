from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FindFileSizesRequest(_message.Message):
    __slots__ = ("sizes",)
    SIZES_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class FindFileSizesResponse(_message.Message):
    __slots__ = ("held",)
    HELD_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, held: _Optional[_Iterable[bool]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("begin", "data", "end")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    begin: PushBegin
    data: FileData
    end: FileEnd
    def __init__(self, begin: _Optional[_Union[PushBegin, _Mapping]] = ..., data: _Optional[_Union[FileData, _Mapping]] = ..., end: _Optional[_Union[FileEnd, _Mapping]] = ...) -> None: ...

class PushBegin(_message.Message):
    __slots__ = ("ref", "codec", "files", "source_kind", "annotations", "keep", "allocation", "base")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_KIND_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    codec: str
    files: _containers.RepeatedCompositeFieldContainer[FileInfo]
    source_kind: str
    annotations: _containers.ScalarMap[str, str]
    keep: _containers.RepeatedScalarFieldContainer[str]
    allocation: str
    base: str
    def __init__(self, ref: _Optional[str] = ..., codec: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileInfo, _Mapping]]] = ..., source_kind: _Optional[str] = ..., annotations: _Optional[_Mapping[str, str]] = ..., keep: _Optional[_Iterable[str]] = ..., allocation: _Optional[str] = ..., base: _Optional[str] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ("path", "size", "kind", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    kind: str
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., kind: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class FileData(_message.Message):
    __slots__ = ("file", "offset", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: int
    offset: int
    data: bytes
    def __init__(self, file: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class FileEnd(_message.Message):
    __slots__ = ("file", "size", "sha256")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    file: int
    size: int
    sha256: str
    def __init__(self, file: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("ref", "digest", "bytes_raw", "bytes_stored", "bytes_received", "tensors", "chunks", "shards")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_RAW_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    bytes_received: int
    tensors: int
    chunks: int
    shards: int
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., bytes_raw: _Optional[int] = ..., bytes_stored: _Optional[int] = ..., bytes_received: _Optional[int] = ..., tensors: _Optional[int] = ..., chunks: _Optional[int] = ..., shards: _Optional[int] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class GetManifestResponse(_message.Message):
    __slots__ = ("ref", "digest", "manifest", "blob_url")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    BLOB_URL_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    manifest: bytes
    blob_url: str
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., manifest: _Optional[bytes] = ..., blob_url: _Optional[str] = ...) -> None: ...

class ReadBlobRequest(_message.Message):
    __slots__ = ("digest", "offset", "length")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    digest: str
    offset: int
    length: int
    def __init__(self, digest: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RefEntry(_message.Message):
    __slots__ = ("name", "tag", "digest", "bytes_raw", "bytes_stored", "updated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_RAW_FIELD_NUMBER: _ClassVar[int]
    BYTES_STORED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    tag: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    updated: float
    def __init__(self, name: _Optional[str] = ..., tag: _Optional[str] = ..., digest: _Optional[str] = ..., bytes_raw: _Optional[int] = ..., bytes_stored: _Optional[int] = ..., updated: _Optional[float] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("refs",)
    REFS_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.RepeatedCompositeFieldContainer[RefEntry]
    def __init__(self, refs: _Optional[_Iterable[_Union[RefEntry, _Mapping]]] = ...) -> None: ...

class TagRequest(_message.Message):
    __slots__ = ("source", "target")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class TagResponse(_message.Message):
    __slots__ = ("ref", "digest")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("ref", "digest")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class GetTopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("url", "endpoint_url")
    URL_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    url: str
    endpoint_url: str
    def __init__(self, url: _Optional[str] = ..., endpoint_url: _Optional[str] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("nodes", "replicas")
    NODES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    replicas: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., replicas: _Optional[int] = ...) -> None: ...

class StartUploadRequest(_message.Message):
    __slots__ = ("session", "begin")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    session: str
    begin: PushBegin
    def __init__(self, session: _Optional[str] = ..., begin: _Optional[_Union[PushBegin, _Mapping]] = ...) -> None: ...

class UploadRequest(_message.Message):
    __slots__ = ("session", "data", "end")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    session: str
    data: FileData
    end: FileEnd
    def __init__(self, session: _Optional[str] = ..., data: _Optional[_Union[FileData, _Mapping]] = ..., end: _Optional[_Union[FileEnd, _Mapping]] = ...) -> None: ...

class CommitUploadRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("session", "received", "ended", "committed", "known", "upload_url")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    session: str
    received: _containers.RepeatedScalarFieldContainer[int]
    ended: _containers.RepeatedScalarFieldContainer[bool]
    committed: bool
    known: _containers.RepeatedScalarFieldContainer[bool]
    upload_url: str
    def __init__(self, session: _Optional[str] = ..., received: _Optional[_Iterable[int]] = ..., ended: _Optional[_Iterable[bool]] = ..., committed: _Optional[bool] = ..., known: _Optional[_Iterable[bool]] = ..., upload_url: _Optional[str] = ...) -> None: ...
