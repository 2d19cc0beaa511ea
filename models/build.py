"""The one way from (architecture, mask, weights) to a physically pruned model; files are read
by `models.load_pruned`, which builds its model here."""
from typing import Dict, Optional

import torch

from models.mask import PruneMask
from models.slicing import deploy_state_dict
from models.vit_arch import ViTArch
from models.vit_deploy import DeployViT

Tensor = torch.Tensor


def build_deploy_model(arch: ViTArch, mask: Optional[PruneMask] = None, *,
                       weights: Optional[Dict[str, Tensor]] = None, structure: Optional[dict] = None) -> DeployViT:
    """The deploy model of `arch` pruned by `mask`.

    Args:
        arch: the unpruned architecture.
        mask: the kept units (checked to fit `arch`); None: `structure`, or unpruned.
        weights: unpruned-shape weights (gated or plain timm/DeiT) to slice by `mask` (strict load).
        structure: {'width', 'heads', 'hidden'} when only the pruned shape is known (no mask).

    Without weights the model has random (timm-style) initial weights.
    """
    if mask is not None and structure is not None:
        raise ValueError("pass the mask or the structure, not both")
    if weights is not None and mask is None:
        raise ValueError("slicing unpruned weights needs the mask")
    if mask is not None:
        mask.check_fits(arch)
        structure = mask.structure()
    model = DeployViT(arch, **(structure or {}))
    if weights is not None:
        model.load_state_dict(deploy_state_dict(mask, weights, arch), strict=True)
    return model
