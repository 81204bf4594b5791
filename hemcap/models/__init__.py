"""Model backends: the only package that knows model classes by name.

- ``base``: the ``Backend`` protocol everything else uses, and ``BaseBackend``;
- ``registry``: backend name -> class, one line each;
- ``blip``, ``chat``: the two shipped backends (``blip_attention``: BLIP's fast inference attention);
- ``info``: ``ModelInfo``, the one file that says what a model folder is;
- ``loading``: build from a config, reload a saved folder;
- ``lora``: PEFT adapters, checked targets, merging;
- ``heads``: optional attribute heads trained beside the caption loss (``model.attribute_loss``);
- ``stem``: an optional convolutional stem for a scratch vision tower (``model.vision_stem``).

Importing this package imports neither torch nor transformers.
"""

from hemcap.models.base import (
    IGNORE_INDEX, Backend, BaseBackend, Generated, ModelError, count_parameters, enable_gradient_checkpointing,
    freeze_vision, is_peft,
)
from hemcap.models.info import (
    BASE_MODEL_DIR, INFO_FILE, ModelInfo, ModelInfoError, find_model_dir, is_model_dir, read_model_info,
    write_model_info,
)
from hemcap.models.loading import load_backend, load_trained
from hemcap.models.lora import add_lora, lora_targets, merge_lora
from hemcap.models.registry import backend_class, backend_names, register_backend

__all__ = [
    "IGNORE_INDEX", "Backend", "BaseBackend", "Generated", "ModelError", "count_parameters",
    "enable_gradient_checkpointing", "freeze_vision", "is_peft", "BASE_MODEL_DIR", "INFO_FILE", "ModelInfo",
    "ModelInfoError", "find_model_dir", "is_model_dir", "read_model_info", "write_model_info", "load_backend",
    "load_trained", "add_lora", "lora_targets", "merge_lora", "backend_class", "backend_names", "register_backend",
]
