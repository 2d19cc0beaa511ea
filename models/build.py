"""The one way from (architecture, mask, weights) to a physically pruned model.

main.py, main_deploy.py, `models.load_pruned`, the teacher loader, `pruning.flops`, the demo
summary and the benchmarks all build their deploy model here.
"""
from typing import Dict, Optional

import torch

from models.slicing import deploy_state_dict, deploy_structure
from models.vit_arch import ViTArch
from models.vit_deploy import DeployViT

Tensor = torch.Tensor


def build_deploy_model(arch: ViTArch, mask=None, *, weights: Optional[Dict[str, Tensor]] = None,
                       deploy_weights: Optional[Dict[str, Tensor]] = None,
                       structure: Optional[dict] = None) -> DeployViT:
    """The deploy model of `arch` pruned by `mask`.

    Args:
        arch: the unpruned architecture.
        mask: kept-unit lists (`heads`, `mlp`, `embed`, with `depth`, `num_heads`, `head_dim`):
            a `pruning.mask.PruneMask` or a checkpoint's recorded mask. None: `structure`, or unpruned.
        weights: unpruned-shape weights (gated or plain timm/DeiT) to slice by `mask` (strict load).
        deploy_weights: weights already in the pruned shape (strict load).
        structure: {'width', 'heads', 'hidden'} when only the pruned shape is known (no mask);
            must agree with the mask's when both are given.

    Without weights the model has random (timm-style) initial weights.
    """
    if weights is not None and deploy_weights is not None:
        raise ValueError("pass either unpruned weights to slice or deploy weights, not both")
    if mask is not None:
        if hasattr(mask, "check_fits"):  # a PruneMask checks itself; a recorded mask is checked on reading
            mask.check_fits(arch)
        from_mask = deploy_structure(mask)
        if structure is not None and structure != from_mask:
            raise ValueError(f"structure {structure} differs from the mask's {from_mask}")
        structure = from_mask
    if weights is not None and mask is None:
        raise ValueError("slicing unpruned weights needs the mask")
    model = DeployViT(arch, **(structure or {}))
    if weights is not None:
        model.load_state_dict(deploy_state_dict(mask, weights, arch), strict=True)
    elif deploy_weights is not None:
        model.load_state_dict(deploy_weights, strict=True)
    return model
