"""The pruned components and the shapes of their criteria (the mask itself is `models.mask.PruneMask`)."""
from typing import Dict, Tuple

from models.mask import COMPONENTS

__all__ = ["COMPONENTS", "component_shapes", "criteria_shapes"]


def component_shapes(arch) -> Dict[str, Tuple[int, int]]:
    """(blocks, units per block) of each component of `arch` (a `ViTArch`); the embedding is one block."""
    return {"heads": (arch.depth, arch.num_heads), "mlp": (arch.depth, arch.mlp_hidden), "embed": (1, arch.embed_dim)}


def criteria_shapes(arch) -> Dict[str, Tuple[int, ...]]:
    """Shapes of each component's criteria: [depth, heads], [depth, mlp hidden], [embed dim]."""
    return {c: (n,) if c == "embed" else (blocks, n) for c, (blocks, n) in component_shapes(arch).items()}
