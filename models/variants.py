"""Named DeiT architectures, each registered as a gated model and as a `_deploy` model.

The names are the ones DeiT users know (`deit_base_patch16_224`, ...); the `deit_test_*`
entries are tiny configurations for tests and the offline demo.
"""
from typing import Dict

from models.deit_base import DeiTArch
from models.deit_deploy import DeployDeiT
from models.deit_gated import GatedDeiT
from models.registry import register_model
from models.slicing import deploy_structure

DEPLOY_SUFFIX = "_deploy"

ARCHS: Dict[str, DeiTArch] = {
    "deit_tiny_patch16_224": DeiTArch(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": DeiTArch(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": DeiTArch(embed_dim=768, depth=12, num_heads=12),
    "deit_tiny_distilled_patch16_224": DeiTArch(embed_dim=192, depth=12, num_heads=3, distilled=True),
    "deit_small_distilled_patch16_224": DeiTArch(embed_dim=384, depth=12, num_heads=6, distilled=True),
    "deit_base_distilled_patch16_224": DeiTArch(embed_dim=768, depth=12, num_heads=12, distilled=True),
    # tiny configurations (head dim 16) for tests and the offline demo
    "deit_test_patch8_32": DeiTArch(embed_dim=64, depth=3, num_heads=4, img_size=32, patch_size=8, num_classes=10),
    "deit_test_distilled_patch8_32": DeiTArch(embed_dim=64, depth=3, num_heads=4, img_size=32, patch_size=8,
                                              num_classes=10, distilled=True),
    "deit_demo_patch8_32": DeiTArch(embed_dim=96, depth=6, num_heads=6, img_size=32, patch_size=8, num_classes=10),
}


def is_deploy_name(name: str) -> bool:
    return name.endswith(DEPLOY_SUFFIX)


def gated_name_of(name: str) -> str:
    return name[: -len(DEPLOY_SUFFIX)] if is_deploy_name(name) else name


def arch_of(name: str, **kwargs) -> DeiTArch:
    """The architecture of a registered gated or deploy name, with create_model kwargs applied."""
    return ARCHS[gated_name_of(name)].with_options(**kwargs)


def _register(name: str) -> None:
    def gated(**kwargs) -> GatedDeiT:
        mask_aware_norm = kwargs.pop("mask_aware_norm", False)
        return GatedDeiT(arch_of(name, **kwargs), mask_aware_norm=mask_aware_norm)

    def deploy(mask=None, **kwargs) -> DeployDeiT:
        """Unpruned structure without `mask`; the mask's structure (random weights) with it."""
        arch = arch_of(name, **kwargs)
        if mask is None:
            return DeployDeiT(arch)
        mask.check_fits(arch)
        return DeployDeiT(arch, **deploy_structure(mask))

    gated.__name__ = name
    deploy.__name__ = name + DEPLOY_SUFFIX
    register_model(gated)
    register_model(deploy)


for _name in ARCHS:
    _register(_name)
