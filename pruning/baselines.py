"""Baseline criteria and masks for the ablation of SAViT (benchmarks/ablation.py): weight magnitude
criteria, random masks and uniform-fraction masks, with the units chosen by `pruning.selection`.
"""
import functools
from typing import Dict, Mapping, Tuple

import torch

from models.vit_arch import ViTArch
from pruning.flops import mask_macs
from models.mask import PruneMask
from pruning.mask import COMPONENTS, criteria_shapes
from pruning.selection import counts_from_ratios, mask_from_counts
from utils import UserError

Tensor = torch.Tensor


def magnitude_criteria(state_dict: Mapping[str, Tensor], arch: ViTArch) -> Dict[str, Tensor]:
    """L1 norm of the weight-matrix entries each unit owns: those the deploy model loses with the unit.

    In the criteria format of `pruning.scoring`, so it can go through `pruning.search.prune`.
    Only weight MATRICES (Linear and conv weights) count; biases, LayerNorm affine parameters,
    tokens and `pos_embed` are per-channel vectors, not connections between units. A head owns its
    3 * head_dim rows of `qkv.weight` and head_dim columns of `proj.weight`; neuron j row j of `fc1`
    and column j of `fc2`; embedding channel d filter d of `patch_embed.proj`, column d of every `qkv`
    and `fc1` (they read it), row d of every `proj` and `fc2` (they write it) and of the classifier(s).

    Args:
        state_dict: weights of a (gated or deploy, unpruned) ViT of architecture `arch`.
        arch: the unpruned architecture.

    Returns:
        {'heads': [depth, num_heads], 'mlp': [depth, mlp_hidden], 'embed': [embed_dim]}, float64.
    """
    H, hd, D = arch.num_heads, arch.head_dim, arch.embed_dim
    weight = functools.partial(_abs_weight, state_dict)
    heads = torch.zeros(arch.depth, H, dtype=torch.float64)
    mlp = torch.zeros(arch.depth, arch.mlp_hidden, dtype=torch.float64)
    embed = weight("patch_embed.proj.weight").reshape(D, -1).sum(1)
    for key in ("head.weight", "head_dist.weight"):
        if key in state_dict:
            embed = embed + weight(key).sum(0)
    for i in range(arch.depth):
        qkv, proj = weight(f"blocks.{i}.attn.qkv.weight"), weight(f"blocks.{i}.attn.proj.weight")
        fc1, fc2 = weight(f"blocks.{i}.mlp.fc1.weight"), weight(f"blocks.{i}.mlp.fc2.weight")
        # qkv rows are ordered (q|k|v, head, head_dim); proj columns (head, head_dim)
        heads[i] = qkv.reshape(3, H, hd, D).sum(dim=(0, 2, 3)) + proj.reshape(D, H, hd).sum(dim=(0, 2))
        mlp[i] = fc1.sum(1) + fc2.sum(0)
        embed = embed + qkv.sum(0) + proj.sum(1) + fc1.sum(0) + fc2.sum(1)
    return {"heads": heads, "mlp": mlp, "embed": embed}


def _abs_weight(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise UserError(f"magnitude criteria: the weights have no '{key}' (not an unpruned ViT of this model?)")
    return state_dict[key].detach().to("cpu", torch.float64).abs()


def pruned_counts(mask: PruneMask) -> Dict[str, int]:
    """Units pruned per component by `mask`."""
    kept, total = mask.kept_counts(), mask.total_counts()
    return {c: total[c] - kept[c] for c in COMPONENTS}


def random_mask_with_counts(arch: ViTArch, counts: Mapping[str, int], seed: int, protect: bool = True,
                            model: str = "") -> PruneMask:
    """`counts[c]` units of each component chosen uniformly at random (seeded): `mask_from_counts` of
    random scores, so no block loses more units than SAViT's own rule allows.

    Args:
        arch: the unpruned architecture.
        counts: units to prune per component.
        seed: seed of a private generator (same seed, same mask).
        protect: keep a random max(1, int(0.05 n)) units of every block (as SAViT keeps its top ones).
        model: model name stored in the mask.
    """
    g = torch.Generator().manual_seed(int(seed))
    scores = {c: torch.rand(shape, generator=g, dtype=torch.float64) for c, shape in criteria_shapes(arch).items()}
    return mask_from_counts(scores, arch, counts, protect, model)


def uniform_mask(scores: Mapping[str, Tensor], arch: ViTArch, target: float, protect: bool = True,
                 model: str = "", iterations: int = 60) -> Tuple[PruneMask, float]:
    """The same pruned fraction r of every component, r meeting the FLOPs target on the exact count.

    The counts are `pruning.selection.counts_from_ratios(r)` (round(r * total), clipped to what is
    prunable), the units `mask_from_counts(scores, ...)`. The reduction is non-decreasing in r;
    bisection finds the smallest r reaching the target and the closer of it and its predecessor
    count is returned.

    Args:
        scores: criteria choosing the units (e.g. the first-order criteria of method 2).
        arch: the unpruned architecture.
        target: fraction of the FLOPs to remove, in (0, 1).
        protect: protection (as in `mask_from_counts`).
        model: model name stored in the mask.
        iterations: bisection steps on r.

    Returns:
        (mask, r).
    """
    if not 0 < target < 1:
        raise UserError(f"uniform mask: the FLOPs target must be in (0, 1), got {target!r}")
    build = functools.partial(_uniform, scores, arch, protect, model, mask_macs(arch)["total"])
    lo, hi = 0.0, 1.0
    if build(hi)[1] < target:
        raise UserError(f"uniform mask: pruning every prunable unit removes only {build(hi)[1]:.2%} "
                        f"of the FLOPs, less than the target {target:.2%}")
    for _ in range(iterations):  # invariant: reduction(lo) < target <= reduction(hi)
        mid = 0.5 * (lo + hi)
        if build(mid)[1] >= target:
            hi = mid
        else:
            lo = mid
    (mask_lo, red_lo), (mask_hi, red_hi) = build(lo), build(hi)
    return (mask_lo, lo) if abs(red_lo - target) < abs(red_hi - target) else (mask_hi, hi)


def _uniform(scores: Mapping[str, Tensor], arch: ViTArch, protect: bool, model: str, full: float,
             r: float) -> Tuple[PruneMask, float]:
    """The mask pruning the fraction r of every component, and its exact reduction of the MACs `full`."""
    mask = mask_from_counts(scores, arch, counts_from_ratios(arch, {c: r for c in COMPONENTS}, protect), protect, model)
    return mask, 1.0 - mask_macs(arch, mask)["total"] / full
