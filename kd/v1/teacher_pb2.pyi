from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    UINT16: _ClassVar[DType]
    UINT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
UINT8: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
BOOL: DType
UINT16: DType
UINT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "input_shape", "input_dtype", "num_classes", "class_names", "max_batch_size", "device", "accepted_input_dtypes", "normalization", "layers", "datasets")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: DType
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    device: str
    accepted_input_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    normalization: Normalization
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    datasets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[DType, str]] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., device: _Optional[str] = ..., accepted_input_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., datasets: _Optional[_Iterable[str]] = ...) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ListTeachersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTeachersResponse(_message.Message):
    __slots__ = ("teachers",)
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    def __init__(self, teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("logits", "logits_dtype", "top_k", "probs_temperature", "features", "pool_features", "features_dtype")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PROBS_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    POOL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_DTYPE_FIELD_NUMBER: _ClassVar[int]
    logits: bool
    logits_dtype: DType
    top_k: int
    probs_temperature: float
    features: _containers.RepeatedScalarFieldContainer[str]
    pool_features: bool
    features_dtype: DType
    def __init__(self, logits: _Optional[bool] = ..., logits_dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., probs_temperature: _Optional[float] = ..., features: _Optional[_Iterable[str]] = ..., pool_features: _Optional[bool] = ..., features_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class DatasetRef(_message.Message):
    __slots__ = ("dataset", "indices", "view_seeds")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VIEW_SEEDS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    view_seeds: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dataset: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ..., view_seeds: _Optional[_Iterable[int]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "teacher", "inputs", "ref", "outputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    inputs: Tensor
    ref: DatasetRef
    outputs: OutputSpec
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., ref: _Optional[_Union[DatasetRef, _Mapping]] = ..., outputs: _Optional[_Union[OutputSpec, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "teacher", "fingerprint", "outputs", "error")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    fingerprint: str
    outputs: _containers.MessageMap[str, Tensor]
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., fingerprint: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
