"""The project's own model registry, falling back to timm for every other name.

The gated DeiT names (`deit_base_patch16_224`, ...) are the same as timm's, so the
project keeps its own table instead of registering into timm's: timm's entries stay
untouched and teachers such as `regnety_160` still come from timm.
"""
from typing import Callable, Dict, List

import timm
import torch.nn as nn

from utils import UserError

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `fn` under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    return sorted(_MODELS)


def is_project_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: the project's gated/deploy DeiTs first, then any timm model.

    Timm models are built without pretrained weights (no downloads); load weights
    from a file instead.
    """
    if name in _MODELS:
        return _MODELS[name](**kwargs)
    if name in timm.list_models():
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return timm.create_model(name, pretrained=False, **kwargs)
    raise UserError(
        f"unknown model {name!r}; this project's models are: {', '.join(list_models())} "
        f"(any other timm model name is accepted too, e.g. regnety_160)"
    )
