"""The estimator of the 3x3 interaction matrix C (docs/METHOD.md section 3).

Per batch: the block draws, then one Hessian-vector product per row of C, each term divided by
its normaliser N[i, j] = n_i * n_j; the pass (`pruning.scoring`) divides C by the batch count.
`--hessian_estimator rb` and `--hessian_blocks K` lower the variance at the same expectation
(`add_interactions`).
"""
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from models.vit_arch import ViTArch


def interaction_normalisers(arch: ViTArch, hessian_embed: float) -> torch.Tensor:
    """N[i, j] = n_i * n_j with n = (D, mlp hidden, D * depth * hessian_embed), float64 [3, 3]."""
    d = float(arch.embed_dim)
    n = torch.tensor([d, float(arch.mlp_hidden), d * arch.depth * hessian_embed], dtype=torch.float64)
    return n[:, None] * n[None, :]


ESTIMATORS = ("reference", "rb")


@dataclass(frozen=True)
class BlockDraw:
    """The random blocks of one draw: `l` for g_i, `m[i][j]` for g_j (j = 0 heads, 1 mlp); m[2] (the
    embedding row) is always (0, 0), as in the reference. The `rb` estimator reads `l` only."""

    l: int
    m: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def block_draw(seed: int, batch_index: int, depth: int, draw: int = 0) -> BlockDraw:
    """Draw the blocks of batch `batch_index` from a private generator.

    They depend on the GLOBAL batch index only, so batches sharded over processes see the same
    draws as in one process.

    Args:
        seed: the run's seed.
        batch_index: the global index of the batch in the pass (not the per-process one).
        depth: the number of blocks.
        draw: which of the batch's `--hessian_blocks` draws (0: the reference's one draw).
    """
    key = f"savit-interactions:{seed}:{batch_index}" + (f":{draw}" if draw else "")
    rng = random.Random(key)  # str seeds hash with sha512: stable
    l = rng.randrange(depth)
    # heads and MLP rows: m in [0, l] per pair (the reference draws m per pair); embedding row: block 0
    m = tuple((rng.randint(0, l), rng.randint(0, l)) for _ in range(2)) + ((0, 0),)
    return BlockDraw(l, m)


def hvp_sums(first: torch.Tensor, wrt: Sequence[torch.Tensor], retain: bool) -> List[torch.Tensor]:
    """One Hessian-vector product: d(first . 1)/d(each of `wrt`), each summed, in float64."""
    row = torch.autograd.grad(first.sum(), wrt, retain_graph=retain, allow_unused=True, materialize_grads=True)
    return [v.detach().double().sum() for v in row]


def add_interactions(C: torch.Tensor, normalisers: torch.Tensor, gates: Sequence[torch.Tensor],
                     grads: Sequence[torch.Tensor], draws: Sequence[BlockDraw], estimator: str = "reference") -> None:
    """Add one (chunk of a) batch's rows, divided by N (`interaction_normalisers`), to the sums C [3, 3].

    `gates`: heads per block, MLP per block, the embedding gate; `grads`: dL/d(gates) computed with
    `create_graph=True`. Row i is the Hessian-vector product H 1_i of s_i = dL/dg_i[l] . 1 (for
    embed the one shared vector), read on the columns' gates:
      * `reference`: g_heads[m[i][0]] and g_mlp[m[i][1]];
      * `rb`: the heads and MLP gates of EVERY block m <= l, and the heads and MLP columns take the
        exact mean over m in [0, l] of the drawn m's term: the same expectation (Rao-Blackwellised
        over m), the same cost.
    The embedding column of the heads and MLP rows, 1_i^T H 1_embed, is read off the embedding
    row's product instead (H is symmetric): their own products then stop at the lowest block they
    read, not at block 0. The heads and MLP rows are averaged over the K `draws` (2 products per
    draw). The embedding row depends on no draw (its columns are block 0 in the reference): it is
    computed once.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown interactions estimator {estimator!r}")
    depth = len(gates) // 2
    K = len(draws)
    for draw in draws:
        for i, first in enumerate((grads[draw.l], grads[depth + draw.l])):  # dL/dg_i at block l
            if estimator == "reference":
                row = hvp_sums(first, (gates[draw.m[i][0]], gates[depth + draw.m[i][1]]), True)
            else:
                blocks = draw.l + 1
                sums = hvp_sums(first, (*gates[:blocks], *gates[depth:depth + blocks]), True)
                row = [torch.stack(sums[:blocks]).sum() / blocks, torch.stack(sums[blocks:]).sum() / blocks]
            with torch.no_grad():
                C[i, :2] += torch.stack(row) / normalisers[i, :2] / K
    # the embedding row, whose graph is the largest, goes last and frees the graph as it goes; it
    # is also read on each draw's heads and MLP gates of block l: the heads and MLP rows' last column
    at_l = [gates[c * depth + draw.l] for c in (0, 1) for draw in draws]
    sums = hvp_sums(grads[-1], (gates[0], gates[depth], gates[-1], *at_l), False)
    with torch.no_grad():
        C[2] += torch.stack(sums[:3]) / normalisers[2]
        for i in (0, 1):
            C[i, 2] += torch.stack(sums[3 + i * K:3 + (i + 1) * K]).sum() / normalisers[i, 2] / K
