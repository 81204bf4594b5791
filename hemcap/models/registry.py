"""The backend registry: one line per backend, ``name -> "module:Class"``.

A backend is one module holding a class that follows ``hemcap.models.base.Backend`` (most
subclass ``BaseBackend``). Adding one is that module plus one line in ``BACKENDS`` (or, from
outside hemcap, one ``register_backend`` call). Classes are imported on first use, so this
module imports neither torch nor transformers and ``hemcap.config`` can check names against it.
"""

from __future__ import annotations

import importlib

BACKENDS: dict[str, str | type] = {
    "blip": "hemcap.models.blip:BlipBackend",
    "chat": "hemcap.models.chat:ChatBackend",
}
# The methods and attributes a backend class must have (the Protocol in base.py documents them).
REQUIRED = ("kind", "model_types", "build_scratch", "load_model", "load_processor", "collate", "generate_scored",
            "stop_token_ids", "configure", "save", "image_size", "tokenizer")


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def register_backend(name: str, target: str | type) -> None:
    """Add a backend: a class, or ``"module:Class"`` imported on first use."""
    if not isinstance(target, str):
        _check_class(name, target)
    BACKENDS[name] = target


def backend_class(name: str) -> type:
    """The class registered as ``name``; a ValueError listing the known names otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    target = BACKENDS[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _check_class(name, target)
        BACKENDS[name] = target
    return target


def backend_for_model_type(model_type: str) -> str:
    """The backend that runs an HF config's ``model_type``: the one listing it, else the one listing ``*``."""
    classes = {name: backend_class(name) for name in BACKENDS}
    for wanted in (model_type, "*"):
        found = [name for name, cls in classes.items() if wanted in cls.model_types]
        if found:
            return found[0]
    raise ValueError(f"no backend runs model_type {model_type!r} (backends: {', '.join(BACKENDS)})")


def _check_class(name: str, cls: type) -> None:
    missing = [attribute for attribute in REQUIRED if not hasattr(cls, attribute)]
    if missing:
        raise TypeError(f"backend {name!r} ({cls.__qualname__}) lacks {', '.join(missing)} "
                        "(see hemcap.models.base.Backend)")
