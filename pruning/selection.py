"""Which units go (docs/METHOD.md section 4): per component one order over all blocks, lowest
criterion first, each block's top 5% protected by identity; pruning k units = the first k of the
order. Shared by the search (`pruning.search`) and the baselines (`pruning.baselines`).
"""
from typing import Dict, List, Mapping, Sequence, Union

import numpy as np
import torch

from models.vit_arch import ViTArch
from models.mask import PruneMask
from pruning.mask import COMPONENTS, component_shapes
from utils import UserError

PROTECT_FRACTION = 0.05
ALWAYS_KEPT = {"heads": 0, "mlp": 0, "embed": 1}  # units per block kept even without protection


def protected_count(n: int) -> int:
    """Units of a block (or of the embedding vector) that protection keeps: max(1, int(0.05 n))."""
    return max(1, int(PROTECT_FRACTION * n))


def _kept_per_block(n: int, protect: bool, min_keep: int) -> int:
    return max(protected_count(n) if protect else 0, min_keep)


def max_prunable(arch: ViTArch, protect: bool = True) -> Dict[str, int]:
    """Largest number of units of each component that may be pruned."""
    shapes = component_shapes(arch)
    return {c: blocks * (n - _kept_per_block(n, protect, ALWAYS_KEPT[c])) for c, (blocks, n) in shapes.items()}


def counts_from_ratios(arch: ViTArch, ratios: Mapping[str, float], protect: bool = True) -> Dict[str, int]:
    """Number of units to prune per component: round(ratio * total), clipped to what is prunable.

    Args:
        arch: the unpruned architecture.
        ratios: pruned fraction of all units, per component name ('heads', 'mlp', 'embed').
        protect: whether protection is on (limits the counts).
    """
    limit = max_prunable(arch, protect)
    out = {}
    for c, (blocks, n) in component_shapes(arch).items():
        k = int(np.floor(float(ratios.get(c, 0.0)) * blocks * n + 0.5))
        out[c] = min(max(k, 0), limit[c])
    return out


def normalize_by_layer(criteria: Mapping[str, torch.Tensor], norm_type: int) -> Dict[str, torch.Tensor]:
    """Divide each block's scores by their L1 (type 1) or L2 (type 2) norm (`--pruning_normalize_by_layer`).

    The embedding vector counts as one block. Blocks whose norm is 0 are left unchanged.

    Args:
        criteria: {'heads': [depth, H], 'mlp': [depth, M], 'embed': [D]}.
        norm_type: 1 or 2 (`--pruning_normalize_type`).
    """
    if norm_type not in (1, 2):
        raise UserError(f"must be 1 (L1) or 2 (L2), got {norm_type!r}", field="pruning_normalize_type")
    out = {}
    for name, value in criteria.items():
        t = torch.as_tensor(value)
        rows = t.reshape(1, -1) if t.dim() == 1 else t
        norm = rows.abs().sum(dim=1, keepdim=True) if norm_type == 1 else rows.pow(2).sum(dim=1, keepdim=True).sqrt()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        out[name] = (rows / norm).reshape(t.shape)
    return out


