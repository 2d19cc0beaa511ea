"""The one way from (architecture, mask, weights) to a physically pruned model (a ViT or a Swin);
files are read by `models.load_pruned`, which builds its model here."""
from typing import Dict, Optional, Union

import torch

from models.mask import PruneMask, SwinMask
from models.slicing import deploy_state_dict, deploy_swin_state_dict
from models.swin_arch import SwinArch
from models.swin_deploy import DeploySwin
from models.swin_gated import GatedSwin
from models.vit_arch import ViTArch
from models.vit_deploy import DeployViT
from models.vit_gated import GatedViT

Tensor = torch.Tensor
Arch = Union[ViTArch, SwinArch]  # the architecture record of either family


def build_gated_model(arch: Arch, mask_aware_norm: bool = False) -> Union[GatedViT, GatedSwin]:
    """The gated model (all gates 1) of `arch`, random timm-style initial weights."""
    return (GatedSwin if arch.family == "swin" else GatedViT)(arch, mask_aware_norm=mask_aware_norm)


def build_deploy_model(arch: Arch, mask: Optional[Union[PruneMask, SwinMask]] = None, *,
                       weights: Optional[Dict[str, Tensor]] = None,
                       structure: Optional[dict] = None) -> Union[DeployViT, DeploySwin]:
    """The deploy model of `arch` pruned by `mask`.

    Args:
        arch: the unpruned architecture.
        mask: the kept units (checked to fit `arch`); None: `structure`, or unpruned.
        weights: unpruned-shape weights (gated or plain timm/DeiT) to slice by `mask` (strict load).
        structure: {'width', 'heads', 'hidden'} when only the pruned shape is known (no mask); a Swin's
            'width' is one per stage.

    Without weights the model has random (timm-style) initial weights.
    """
    if mask is not None and structure is not None:
        raise ValueError("pass the mask or the structure, not both")
    if weights is not None and mask is None:
        raise ValueError("slicing unpruned weights needs the mask")
    if mask is not None:
        mask.check_fits(arch)
        structure = mask.structure()
    swin = arch.family == "swin"
    model = (DeploySwin if swin else DeployViT)(arch, **(structure or {}))
    if weights is not None:
        slicer = deploy_swin_state_dict if swin else deploy_state_dict
        model.load_state_dict(slicer(mask, weights, arch), strict=True)
    return model
