from runtimed.api.containerd.types import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImportOptions(_message.Message):
    __slots__ = ("base_name", "digests", "skip_digest_for_named", "index_name", "all_platforms", "platform", "unpack", "snapshotter", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BASE_NAME_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SKIP_DIGEST_FOR_NAMED_FIELD_NUMBER: _ClassVar[int]
    INDEX_NAME_FIELD_NUMBER: _ClassVar[int]
    ALL_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    UNPACK_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    base_name: str
    digests: bool
    skip_digest_for_named: bool
    index_name: str
    all_platforms: bool
    platform: str
    unpack: bool
    snapshotter: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, base_name: _Optional[str] = ..., digests: _Optional[bool] = ..., skip_digest_for_named: _Optional[bool] = ..., index_name: _Optional[str] = ..., all_platforms: _Optional[bool] = ..., platform: _Optional[str] = ..., unpack: _Optional[bool] = ..., snapshotter: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImportRequest(_message.Message):
    __slots__ = ("options", "data")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    options: ImportOptions
    data: bytes
    def __init__(self, options: _Optional[_Union[ImportOptions, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportProgress(_message.Message):
    __slots__ = ("action", "ref", "offset", "total")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    action: str
    ref: str
    offset: int
    total: int
    def __init__(self, action: _Optional[str] = ..., ref: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class ImportedImage(_message.Message):
    __slots__ = ("name", "target")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    name: str
    target: _descriptor_pb2.Descriptor
    def __init__(self, name: _Optional[str] = ..., target: _Optional[_Union[_descriptor_pb2.Descriptor, _Mapping]] = ...) -> None: ...

class ImportResult(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImportedImage]
    def __init__(self, images: _Optional[_Iterable[_Union[ImportedImage, _Mapping]]] = ...) -> None: ...

class ImportResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: ImportProgress
    result: ImportResult
    def __init__(self, progress: _Optional[_Union[ImportProgress, _Mapping]] = ..., result: _Optional[_Union[ImportResult, _Mapping]] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("names", "all_platforms", "platforms", "skip_manifest_json", "skip_non_distributable", "format")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OCI: _ClassVar[ExportRequest.Format]
        DOCKER: _ClassVar[ExportRequest.Format]
    OCI: ExportRequest.Format
    DOCKER: ExportRequest.Format
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ALL_PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    SKIP_MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SKIP_NON_DISTRIBUTABLE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    all_platforms: bool
    platforms: _containers.RepeatedScalarFieldContainer[str]
    skip_manifest_json: bool
    skip_non_distributable: bool
    format: ExportRequest.Format
    def __init__(self, names: _Optional[_Iterable[str]] = ..., all_platforms: _Optional[bool] = ..., platforms: _Optional[_Iterable[str]] = ..., skip_manifest_json: _Optional[bool] = ..., skip_non_distributable: _Optional[bool] = ..., format: _Optional[_Union[ExportRequest.Format, str]] = ...) -> None: ...

class ExportResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
