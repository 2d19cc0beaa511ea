"""The reference's search over pruned fractions (docs/METHOD.md section 4): its FLOPs model of the
blocks, the objective F(r) on the interaction matrix C, and the evolution strategy over
(r_head, r_embed), with r_mlp solved in closed form from the FLOPs constraint.
"""
import functools
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from utils import UserError

# the reference's evolution-strategy constants
POPULATION = 100
CHILDREN = 50
GENERATIONS = 100


def interaction_matrix(C) -> np.ndarray:
    """C as a float64 [3, 3] array; a `UserError` unless it is 3x3 and finite."""
    if isinstance(C, torch.Tensor):
        C = C.detach().to("cpu", torch.float64).numpy()
    m = np.array(C, dtype=np.float64)
    if m.shape != (3, 3):
        raise UserError(f"interaction matrix (hessian.pickle) must be 3x3, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise UserError("interaction matrix (hessian.pickle) has non-finite entries")
    return m


def flops_model(arch) -> Tuple[float, float, float]:
    """(alpha, beta, gamma) of the search's FLOPs model: the kept fraction of the blocks' MACs is
    (alpha a + beta a e + gamma b e) / (alpha + beta + gamma), with a, b, e the REMAINING fractions
    of heads, MLP neurons and embedding dims (each block's MACs / 2: attention matmuls, qkv and proj,
    fc1 and fc2).

    A ViT (the reference's model, per block `2 L D (L a + 2 a e D + 4 b e D)`): with L tokens, D the
    width, A = num_heads * head_dim (= D in DeiT), H = mlp_hidden (= 4D), alpha = L A, beta = 2 D A,
    gamma = D H; depth cancels. A Swin: the same terms summed over the blocks, each weighted by its
    stage's token count T and with the window's w^2 tokens in place of L: alpha = sum T w^2 A,
    beta = sum 2 T C A, gamma = sum T C H (C, A, H of the block's stage).
    """
    if arch.family == "swin":
        terms = [(T * w * w * A, 2 * T * C * A, T * C * H) for T, w, C, A, H in (
            (arch.resolutions[s] ** 2, arch.stage_window(s), arch.widths[s], arch.num_heads[s] * arch.head_dim,
             arch.stage_hidden(s)) for s in arch.stage_of_block())]
        return tuple(sum(t[i] for t in terms) for i in range(3))
    L, D = arch.num_tokens, arch.embed_dim
    A, H = arch.num_heads * arch.head_dim, arch.mlp_hidden
    return L * A, 2 * D * A, D * H


def reference_flops_fraction(arch, a, b, e):
    """Remaining fraction of the blocks' MACs under the search's FLOPs model (`flops_model`).
    a, b, e: floats or arrays (broadcast); returns the remaining fraction of the broadcast shape."""
    alpha, beta, gamma = flops_model(arch)
    a, b, e = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(e, dtype=np.float64)
    return (alpha * a + beta * a * e + gamma * b * e) / (alpha + beta + gamma)


def solve_mlp_ratio(arch, r_head, r_embed, target: float, threshold: float = 1e-4,
                    max_ratio: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Pruned MLP fraction that makes the search's FLOPs model remove `target`.

    The model is linear in the kept MLP fraction b, so the reference's binary search has the
    closed-form answer b = ((1 - target) Z - alpha a - beta a e) / (gamma e), Z = alpha + beta + gamma.
    A candidate is infeasible when its heads and embedding cuts alone remove more than
    target + threshold, or when even `max_ratio` of the MLP does not reach target - threshold;
    inside the threshold r_mlp is clipped to [0, max_ratio].

    Args:
        arch: the unpruned architecture.
        r_head, r_embed: pruned fractions of heads and embedding dims (arrays broadcast).
        target: fraction of the FLOPs to remove.
        threshold: tolerance of the constraint.
        max_ratio: largest prunable MLP fraction (protection).

    Returns:
        (r_mlp, feasible): r_mlp is NaN where infeasible.
    """
    a = 1.0 - np.asarray(r_head, dtype=np.float64)
    e = 1.0 - np.asarray(r_embed, dtype=np.float64)
    a, e = np.broadcast_arrays(a, e)
    removed_no_mlp = 1.0 - reference_flops_fraction(arch, a, 1.0, e)
    removed_max_mlp = 1.0 - reference_flops_fraction(arch, a, 1.0 - max_ratio, e)
    feasible = (removed_no_mlp <= target + threshold) & (removed_max_mlp >= target - threshold) & (e > 0)
    alpha, beta, gamma = flops_model(arch)
    z = alpha + beta + gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        b = ((1.0 - target) * z - alpha * a - beta * a * e) / (gamma * e)
    r_mlp = np.clip(1.0 - b, 0.0, max_ratio)
    return np.where(feasible, r_mlp, np.nan), feasible


def objective(C, r_head, r_mlp, r_embed):
    """SAViT's objective F(r) = -(sum_i C_ii r_i^2 + sum_{i<j} 2 C_ij r_i r_j) (to maximise).

    Only the diagonal and the upper triangle of C are read (C is not symmetrised), as in the
    reference. Component order: heads 0, MLP 1, embedding 2.

    Args:
        C: 3x3 interaction matrix (array or tensor).
        r_head, r_mlp, r_embed: pruned fractions (arrays broadcast).
    """
    C = interaction_matrix(C)
    r = np.stack(np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (r_head, r_mlp, r_embed))), -1)
    upper = np.triu(C) + np.triu(C, 1)  # C_ii on the diagonal, 2 C_ij above it
    return -np.einsum("...i,ij,...j->...", r, upper, r)


def _fitness(C: np.ndarray, arch, target: float, threshold: float, max_mlp: float,
             genes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(F, r_mlp) of each row (r_head, r_embed) of `genes`; F is -inf where infeasible."""
    r_mlp, ok = solve_mlp_ratio(arch, genes[:, 0], genes[:, 1], target, threshold, max_mlp)
    f = objective(C, genes[:, 0], np.where(ok, r_mlp, 0.0), genes[:, 1])
    return np.where(ok, f, -np.inf), r_mlp


@dataclass(frozen=True)
class SearchResult:
    """Best candidate of `evolution_search` (pruned fractions; fitness -inf if none was feasible)."""

    r_head: float
    r_mlp: float
    r_embed: float
    fitness: float
    feasible: bool


def evolution_search(C, arch, target: float, threshold: float = 1e-4, seed: int = 0,
                     max_ratios: Tuple[float, float, float] = (1.0, 1.0, 1.0), population: int = POPULATION,
                     children: int = CHILDREN, generations: int = GENERATIONS) -> SearchResult:
    """The reference's evolution strategy over (r_head, r_embed), vectorised over the population.

    Each individual has two genes with their own mutation strengths. A child takes each gene (and
    its strength) from one of two distinct random parents; the strength moves by U(-0.5, 0.5) and
    is clipped at 0, the gene moves by strength * N(0, 1) and is clipped to [0, max ratio]. The
    survivors are the `population` fittest of parents and children (stable order on ties).
    Fitness is `objective` with r_mlp from `solve_mlp_ratio`; infeasible candidates get -inf.

    Args:
        C: 3x3 interaction matrix.
        arch: the unpruned architecture (for the FLOPs model).
        target: fraction of the FLOPs to remove.
        threshold: tolerance of the FLOPs constraint.
        seed: seed of the private random generator (same seed, same result).
        max_ratios: largest prunable fraction of (heads, MLP, embedding).
        population, children, generations: the strategy's sizes.
    """
    C = interaction_matrix(C)
    rng = np.random.Generator(np.random.PCG64(seed))
    upper = np.array([max_ratios[0], max_ratios[2]], dtype=np.float64)
    fitness = functools.partial(_fitness, C, arch, target, threshold, max_ratios[1])
    genes = rng.random((population, 2)) * upper
    strength = rng.random((population, 2))
    fit, _ = fitness(genes)
    for _ in range(generations):
        p1 = rng.integers(0, population, children)
        p2 = (p1 + rng.integers(1, population, children)) % population  # a second, different parent
        from_p2 = rng.random((children, 2)) < 0.5
        kid_genes = np.where(from_p2, genes[p2], genes[p1])
        kid_strength = np.where(from_p2, strength[p2], strength[p1])
        kid_strength = np.maximum(kid_strength + rng.random((children, 2)) - 0.5, 0.0)
        kid_genes = np.clip(kid_genes + kid_strength * rng.standard_normal((children, 2)), 0.0, upper)
        kid_fit, _ = fitness(kid_genes)
        all_genes = np.concatenate([genes, kid_genes])
        all_strength = np.concatenate([strength, kid_strength])
        all_fit = np.concatenate([fit, kid_fit])
        keep = np.argsort(-all_fit, kind="stable")[:population]
        genes, strength, fit = all_genes[keep], all_strength[keep], all_fit[keep]
    best_fit, r_mlp = fitness(genes[:1])
    return SearchResult(r_head=float(genes[0, 0]), r_mlp=float(np.nan_to_num(r_mlp[0])), r_embed=float(genes[0, 1]),
                        fitness=float(best_fit[0]), feasible=bool(np.isfinite(best_fit[0])))

