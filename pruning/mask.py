"""The pruned components, their groups and the shapes of their criteria (the mask itself is
`models.mask.PruneMask`).

A component's units come in groups: a block's heads, a block's MLP neurons, and the embedding
channels -- one group in a ViT (the shared vector), one per stage in a Swin. A ViT's criteria are
[depth, units] arrays (embedding: [D]); a Swin's groups differ in size, so each of its criteria is
one flat vector, the groups in order (blocks in stage order; stages).
"""
from typing import Dict, List, Tuple

import numpy as np

from models.mask import COMPONENTS

__all__ = ["COMPONENTS", "component_shapes", "criteria_shapes", "group_sizes", "group_of", "group_offsets"]


def group_sizes(arch) -> Dict[str, List[int]]:
    """Units in each group of each component of `arch` (a `ViTArch` or `SwinArch`)."""
    if arch.family == "swin":
        return {"heads": arch.block_heads(), "mlp": arch.block_hidden(), "embed": list(arch.widths)}
    return {"heads": [arch.num_heads] * arch.depth, "mlp": [arch.mlp_hidden] * arch.depth, "embed": [arch.embed_dim]}


def component_shapes(arch) -> Dict[str, Tuple[int, int]]:
    """(blocks, units per block) of each component of a ViT; the embedding is one block."""
    return {"heads": (arch.depth, arch.num_heads), "mlp": (arch.depth, arch.mlp_hidden), "embed": (1, arch.embed_dim)}


def criteria_shapes(arch) -> Dict[str, Tuple[int, ...]]:
    """Shapes of each component's criteria: a ViT's [depth, heads], [depth, mlp hidden], [embed dim];
    a Swin's flat [units of all groups]."""
    if arch.family == "swin":
        return {c: (sum(sizes),) for c, sizes in group_sizes(arch).items()}
    return {c: (n,) if c == "embed" else (blocks, n) for c, (blocks, n) in component_shapes(arch).items()}


def group_offsets(sizes: List[int]) -> np.ndarray:
    """Flat index of each group's first unit (and the total at the end)."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def group_of(flat: np.ndarray, sizes: List[int]) -> np.ndarray:
    """The group of each flat unit index."""
    return np.searchsorted(group_offsets(sizes), np.asarray(flat), side="right") - 1
