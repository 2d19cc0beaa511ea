"""Which units go (docs/METHOD.md section 4): per component one order over all groups (blocks;
a Swin's embedding stages), lowest criterion first, each group's top 5% protected by identity;
pruning k units = the first k of the order. Shared by the search (`pruning.search`) and the
baselines (`pruning.baselines`).
"""
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from models.mask import PruneMask
from pruning.mask import COMPONENTS, criteria_shapes, group_offsets, group_sizes
from utils import UserError

PROTECT_FRACTION = 0.05
ALWAYS_KEPT = {"heads": 0, "mlp": 0, "embed": 1}  # units per block kept even without protection


def protected_count(n: int) -> int:
    """Units of a block (or of the embedding vector) that protection keeps: max(1, int(0.05 n))."""
    return max(1, int(PROTECT_FRACTION * n))


def _kept_per_block(n: int, protect: bool, min_keep: int) -> int:
    return max(protected_count(n) if protect else 0, min_keep)


def group_limits(arch, protect: bool = True) -> Dict[str, List[int]]:
    """Largest number of units of each group of each component that may be pruned."""
    return {c: [n - _kept_per_block(n, protect, ALWAYS_KEPT[c]) for n in sizes] for c, sizes in group_sizes(arch).items()}


def max_prunable(arch, protect: bool = True) -> Dict[str, int]:
    """Largest number of units of each component that may be pruned."""
    return {c: sum(limits) for c, limits in group_limits(arch, protect).items()}


def _total_factors(sizes: List[int]):
    """(groups, units per group) when the groups are equal (a ViT's blocks), else (1, all units)."""
    return (len(sizes), sizes[0]) if len(set(sizes)) == 1 else (1, sum(sizes))


def counts_from_ratios(arch, ratios: Mapping[str, float], protect: bool = True) -> Dict[str, int]:
    """Number of units to prune per component: round(ratio * total), clipped to what is prunable.

    Args:
        arch: the unpruned architecture.
        ratios: pruned fraction of all units, per component name ('heads', 'mlp', 'embed').
        protect: whether protection is on (limits the counts).
    """
    limit = max_prunable(arch, protect)
    out = {}
    for c, sizes in group_sizes(arch).items():
        blocks, n = _total_factors(sizes)
        k = int(np.floor(float(ratios.get(c, 0.0)) * blocks * n + 0.5))
        out[c] = min(max(k, 0), limit[c])
    return out


def _normalized(rows: torch.Tensor, norm_type: int) -> torch.Tensor:
    norm = rows.abs().sum(dim=1, keepdim=True) if norm_type == 1 else rows.pow(2).sum(dim=1, keepdim=True).sqrt()
    return rows / torch.where(norm > 0, norm, torch.ones_like(norm))


def normalize_by_layer(criteria: Mapping[str, torch.Tensor], norm_type: int, arch=None) -> Dict[str, torch.Tensor]:
    """Divide each block's scores by their L1 (type 1) or L2 (type 2) norm (`--pruning_normalize_by_layer`).

    The embedding vector counts as one block (a Swin's: one per stage). Blocks whose norm is 0 are
    left unchanged.

    Args:
        criteria: {'heads': [depth, H], 'mlp': [depth, M], 'embed': [D]} (a Swin's: flat vectors).
        norm_type: 1 or 2 (`--pruning_normalize_type`).
        arch: needed for a Swin's flat criteria (where its groups begin).
    """
    if norm_type not in (1, 2):
        raise UserError(f"must be 1 (L1) or 2 (L2), got {norm_type!r}", field="pruning_normalize_type")
    if arch is None and any(torch.as_tensor(criteria[c]).dim() == 1 for c in ("heads", "mlp") if c in criteria):
        raise ValueError("flat (Swin) criteria need the `arch` that says where their groups begin")
    sizes = group_sizes(arch) if arch is not None and arch.family == "swin" else None
    out = {}
    for name, value in criteria.items():
        t = torch.as_tensor(value)
        if sizes is not None:
            out[name] = torch.cat([_normalized(g.reshape(1, -1), norm_type).reshape(-1)
                                   for g in t.split(sizes[name])])
        else:
            out[name] = _normalized(t.reshape(1, -1) if t.dim() == 1 else t, norm_type).reshape(t.shape)
    return out


def _as_blocks(scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    s = np.array(scores, dtype=np.float64)
    return s.reshape(1, -1) if s.ndim == 1 else s


def criteria_flat(criteria: Mapping[str, torch.Tensor], arch) -> Dict[str, np.ndarray]:
    """Each component's criteria as one flat float64 array (groups in order), checked against `arch`
    (shape, finite)."""
    out = {}
    for c, shape in criteria_shapes(arch).items():
        if c not in criteria:
            raise UserError(f"criteria have no entry '{c}' (expected keys {', '.join(COMPONENTS)})")
        value = criteria[c]
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float64).numpy()
        s = np.array(value, dtype=np.float64)
        if s.shape != tuple(shape):
            raise UserError(f"criteria '{c}' have shape {list(s.shape)}, the model needs {list(shape)}")
        if not np.all(np.isfinite(s)):
            raise UserError(f"criteria '{c}' contain non-finite values")
        out[c] = s.reshape(-1)
    return out