def _as_blocks(scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    s = np.array(scores, dtype=np.float64)
    return s.reshape(1, -1) if s.ndim == 1 else s


def criteria_blocks(criteria: Mapping[str, torch.Tensor], arch: ViTArch) -> Dict[str, np.ndarray]:
    """Each component's criteria as a float64 [blocks, n] array, checked against `arch` (shape, finite)."""
    out = {}
    for c, (blocks, n) in component_shapes(arch).items():
        if c not in criteria:
            raise UserError(f"criteria have no entry '{c}' (expected keys {', '.join(COMPONENTS)})")
        s = _as_blocks(criteria[c])
        if s.shape != (blocks, n) or (c == "embed" and np.ndim(criteria[c]) != 1):
            expected = f"[{arch.depth}, {n}]" if c != "embed" else f"[{n}]"
            raise UserError(f"criteria '{c}' have shape {list(np.shape(criteria[c]))}, the model needs {expected}")
        if not np.all(np.isfinite(s)):
            raise UserError(f"criteria '{c}' contain non-finite values")
        out[c] = s.reshape(blocks, n)
    return out


def pruning_order(scores, protect: bool = True, min_keep: int = 0) -> np.ndarray:
    """Flat indices (block * n + unit) of the prunable units, lowest criterion first.

    Protection removes from the order the top max(1, int(0.05 n)) units of every block BY
    IDENTITY (they get +inf; ties protect the lower index); ties in the order go to the lower
    flat index. `min_keep` units per block are kept even without protection.

    Args:
        scores: criteria, [blocks, n] or [n] (one block).
        protect: whether to protect the top 5% of every block.
        min_keep: units per block never pruned regardless of `protect`.
    """
    s = _as_blocks(scores)
    blocks, n = s.shape
    keep = _kept_per_block(n, protect, min_keep)
    if keep:
        top = np.argsort(-s, axis=1, kind="stable")[:, :keep]
        s = s.copy()
        np.put_along_axis(s, top, np.inf, axis=1)
    order = np.argsort(s.ravel(), kind="stable")
    return order[: blocks * (n - keep)]


def component_orders(blocks: Mapping[str, np.ndarray], protect: bool) -> Dict[str, np.ndarray]:
    """`pruning_order` of each component's [blocks, n] criteria."""
    return {c: pruning_order(blocks[c], protect, ALWAYS_KEPT[c]) for c in COMPONENTS}


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


def block_sequences(order: np.ndarray, blocks: int, n: int) -> List[np.ndarray]:
    """Each block's part of a component's order: its prunable units (indices within the block),
    lowest criterion first. Pruning the first k_b of block b's sequence prunes by criterion in that block."""
    order = np.asarray(order)
    return [order[order // n == b] % n for b in range(blocks)]


def mask_from_orders(arch: ViTArch, orders: Mapping[str, np.ndarray], counts: Mapping[str, Union[int, Sequence[int]]],
                     model: str = "") -> PruneMask:
    """The mask that prunes the first `counts[c]` units of each component's order (missing = 0).

    A count may also be a list, one count per block: the first `counts[c][b]` units of block
    b's part of the order (`block_sequences`), as the hardware-aligned widths need."""
    kept = {}
    for c, (blocks, n) in component_shapes(arch).items():
        pruned = np.zeros((blocks, n), dtype=bool)
        count = counts.get(c, 0)
        if np.ndim(count) == 0:
            pruned.reshape(-1)[orders[c][: int(count)]] = True
        else:
            for b, seq in enumerate(block_sequences(orders[c], blocks, n)):
                pruned[b, seq[: int(count[b])]] = True
        kept[c] = [np.flatnonzero(~row).tolist() for row in pruned]
    return PruneMask(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
                     mlp_hidden=arch.mlp_hidden, heads=kept["heads"], mlp=kept["mlp"], embed=kept["embed"][0],
                     model=model)


def mask_from_counts(scores: Mapping[str, torch.Tensor], arch: ViTArch, counts: Mapping[str, int],
                     protect: bool = True, model: str = "") -> PruneMask:
    """Prune `counts[c]` units of each component c: the lowest scores, one global threshold per component.

    Args:
        scores: {'heads': [depth, heads], 'mlp': [depth, hidden], 'embed': [D]}; larger = more important.
        arch: the unpruned architecture.
        counts: units to prune per component (missing = 0).
        protect: never prune the top max(1, int(0.05 n)) units of a block (embedding: of the vector).
        model: model name stored in the mask.
    """
    orders = component_orders(criteria_blocks(scores, arch), protect)
    for c in COMPONENTS:
        k = int(counts.get(c, 0))
        if not 0 <= k <= len(orders[c]):
            raise UserError(f"cannot prune {k} {c}: at most {len(orders[c])} are prunable"
                            f"{' with protection' if protect else ''}")
    return mask_from_orders(arch, orders, counts, model)
