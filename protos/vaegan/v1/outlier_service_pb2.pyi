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
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW: _ClassVar[ImageFormat]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_RAW: ImageFormat

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("id", "encoded", "tensor", "class_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    encoded: bytes
    tensor: Tensor
    class_id: int
    def __init__(self, id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., class_id: _Optional[int] = ...) -> None: ...

class Components(_message.Message):
    __slots__ = ("pixel", "feature", "disc", "pixel_local", "disc_local")
    PIXEL_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    DISC_FIELD_NUMBER: _ClassVar[int]
    PIXEL_LOCAL_FIELD_NUMBER: _ClassVar[int]
    DISC_LOCAL_FIELD_NUMBER: _ClassVar[int]
    pixel: float
    feature: float
    disc: float
    pixel_local: float
    disc_local: float
    def __init__(self, pixel: _Optional[float] = ..., feature: _Optional[float] = ..., disc: _Optional[float] = ..., pixel_local: _Optional[float] = ..., disc_local: _Optional[float] = ...) -> None: ...

class ScoreOptions(_message.Message):
    __slots__ = ("return_anomaly_map", "return_reconstruction", "return_repaired", "image_format", "weights", "threshold", "anomaly_map_input_size")
    RETURN_ANOMALY_MAP_FIELD_NUMBER: _ClassVar[int]
    RETURN_RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    RETURN_REPAIRED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_MAP_INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    return_anomaly_map: bool
    return_reconstruction: bool
    return_repaired: bool
    image_format: ImageFormat
    weights: Components
    threshold: float
    anomaly_map_input_size: bool
    def __init__(self, return_anomaly_map: _Optional[bool] = ..., return_reconstruction: _Optional[bool] = ..., return_repaired: _Optional[bool] = ..., image_format: _Optional[_Union[ImageFormat, str]] = ..., weights: _Optional[_Union[Components, _Mapping]] = ..., threshold: _Optional[float] = ..., anomaly_map_input_size: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("images", "options", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: ScoreOptions
    model_name: str
    model_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("top", "left", "height", "width")
    TOP_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    top: int
    left: int
    height: int
    width: int
    def __init__(self, top: _Optional[int] = ..., left: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class ImageScore(_message.Message):
    __slots__ = ("id", "score", "is_outlier", "tail_probability", "threshold", "components", "anomaly_map", "reconstruction", "repaired", "repair_mask", "region", "input_height", "input_width", "conversion", "class_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    IS_OUTLIER_FIELD_NUMBER: _ClassVar[int]
    TAIL_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_MAP_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    REPAIR_MASK_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    is_outlier: bool
    tail_probability: float
    threshold: float
    components: Components
    anomaly_map: Image
    reconstruction: Image
    repaired: Image
    repair_mask: Image
    region: Region
    input_height: int
    input_width: int
    conversion: str
    class_id: int
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., is_outlier: _Optional[bool] = ..., tail_probability: _Optional[float] = ..., threshold: _Optional[float] = ..., components: _Optional[_Union[Components, _Mapping]] = ..., anomaly_map: _Optional[_Union[Image, _Mapping]] = ..., reconstruction: _Optional[_Union[Image, _Mapping]] = ..., repaired: _Optional[_Union[Image, _Mapping]] = ..., repair_mask: _Optional[_Union[Image, _Mapping]] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., conversion: _Optional[str] = ..., class_id: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "model_name", "model_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ImageScore]
    model_name: str
    model_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[ImageScore, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class InpaintRequest(_message.Message):
    __slots__ = ("images", "masks", "image_format", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    masks: _containers.RepeatedCompositeFieldContainer[Image]
    image_format: ImageFormat
    model_name: str
    model_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., masks: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., image_format: _Optional[_Union[ImageFormat, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class InpaintedImage(_message.Message):
    __slots__ = ("id", "image")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: Image
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class InpaintResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[InpaintedImage]
    def __init__(self, results: _Optional[_Iterable[_Union[InpaintedImage, _Mapping]]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("n", "seed", "temperature", "image_format", "model_name", "model_version", "class_id")
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    n: int
    seed: int
    temperature: float
    image_format: ImageFormat
    model_name: str
    model_version: str
    class_id: int
    def __init__(self, n: _Optional[int] = ..., seed: _Optional[int] = ..., temperature: _Optional[float] = ..., image_format: _Optional[_Union[ImageFormat, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., class_id: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("images", "seed", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    seed: int
    model_name: str
    model_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., seed: _Optional[int] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class InterpolateRequest(_message.Message):
    __slots__ = ("a", "b", "steps", "method", "image_format", "model_name", "model_version")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    a: Image
    b: Image
    steps: int
    method: str
    image_format: ImageFormat
    model_name: str
    model_version: str
    def __init__(self, a: _Optional[_Union[Image, _Mapping]] = ..., b: _Optional[_Union[Image, _Mapping]] = ..., steps: _Optional[int] = ..., method: _Optional[str] = ..., image_format: _Optional[_Union[ImageFormat, str]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class InterpolateResponse(_message.Message):
    __slots__ = ("images", "model_name", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    model_name: str
    model_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersionState(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersionState]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersionState, _Mapping]]] = ...) -> None: ...

class ImageShape(_message.Message):
    __slots__ = ("channels", "height", "width", "resize")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    channels: int
    height: int
    width: int
    resize: str
    def __init__(self, channels: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., resize: _Optional[str] = ...) -> None: ...

class ComponentStats(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ...) -> None: ...

class CalibrationSummary(_message.Message):
    __slots__ = ("calibrated", "n", "target_fpr", "threshold", "weights", "components", "map_threshold")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ComponentStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ComponentStats, _Mapping]] = ...) -> None: ...
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    MAP_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    calibrated: bool
    n: int
    target_fpr: float
    threshold: float
    weights: Components
    components: _containers.MessageMap[str, ComponentStats]
    map_threshold: float
    def __init__(self, calibrated: _Optional[bool] = ..., n: _Optional[int] = ..., target_fpr: _Optional[float] = ..., threshold: _Optional[float] = ..., weights: _Optional[_Union[Components, _Mapping]] = ..., components: _Optional[_Mapping[str, ComponentStats]] = ..., map_threshold: _Optional[float] = ...) -> None: ...

class BatchingSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_delay_ms", "max_images_per_request", "max_image_pixels", "max_message_bytes")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_delay_ms: float
    max_images_per_request: int
    max_image_pixels: int
    max_message_bytes: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_images_per_request: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "image", "latent_dim", "feature_dim", "calibration", "providers", "batching", "anomaly_map_full_scale", "class_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_MAP_FULL_SCALE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    image: ImageShape
    latent_dim: int
    feature_dim: int
    calibration: CalibrationSummary
    providers: _containers.RepeatedScalarFieldContainer[str]
    batching: BatchingSettings
    anomaly_map_full_scale: float
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., image: _Optional[_Union[ImageShape, _Mapping]] = ..., latent_dim: _Optional[int] = ..., feature_dim: _Optional[int] = ..., calibration: _Optional[_Union[CalibrationSummary, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ..., batching: _Optional[_Union[BatchingSettings, _Mapping]] = ..., anomaly_map_full_scale: _Optional[float] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...