def pruning_order(scores, protect: bool = True, min_keep: int = 0, sizes: Optional[Sequence[int]] = None) -> np.ndarray:
    """Flat indices of the prunable units, lowest criterion first.

    Protection removes from the order the top max(1, int(0.05 n)) units of every group (block) BY
    IDENTITY (they get +inf; ties protect the lower index); ties in the order go to the lower
    flat index. `min_keep` units per group are kept even without protection.

    Args:
        scores: criteria, [blocks, n] (flat index block * n + unit), or flat [units].
        protect: whether to protect the top 5% of every group.
        min_keep: units per group never pruned regardless of `protect`.
        sizes: units of each group of flat `scores` (default: one group).
    """
    s = _as_blocks(scores)
    if sizes is None:
        sizes = [s.shape[1]] * s.shape[0]
    s = s.reshape(-1).copy()
    offsets, prunable = group_offsets(list(sizes)), 0
    for start, n in zip(offsets, sizes):
        keep = _kept_per_block(n, protect, min_keep)
        if keep:
            s[start + np.argsort(-s[start:start + n], kind="stable")[:keep]] = np.inf
        prunable += n - keep
    return np.argsort(s, kind="stable")[:prunable]


def component_orders(criteria: Mapping[str, np.ndarray], arch, protect: bool) -> Dict[str, np.ndarray]:
    """`pruning_order` of each component's flat criteria (`criteria_flat`)."""
    sizes = group_sizes(arch)
    return {c: pruning_order(criteria[c], protect, ALWAYS_KEPT[c], sizes[c]) for c in COMPONENTS}


def select_units(scores, k: int, protect: bool = True, min_keep: int = 0) -> np.ndarray:
    """Boolean array (shape of `scores`), True for the exactly k pruned units (ONE global threshold).

    Args:
        scores: criteria of one component, [blocks, n] or [n]; larger = more important.
        k: number of units to prune.
        protect: protect each block's top 5% by identity.
        min_keep: units per block never pruned regardless of `protect`.
    """
    order = pruning_order(scores, protect, min_keep)
    if not 0 <= k <= len(order):
        raise ValueError(f"cannot prune {k} units: only {len(order)} are prunable")
    shape = np.shape(scores.detach() if isinstance(scores, torch.Tensor) else scores)
    pruned = np.zeros(int(np.prod(shape)), dtype=bool)
    pruned[order[:k]] = True
    return pruned.reshape(shape)


def block_sequences(order: np.ndarray, sizes: Sequence[int]) -> List[np.ndarray]:
    """Each group's part of a component's order: its prunable units (indices within the group),
    lowest criterion first. Pruning the first k_b of group b's sequence prunes by criterion in it."""
    order, offsets = np.asarray(order), group_offsets(list(sizes))
    return [order[(order >= start) & (order < start + n)] - start for start, n in zip(offsets, sizes)]


def mask_from_orders(arch, orders: Mapping[str, np.ndarray], counts: Mapping[str, Union[int, Sequence[int]]],
                     model: str = "") -> PruneMask:
    """The mask that prunes the first `counts[c]` units of each component's order (missing = 0).

    A count may also be a list, one count per group: the first `counts[c][b]` units of group
    b's part of the order (`block_sequences`), as the hardware-aligned widths need."""
    kept = {}
    for c, sizes in group_sizes(arch).items():
        pruned = np.zeros(sum(sizes), dtype=bool)
        count = counts.get(c, 0)
        if np.ndim(count) == 0:
            pruned[orders[c][: int(count)]] = True
        else:
            for b, (start, seq) in enumerate(zip(group_offsets(sizes), block_sequences(orders[c], sizes))):
                pruned[start + seq[: int(count[b])]] = True
        kept[c] = [np.flatnonzero(~row).tolist() for row in np.split(pruned, group_offsets(sizes)[1:-1])]
    full = PruneMask.full(arch, model)
    return replace(full, heads=kept["heads"], mlp=kept["mlp"],
                   embed=kept["embed"] if arch.family == "swin" else kept["embed"][0])


def mask_from_counts(scores: Mapping[str, torch.Tensor], arch, counts: Mapping[str, int],
                     protect: bool = True, model: str = "") -> PruneMask:
    """Prune `counts[c]` units of each component c: the lowest scores, one global threshold per component.

    Args:
        scores: {'heads': [depth, heads], 'mlp': [depth, hidden], 'embed': [D]} (a Swin's: flat);
            larger = more important.
        arch: the unpruned architecture.
        counts: units to prune per component (missing = 0).
        protect: never prune the top max(1, int(0.05 n)) units of a group (embedding: of the vector, or stage).
        model: model name stored in the mask.
    """
    orders = component_orders(criteria_flat(scores, arch), arch, protect)
    for c in COMPONENTS:
        k = int(counts.get(c, 0))
        if not 0 <= k <= len(orders[c]):
            raise UserError(f"cannot prune {k} {c}: at most {len(orders[c])} are prunable"
                            f"{' with protection' if protect else ''}")
    return mask_from_orders(arch, orders, counts, model)
