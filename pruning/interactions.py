"""The estimator of the 3x3 interaction matrix C (docs/METHOD.md section 3).

Per batch: the block draws, then one Hessian-vector product per row of C, each term divided by
its normaliser N[i, j] = n_i * n_j; the pass (`pruning.scoring`) divides C by the batch count.
`--hessian_estimator rb` and `--hessian_blocks K` lower the variance at the same expectation
(`add_interactions`).
"""
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


def _unit_counts(arch, hessian_embed: float) -> List[List[float]]:
    """n per block: heads n = its width, MLP n = its hidden width; embedding n = the widths of all
    blocks summed, times hessian_embed (one value). A ViT's are the same in every block."""
    if arch.family == "swin":
        widths = [float(arch.widths[s]) for s in arch.stage_of_block()]
        return [widths, [float(h) for h in arch.block_hidden()], [sum(widths) * hessian_embed]]
    d = float(arch.embed_dim)
    return [[d] * arch.depth, [float(arch.mlp_hidden)] * arch.depth, [d * arch.depth * hessian_embed]]


def interaction_normalisers(arch, hessian_embed: float) -> torch.Tensor:
    """N[i, j] = n_i * n_j with n = (D, mlp hidden, D * depth * hessian_embed), float64 [3, 3]; a
    Swin's n are those of block 0 (`block_scales` corrects the terms of other blocks)."""
    n = torch.tensor([counts[0] for counts in _unit_counts(arch, hessian_embed)], dtype=torch.float64)
    return n[:, None] * n[None, :]


def block_scales(arch) -> torch.Tensor:
    """[2, depth] float64: n(block 0) / n(block b) for the heads (row 0) and MLP (row 1) terms, so that a
    term of block b divided by N (of block 0) is divided by its own n. All exactly 1 in a ViT."""
    counts = _unit_counts(arch, 1.0)
    return torch.tensor([[c[0] / x for x in c] for c in counts[:2]], dtype=torch.float64)


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
                     grads: Sequence[torch.Tensor], draws: Sequence[BlockDraw], estimator: str = "reference",
                     scales: Optional[torch.Tensor] = None, embed_gates: int = 1) -> None:
    """Add one (chunk of a) batch's rows, divided by N (`interaction_normalisers`), to the sums C [3, 3].

    `gates`: heads per block, MLP per block, the embedding gate(s) (a Swin: one per stage); `grads`:
    dL/d(gates) computed with `create_graph=True`. Row i is the Hessian-vector product H 1_i of
    s_i = dL/dg_i[l] . 1 (for embed the sum over all embedding gates), read on the columns' gates:
      * `reference`: g_heads[m[i][0]] and g_mlp[m[i][1]];
      * `rb`: the heads and MLP gates of EVERY block m <= l, and the heads and MLP columns take the
        exact mean over m in [0, l] of the drawn m's term: the same expectation (Rao-Blackwellised
        over m), the same cost.
    The embedding column of the heads and MLP rows, 1_i^T H 1_embed, is read off the embedding
    row's product instead (H is symmetric): their own products then stop at the lowest block they
    read, not at block 0. The heads and MLP rows are averaged over the K `draws` (2 products per
    draw). The embedding row depends on no draw (its columns are block 0 in the reference): it is
    computed once. `scales` (`block_scales`, default all 1) weighs each block's heads and MLP terms
    by n(block 0) / n(block): each term is divided by its own block's n. `embed_gates`: how many
    embedding gates end `gates`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown interactions estimator {estimator!r}")
    depth = (len(gates) - embed_gates) // 2
    w = scales if scales is not None else torch.ones(2, depth, dtype=torch.float64, device=normalisers.device)
    K = len(draws)
    for draw in draws:
        for i, first in enumerate((grads[draw.l], grads[depth + draw.l])):  # dL/dg_i at block l
            if estimator == "reference":
                m_h, m_m = draw.m[i]
                h, m = hvp_sums(first, (gates[m_h], gates[depth + m_m]), True)
                row = [h * w[0, m_h], m * w[1, m_m]]
            else:
                blocks = draw.l + 1
                sums = hvp_sums(first, (*gates[:blocks], *gates[depth:depth + blocks]), True)
                row = [(torch.stack(sums[:blocks]) * w[0, :blocks]).sum() / blocks,
                       (torch.stack(sums[blocks:]) * w[1, :blocks]).sum() / blocks]
            with torch.no_grad():
                C[i, :2] += torch.stack(row) * w[i, draw.l] / normalisers[i, :2] / K
    # the embedding row, whose graph is the largest, goes last and frees the graph as it goes; it
    # is also read on each draw's heads and MLP gates of block l: the heads and MLP rows' last column
    embed, embed_grads = gates[2 * depth:], grads[2 * depth:]
    first = embed_grads[0] if embed_gates == 1 else torch.stack([g.sum() for g in embed_grads]).sum()
    at_l = [gates[c * depth + draw.l] for c in (0, 1) for draw in draws]
    sums = hvp_sums(first, (gates[0], gates[depth], *embed, *at_l), False)
    embed_column = sums[2] if embed_gates == 1 else torch.stack(sums[2:2 + embed_gates]).sum()
    at_l_sums = sums[2 + embed_gates:]
    with torch.no_grad():
        C[2] += torch.stack([sums[0], sums[1], embed_column]) / normalisers[2]
        for i in (0, 1):
            terms = torch.stack(at_l_sums[i * K:(i + 1) * K]) * w[i, [draw.l for draw in draws]]
            C[i, 2] += terms.sum() / normalisers[i, 2] / K

