"""The estimator of the 3x3 interaction matrix C (docs/METHOD.md section 3).

Per batch: the block draws, then one Hessian-vector product per row of C, each term divided by
its normaliser N[i, j] = n_i * n_j; the pass (`pruning.importance`) divides C by the batch count.
"""
import random
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

from models.deit_base import DeiTArch


def interaction_normalisers(arch: DeiTArch, hessian_embed: float) -> torch.Tensor:
    """N[i, j] = n_i * n_j with n = (D, mlp hidden, D * depth * hessian_embed), float64 [3, 3]."""
    d = float(arch.embed_dim)
    n = torch.tensor([d, float(arch.mlp_hidden), d * arch.depth * hessian_embed], dtype=torch.float64)
    return n[:, None] * n[None, :]


@dataclass(frozen=True)
class BlockDraw:
    """The random blocks of one batch: `l` for g_i, `m[i][j]` for g_j (j = 0 heads, 1 mlp); m[2] (the
    embedding row) is always (0, 0), as in the reference."""

    l: int
    m: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def block_draw(seed: int, batch_index: int, depth: int) -> BlockDraw:
    """Draw the blocks of batch `batch_index` from a private generator.

    They depend on the GLOBAL batch index only, so batches sharded over processes see the same
    draws as in one process.

    Args:
        seed: the run's seed.
        batch_index: the global index of the batch in the pass (not the per-process one).
        depth: the number of blocks.
    """
    rng = random.Random(f"savit-interactions:{seed}:{batch_index}")  # str seeds hash with sha512: stable
    l = rng.randrange(depth)
    # heads and MLP rows: m in [0, l] per pair (the reference draws m per pair); embedding row: block 0
    m = tuple((rng.randint(0, l), rng.randint(0, l)) for _ in range(2)) + ((0, 0),)
    return BlockDraw(l, m)


def add_interactions(C: torch.Tensor, normalisers: torch.Tensor, gates: Sequence[torch.Tensor],
                     grads: Sequence[torch.Tensor], draw: BlockDraw) -> None:
    """Add one (chunk of a) batch's rows, divided by N (`interaction_normalisers`), to the sums C [3, 3].

    `gates`: heads per block, MLP per block, the embedding gate; `grads`: dL/d(gates) computed with
    `create_graph=True`. Row i is ONE Hessian-vector product: s_i = dL/dg_i[l] . 1 (for embed the
    one shared vector) differentiated with respect to g_heads[m[i][0]], g_mlp[m[i][1]] and g_embed.
    """
    depth = len(gates) // 2
    firsts = (grads[draw.l], grads[depth + draw.l], grads[-1])  # dL/dg_i at block l (embed: shared)
    for i, first in enumerate(firsts):
        wrt = (gates[draw.m[i][0]], gates[depth + draw.m[i][1]], gates[-1])
        # the embedding row, whose graph is the largest, goes last and frees the graph as it goes
        row = torch.autograd.grad(first.sum(), wrt, retain_graph=i < 2, allow_unused=True, materialize_grads=True)
        with torch.no_grad():
            C[i] += torch.stack([v.double().sum() for v in row]) / normalisers[i]
