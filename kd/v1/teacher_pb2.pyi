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

class Access(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_UNSPECIFIED: _ClassVar[Access]
    WHITE: _ClassVar[Access]
    FEATURES: _ClassVar[Access]
    SCORES: _ClassVar[Access]
    LABELS: _ClassVar[Access]
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
ACCESS_UNSPECIFIED: Access
WHITE: Access
FEATURES: Access
SCORES: Access
LABELS: Access

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
    __slots__ = ("name", "fingerprint", "input_shape", "input_dtype", "num_classes", "class_names", "max_batch_size", "device", "accepted_input_dtypes", "normalization", "layers", "datasets", "access", "batch_norms", "has_activation_records", "inputs", "outputs", "signature_extra", "weights_fingerprint", "target_options", "weights_version", "accepts_weights", "dataset_infos")
    class SignatureExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TargetOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
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
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    BATCH_NORMS_FIELD_NUMBER: _ClassVar[int]
    HAS_ACTIVATION_RECORDS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_EXTRA_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DATASET_INFOS_FIELD_NUMBER: _ClassVar[int]
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
    access: Access
    batch_norms: _containers.RepeatedCompositeFieldContainer[BatchNormInfo]
    has_activation_records: bool
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    signature_extra: _containers.ScalarMap[str, str]
    weights_fingerprint: str
    target_options: _containers.ScalarMap[str, str]
    weights_version: int
    accepts_weights: bool
    dataset_infos: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[DType, str]] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., device: _Optional[str] = ..., accepted_input_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., datasets: _Optional[_Iterable[str]] = ..., access: _Optional[_Union[Access, str]] = ..., batch_norms: _Optional[_Iterable[_Union[BatchNormInfo, _Mapping]]] = ..., has_activation_records: _Optional[bool] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., signature_extra: _Optional[_Mapping[str, str]] = ..., weights_fingerprint: _Optional[str] = ..., target_options: _Optional[_Mapping[str, str]] = ..., weights_version: _Optional[int] = ..., accepts_weights: _Optional[bool] = ..., dataset_infos: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "dataset_id", "num_samples", "augmentation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    AUGMENTATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset_id: str
    num_samples: int
    augmentation: str
    def __init__(self, name: _Optional[str] = ..., dataset_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., augmentation: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BatchNormInfo(_message.Message):
    __slots__ = ("name", "num_features", "eps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_features: int
    eps: float
    def __init__(self, name: _Optional[str] = ..., num_features: _Optional[int] = ..., eps: _Optional[float] = ...) -> None: ...

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
    __slots__ = ("teachers", "usage")
    TEACHERS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    teachers: _containers.RepeatedCompositeFieldContainer[TeacherInfo]
    usage: Usage
    def __init__(self, teachers: _Optional[_Iterable[_Union[TeacherInfo, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("logits", "logits_dtype", "top_k", "probs_temperature", "features", "pool_features", "features_dtype", "labels", "sparse_temperature", "token_samples", "token_sample_seed", "token_logprobs", "class_samples", "class_sample_rounds", "sample_uniforms", "class_sample_seed")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PROBS_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    POOL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CLASS_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLASS_SAMPLE_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_UNIFORMS_FIELD_NUMBER: _ClassVar[int]
    CLASS_SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    logits: bool
    logits_dtype: DType
    top_k: int
    probs_temperature: float
    features: _containers.RepeatedScalarFieldContainer[str]
    pool_features: bool
    features_dtype: DType
    labels: bool
    sparse_temperature: float
    token_samples: int
    token_sample_seed: int
    token_logprobs: bool
    class_samples: int
    class_sample_rounds: int
    sample_uniforms: Tensor
    class_sample_seed: int
    def __init__(self, logits: _Optional[bool] = ..., logits_dtype: _Optional[_Union[DType, str]] = ..., top_k: _Optional[int] = ..., probs_temperature: _Optional[float] = ..., features: _Optional[_Iterable[str]] = ..., pool_features: _Optional[bool] = ..., features_dtype: _Optional[_Union[DType, str]] = ..., labels: _Optional[bool] = ..., sparse_temperature: _Optional[float] = ..., token_samples: _Optional[int] = ..., token_sample_seed: _Optional[int] = ..., token_logprobs: _Optional[bool] = ..., class_samples: _Optional[int] = ..., class_sample_rounds: _Optional[int] = ..., sample_uniforms: _Optional[_Union[Tensor, _Mapping]] = ..., class_sample_seed: _Optional[int] = ...) -> None: ...

class DatasetRef(_message.Message):
    __slots__ = ("dataset", "indices", "view_seeds", "return_view_params")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VIEW_SEEDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_VIEW_PARAMS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    view_seeds: _containers.RepeatedScalarFieldContainer[int]
    return_view_params: bool
    def __init__(self, dataset: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ..., view_seeds: _Optional[_Iterable[int]] = ..., return_view_params: _Optional[bool] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "teacher", "inputs", "ref", "outputs", "lengths", "positions")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    inputs: Tensor
    ref: DatasetRef
    outputs: OutputSpec
    lengths: _containers.RepeatedScalarFieldContainer[int]
    positions: Tensor
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., ref: _Optional[_Union[DatasetRef, _Mapping]] = ..., outputs: _Optional[_Union[OutputSpec, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ..., positions: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "teacher", "fingerprint", "outputs", "error", "usage", "view_params", "weights_version")
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
    USAGE_FIELD_NUMBER: _ClassVar[int]
    VIEW_PARAMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    fingerprint: str
    outputs: _containers.MessageMap[str, Tensor]
    error: Error
    usage: Usage
    view_params: Tensor
    weights_version: int
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., fingerprint: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., view_params: _Optional[_Union[Tensor, _Mapping]] = ..., weights_version: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("client", "samples", "gradient_samples", "budget")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    client: str
    samples: int
    gradient_samples: int
    budget: int
    def __init__(self, client: _Optional[str] = ..., samples: _Optional[int] = ..., gradient_samples: _Optional[int] = ..., budget: _Optional[int] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("request_id", "teacher", "inputs", "upstream", "return_outputs")
    class UpstreamEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    RETURN_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    inputs: Tensor
    upstream: _containers.MessageMap[str, Tensor]
    return_outputs: bool
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., upstream: _Optional[_Mapping[str, Tensor]] = ..., return_outputs: _Optional[bool] = ...) -> None: ...

class GradientResponse(_message.Message):
    __slots__ = ("request_id", "input_grad", "outputs", "usage")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input_grad: Tensor
    outputs: _containers.MessageMap[str, Tensor]
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., input_grad: _Optional[_Union[Tensor, _Mapping]] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class BatchNormStatsRequest(_message.Message):
    __slots__ = ("teacher",)
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    def __init__(self, teacher: _Optional[str] = ...) -> None: ...

class BatchNormStatsResponse(_message.Message):
    __slots__ = ("stats", "layers")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    STATS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    stats: _containers.MessageMap[str, Tensor]
    layers: _containers.RepeatedCompositeFieldContainer[BatchNormInfo]
    def __init__(self, stats: _Optional[_Mapping[str, Tensor]] = ..., layers: _Optional[_Iterable[_Union[BatchNormInfo, _Mapping]]] = ...) -> None: ...

class BatchNormLossRequest(_message.Message):
    __slots__ = ("request_id", "teacher", "inputs", "state_id", "momentum", "ttl_seconds", "upstream_logits", "layer_weights")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    STATE_ID_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_LOGITS_FIELD_NUMBER: _ClassVar[int]
    LAYER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    inputs: Tensor
    state_id: str
    momentum: float
    ttl_seconds: float
    upstream_logits: Tensor
    layer_weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., state_id: _Optional[str] = ..., momentum: _Optional[float] = ..., ttl_seconds: _Optional[float] = ..., upstream_logits: _Optional[_Union[Tensor, _Mapping]] = ..., layer_weights: _Optional[_Iterable[float]] = ...) -> None: ...

class BatchNormLossResponse(_message.Message):
    __slots__ = ("request_id", "loss", "per_layer", "input_grad", "logits", "usage")
    class PerLayerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    loss: float
    per_layer: _containers.ScalarMap[str, float]
    input_grad: Tensor
    logits: Tensor
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., loss: _Optional[float] = ..., per_layer: _Optional[_Mapping[str, float]] = ..., input_grad: _Optional[_Union[Tensor, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ActivationRecordsRequest(_message.Message):
    __slots__ = ("teacher",)
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    def __init__(self, teacher: _Optional[str] = ...) -> None: ...

class ActivationRecordsResponse(_message.Message):
    __slots__ = ("records", "dataset", "layers")
    class RecordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.MessageMap[str, Tensor]
    dataset: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, records: _Optional[_Mapping[str, Tensor]] = ..., dataset: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class SynthesisRequest(_message.Message):
    __slots__ = ("request_id", "teacher", "batch_size", "targets", "iterations", "lr", "bn_weight", "tv_weight", "l2_weight", "seed", "report_every")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BN_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    L2_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    teacher: str
    batch_size: int
    targets: _containers.RepeatedScalarFieldContainer[int]
    iterations: int
    lr: float
    bn_weight: float
    tv_weight: float
    l2_weight: float
    seed: int
    report_every: int
    def __init__(self, request_id: _Optional[str] = ..., teacher: _Optional[str] = ..., batch_size: _Optional[int] = ..., targets: _Optional[_Iterable[int]] = ..., iterations: _Optional[int] = ..., lr: _Optional[float] = ..., bn_weight: _Optional[float] = ..., tv_weight: _Optional[float] = ..., l2_weight: _Optional[float] = ..., seed: _Optional[int] = ..., report_every: _Optional[int] = ...) -> None: ...

class SynthesisUpdate(_message.Message):
    __slots__ = ("request_id", "iteration", "loss", "terms", "inputs", "targets", "done", "usage")
    class TermsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    iteration: int
    loss: float
    terms: _containers.ScalarMap[str, float]
    inputs: Tensor
    targets: Tensor
    done: bool
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., iteration: _Optional[int] = ..., loss: _Optional[float] = ..., terms: _Optional[_Mapping[str, float]] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., targets: _Optional[_Union[Tensor, _Mapping]] = ..., done: _Optional[bool] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("teacher", "data", "total_bytes", "expected_version")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    data: bytes
    total_bytes: int
    expected_version: int
    def __init__(self, teacher: _Optional[str] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class PublishWeightsResponse(_message.Message):
    __slots__ = ("teacher", "weights_version", "fingerprint", "weights_fingerprint")
    TEACHER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    teacher: str
    weights_version: int
    fingerprint: str
    weights_fingerprint: str
    def __init__(self, teacher: _Optional[str] = ..., weights_version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., weights_fingerprint: _Optional[str] = ...) -> None: ...
