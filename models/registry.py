"""Model names: every supported timm ViT and Swin name, the project's tiny test configurations, and
`<name>_deploy` for the physically pruned form of each; any other timm model for teachers.

The architecture of a name always comes from timm's own configuration (`timm_arch`): for a
timm name, `timm.create_model(name, pretrained=False)` on the meta device; for a tiny
configuration, timm's `VisionTransformer` (or `VisionTransformerDistilled`) built with the
keyword arguments below. Nothing is registered into timm.
"""
import functools
from functools import partial
from typing import Dict, List

import timm
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from models.build import build_deploy_model, build_gated_model
from models.vit_arch import ViTArch, timm_arch
from utils import UserError

DEPLOY_SUFFIX = "_deploy"

_TINY = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=3, num_heads=4)
# tiny configurations (head dim 16) of each family, for tests and the offline demo: timm kwargs
TEST_CONFIGS: Dict[str, dict] = {
    "deit_test_patch8_32": dict(_TINY),
    "deit_test_distilled_patch8_32": dict(_TINY, distilled=True),
    "deit_demo_patch8_32": dict(_TINY, embed_dim=96, depth=6, num_heads=6),
    "vit_test_patch8_32": dict(_TINY),                                          # ViT (AugReg)
    "deit3_test_patch8_32": dict(_TINY, no_embed_class=True, init_values=1e-6),  # DeiT III
    "vit_test_reg4_gap_patch8_32": dict(_TINY, class_token=False, no_embed_class=True, global_pool="avg",
                                        reg_tokens=4),                            # registers, avg + fc_norm
    "vit_test_gap_patch8_32": dict(_TINY, class_token=False, global_pool="avg", fc_norm=False, qkv_bias=False,
                                   init_values=1e-6),                             # avg pool, no fc_norm
    "vit_test_prenorm_qknorm_patch8_32": dict(_TINY, pre_norm=True, qk_norm=True, eps=1e-5),  # CLIP-like
}
# the tiny Swin (timm SwinTransformer kwargs): 4 stages on a 16x16 patch grid, windows of 4 (shifted in
# stages 0-1; in stages 2-3 one window covers the grid), head dim 16
SWIN_TEST_CONFIGS: Dict[str, dict] = {
    "swin_test_patch2_window4_32": dict(img_size=32, patch_size=2, num_classes=10, embed_dim=32,
                                        depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4),
}


def build_timm_test_model(name: str, **overrides) -> nn.Module:
    """timm's own model for a tiny configuration (random weights): the reference the tests compare to."""
    if name in SWIN_TEST_CONFIGS:
        return SwinTransformer(**dict(SWIN_TEST_CONFIGS[name], **overrides))
    kwargs = dict(TEST_CONFIGS[name], **overrides)
    cls = VisionTransformerDistilled if kwargs.pop("distilled", False) else VisionTransformer
    eps = kwargs.pop("eps", None)
    if eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=eps)
    return cls(**kwargs)


def is_deploy_name(name: str) -> bool:
    return name.endswith(DEPLOY_SUFFIX)


def gated_name_of(name: str) -> str:
    return name[: -len(DEPLOY_SUFFIX)] if is_deploy_name(name) else name


@functools.lru_cache(maxsize=None)
def _base_arch(name: str) -> ViTArch:
    if name in TEST_CONFIGS or name in SWIN_TEST_CONFIGS:
        return timm_arch(name, build=lambda: build_timm_test_model(name))
    if timm.is_model(name):
        return timm_arch(name)  # a one-line UserError for a model it cannot prune
    raise UserError(f"unknown model {name!r}: expected a timm ViT or Swin name (e.g. vit_base_patch16_224, "
                    f"deit_small_patch16_224, deit3_base_patch16_224, swin_tiny_patch4_window7_224) "
                    f"or one of {', '.join(list(TEST_CONFIGS) + list(SWIN_TEST_CONFIGS))}")


def arch_of(name: str, **kwargs) -> ViTArch:
    """The architecture of a gated or `_deploy` name, with create_model kwargs applied.

    Raises UserError, in one line, for an unknown name or a model SAViT cannot prune."""
    return _base_arch(gated_name_of(name)).with_options(**kwargs)


def is_prunable(name: str) -> bool:
    try:
        arch_of(name)
    except UserError:
        return False
    return True


def list_models() -> List[str]:
    """The tiny configurations (each also with `_deploy`); timm's ViT names work as well."""
    tiny = list(TEST_CONFIGS) + list(SWIN_TEST_CONFIGS)
    return sorted(tiny + [n + DEPLOY_SUFFIX for n in tiny])


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name (random weights; load weights from a file).

    A prunable ViT name gives the gated model (`mask_aware_norm=...` allowed); `<name>_deploy`
    the deploy model (`width`, `heads`, `hidden`: the pruned structure, unpruned without them);
    any other timm name (teachers such as `regnety_160`) timm's model, built with pretrained=False.
    """
    gated_name = gated_name_of(name)
    if is_prunable(gated_name):
        if is_deploy_name(name):
            structure = {k: kwargs.pop(k) for k in ("width", "heads", "hidden") if kwargs.get(k) is not None}
            return build_deploy_model(arch_of(name, **kwargs), structure=structure or None)
        mask_aware_norm = kwargs.pop("mask_aware_norm", False)
        return build_gated_model(arch_of(name, **kwargs), mask_aware_norm=mask_aware_norm)
    if not is_deploy_name(name) and timm.is_model(name):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return timm.create_model(name, pretrained=False, **kwargs)
    arch_of(name)  # raises the one-line reason
    raise AssertionError("unreachable")
