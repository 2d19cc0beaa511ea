"""From importance criteria and the interaction matrix to a pruning mask (docs/METHOD.md section 4).

Pipeline of `prune(criteria, C, arch, options)`:

1. `check_target_reachable` -- the target is in (0, 1) and the allowed components can reach it
   (cheap, needs no data: call it before scoring).
2. Per component, the pruning order: units sorted by criterion, lowest first (ties: lower index
   first); with protection the top max(1, int(0.05 n)) units of every block (embedding: of the
   one shared vector) are left out of the order, by identity (`pruning_order`).
3. How many units of each component go:
   * `--pruning_layers 3` with interactions (`--need_hessian`): the evolution strategy of the
     reference (`evolution_search`) chooses the pruned fractions (r_head, r_embed) maximising
     F(r) = -(sum_i C_ii r_i^2 + sum_{i<j} 2 C_ij r_i r_j) under the reference's FLOPs model
     (`reference_flops_fraction`), r_mlp following from the constraint (`solve_mlp_ratio`).
     The counts k_head, k_embed are the rounded fractions.
   * `--pruning_layers 3` without interactions (C absent or all zero), the FIRST-ORDER MODE: one
     global threshold over all prunable units of the three components. A unit's score is its
     criterion divided by the MACs its removal saves (the exact analytic count of the unpruned
     model: a head, a neuron, an embedding channel), i.e. the Taylor estimate of the loss increase
     per MAC saved; units are pruned in ascending score (a greedy knapsack) until the exact
     FLOPs target is met. The criteria are used unscaled: every scorer estimates the change of the
     same loss when a gate goes from 1 to 0, so they are comparable across components (dividing
     each component by its mean would rate an average head as important as an average neuron,
     and with a head saving ~150 neurons' MACs would prune heads almost exclusively).
   * `--pruning_layers 0|1|2`: only that component; its count is the one whose exact MACs come
     closest to the target.
4. Calibration: the search's formula ignores the stem, classifier, norms, biases and softmax, so
   with k_head, k_embed fixed, k_mlp is chosen by binary search on the EXACT analytic count
   (`pruning.flops.analytic_macs`, the deploy model's MACs) to come closest to the target, to one
   MLP neuron. If the MLP range cannot absorb the difference (k_mlp at 0 or at its maximum), heads
   or embedding channels are added (removed) one at a time until it can: with interactions the
   move that keeps F highest, in first-order mode the next unit by score.
5. The mask keeps everything but the first k units of each component's order. The achieved
   reduction (exact count) must be within +-0.5% (absolute) of the target.

Differences from the reference (docs/METHOD.md section 7):
* protected units keep their identity (+inf criterion), no re-indexing of a shrunken array;
* exactly k units are pruned (the reference's `<= sorted[k]` prunes k+1);
* candidates whose heads and embedding cuts alone remove more than target + threshold, or that
  need more MLP pruning than is prunable, are infeasible (fitness -inf), not kept;
* the FLOPs model takes the token count and head width from the architecture (no 197, no 64);
* r_mlp is solved in closed form: the model is linear in the kept MLP fraction, so the
  reference's binary search has an exact answer;
* the initial genes are drawn uniformly (one random point per individual) in
  [0, largest prunable fraction], and genes are clipped to that range rather than to [0, 1]
  (protection and the last embedding channel make larger fractions impossible);
* the search uses a private `numpy.random.Generator(seed)`: the same seed gives the same mask.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from models.deit_base import DeiTArch
from pruning.flops import analytic_macs, mask_macs
from pruning.mask import COMPONENTS, PruneMask
from utils import UserError

# the reference's evolution-strategy constants
POPULATION = 100
CHILDREN = 50
GENERATIONS = 100
PROTECT_FRACTION = 0.05
ACCEPT_TOLERANCE = 0.005  # |achieved - target| of the final mask (absolute fraction of MACs)

LAYER_CHOICES = {0: "heads", 1: "mlp", 2: "embed", 3: "all"}
TARGET_FLAG = "--pruning_flops_percentage"
LAYERS_FLAG = "--pruning_layers"


@dataclass(frozen=True)
class SearchOptions:
    """Options of `prune` (names of the reference's flags in the comments).

    Args:
        flops_percentage: fraction of the FLOPs to remove, in (0, 1) (`--pruning_flops_percentage`).
        flops_threshold: tolerance of the search's FLOPs constraint (`--pruning_flops_threshold`).
        layers: 3 = all components, 0/1/2 = heads / MLP neurons / embedding dims only (`--pruning_layers`).
        protect: keep the top 5% of every block and component (`--pruning_protect`).
        use_interactions: use the interaction matrix C (`--need_hessian`); otherwise first-order mode.
        seed: seed of the evolution strategy (`--seed`).
        population, children, generations: the evolution strategy's sizes (reference: 100, 50, 100).
    """

    flops_percentage: float
    flops_threshold: float = 1e-4
    layers: int = 3
    protect: bool = True
    use_interactions: bool = True
    seed: int = 0
    population: int = POPULATION
    children: int = CHILDREN
    generations: int = GENERATIONS

    @classmethod
    def from_args(cls, args) -> "SearchOptions":
        """Options from main.py's parsed flags."""
        return cls(flops_percentage=float(args.pruning_flops_percentage),
                   flops_threshold=float(getattr(args, "pruning_flops_threshold", 1e-4)),
                   layers=int(getattr(args, "pruning_layers", 3)),
                   protect=bool(getattr(args, "pruning_protect", True)),
                   use_interactions=bool(getattr(args, "need_hessian", False)),
                   seed=int(getattr(args, "seed", 0)))


# -- the reference's FLOPs model and objective --------------------------------------------------------

def reference_flops_fraction(arch: DeiTArch, a, b, e):
    """Remaining fraction of the blocks' MACs under the reference's FLOPs model.

    The reference counts, per block, `2 L D (L a + 2 a e D + 4 b e D)` (L tokens, D embedding dim,
    a, b, e the REMAINING fractions of heads, MLP neurons and embedding dims). Written per term,
    with A = num_heads * head_dim (= D in DeiT) and H = mlp_hidden (= 4D): q k^T and attn v cost
    2 L^2 A a, qkv and proj 4 L D A a e, fc1 and fc2 2 L D H b e; the fraction is
    (L A a + 2 D A a e + D H b e) / (L A + 2 D A + D H). Depth cancels.

    Args:
        arch: the unpruned architecture.
        a, b, e: remaining fractions (floats or broadcastable arrays).

    Returns:
        The remaining fraction, same shape as the broadcast inputs.
    """
    L, D = arch.num_tokens, arch.embed_dim
    A, H = arch.num_heads * arch.head_dim, arch.mlp_hidden
    a, b, e = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(e, dtype=np.float64)
    return (L * A * a + 2 * D * A * a * e + D * H * b * e) / (L * A + 2 * D * A + D * H)


def solve_mlp_ratio(arch: DeiTArch, r_head, r_embed, target: float, threshold: float = 1e-4,
                    max_ratio: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """Pruned MLP fraction that makes the reference FLOPs model remove `target`.

    The model is linear in the kept MLP fraction b, so the reference's binary search has the
    closed-form answer b = ((1 - target) Z - L A a - 2 D A a e) / (D H e). A candidate is
    infeasible when its heads and embedding cuts alone remove more than target + threshold,
    or when even `max_ratio` of the MLP does not reach target - threshold; inside the
    threshold r_mlp is clipped to [0, max_ratio].

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
    L, D = arch.num_tokens, arch.embed_dim
    A, H = arch.num_heads * arch.head_dim, arch.mlp_hidden
    z = L * A + 2 * D * A + D * H
    with np.errstate(divide="ignore", invalid="ignore"):
        b = ((1.0 - target) * z - L * A * a - 2 * D * A * a * e) / (D * H * e)
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
    C = _as_matrix(C)
    r = np.stack(np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (r_head, r_mlp, r_embed))), -1)
    upper = np.triu(C) + np.triu(C, 1)  # C_ii on the diagonal, 2 C_ij above it
    return -np.einsum("...i,ij,...j->...", r, upper, r)


# -- the evolution strategy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchResult:
    """Best candidate of `evolution_search` (pruned fractions; fitness -inf if none was feasible)."""

    r_head: float
    r_mlp: float
    r_embed: float
    fitness: float
    feasible: bool


def evolution_search(C, arch: DeiTArch, target: float, threshold: float = 1e-4, seed: int = 0,
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
    C = _as_matrix(C)
    rng = np.random.Generator(np.random.PCG64(seed))
    upper = np.array([max_ratios[0], max_ratios[2]], dtype=np.float64)

    def fitness(genes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        r_mlp, ok = solve_mlp_ratio(arch, genes[:, 0], genes[:, 1], target, threshold, max_ratios[1])
        f = objective(C, genes[:, 0], np.where(ok, r_mlp, 0.0), genes[:, 1])
        return np.where(ok, f, -np.inf), r_mlp

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


# -- counts and unit selection ------------------------------------------------------------------------

def protected_count(n: int) -> int:
    """Units of a block (or of the embedding vector) that protection keeps: max(1, int(0.05 n))."""
    return max(1, int(PROTECT_FRACTION * n))


def component_shapes(arch: DeiTArch) -> Dict[str, Tuple[int, int]]:
    """(blocks, units per block) of each component; the embedding vector is one block."""
    return {"heads": (arch.depth, arch.num_heads), "mlp": (arch.depth, arch.mlp_hidden), "embed": (1, arch.embed_dim)}


def _min_keep(component: str, n: int, protect: bool) -> int:
    keep = protected_count(n) if protect else 0
    return max(keep, 1) if component == "embed" else keep  # at least one embedding channel always stays


def max_prunable(arch: DeiTArch, protect: bool = True) -> Dict[str, int]:
    """Largest number of units of each component that may be pruned."""
    return {c: blocks * (n - _min_keep(c, n, protect)) for c, (blocks, n) in component_shapes(arch).items()}


def counts_from_ratios(arch: DeiTArch, ratios: Mapping[str, float], protect: bool = True) -> Dict[str, int]:
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


def _as_blocks(scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    s = np.array(scores, dtype=np.float64)
    return s.reshape(1, -1) if s.ndim == 1 else s


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
    keep = max(protected_count(n) if protect else 0, min_keep)
    if keep:
        top = np.argsort(-s, axis=1, kind="stable")[:, :keep]
        s = s.copy()
        np.put_along_axis(s, top, np.inf, axis=1)
    order = np.argsort(s.ravel(), kind="stable")
    return order[: blocks * (n - keep)]


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


def normalize_by_layer(criteria: Mapping[str, torch.Tensor], norm_type: int) -> Dict[str, torch.Tensor]:
    """Divide each block's scores by their L1 (type 1) or L2 (type 2) norm (`--pruning_normalize_by_layer`).

    The embedding vector counts as one block. Blocks whose norm is 0 are left unchanged.

    Args:
        criteria: {'heads': [depth, H], 'mlp': [depth, M], 'embed': [D]}.
        norm_type: 1 or 2 (`--pruning_normalize_type`).
    """
    if norm_type not in (1, 2):
        raise UserError(f"--pruning_normalize_type must be 1 (L1) or 2 (L2), got {norm_type!r}")
    out = {}
    for name, value in criteria.items():
        t = torch.as_tensor(value)
        rows = t.reshape(1, -1) if t.dim() == 1 else t
        norm = rows.abs().sum(dim=1, keepdim=True) if norm_type == 1 else rows.pow(2).sum(dim=1, keepdim=True).sqrt()
        norm = torch.where(norm > 0, norm, torch.ones_like(norm))
        out[name] = (rows / norm).reshape(t.shape)
    return out


# -- reachability -------------------------------------------------------------------------------------

def _allowed(layers: int) -> Tuple[str, ...]:
    return COMPONENTS if layers == 3 else (COMPONENTS[layers],)


def _check_options(target: float, layers: int) -> None:
    try:
        ok = bool(0.0 < float(target) < 1.0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{TARGET_FLAG} must be a fraction of the FLOPs to remove in (0, 1), got {target!r}")
    if layers not in LAYER_CHOICES:
        raise UserError(f"{LAYERS_FLAG} must be 0 (heads), 1 (MLP), 2 (embedding) or 3 (all), got {layers!r}")


def _even_reduction(arch: DeiTArch, k: Mapping[str, int]) -> float:
    """Exact reduction when the k pruned units of each component are spread evenly over the blocks
    (the count only depends on the per-block totals, and is the same for any spread that empties
    no block's heads or MLP)."""
    def spread(total: int, n: int) -> list:
        base, extra = divmod(total, arch.depth)
        return [n - base - (1 if i < extra else 0) for i in range(arch.depth)]

    full = analytic_macs(arch)["total"]
    macs = analytic_macs(arch, arch.embed_dim - k.get("embed", 0), spread(k.get("heads", 0), arch.num_heads),
                         spread(k.get("mlp", 0), arch.mlp_hidden))["total"]
    return 1.0 - macs / full


def check_target_reachable(arch: DeiTArch, target: float, layers: int = 3, protect: bool = True) -> float:
    """Raise `UserError` unless the allowed components can remove `target` of the FLOPs (+-0.5%).

    Cheap (analytic counts only): call it before any data is read. For a single component it
    also checks that some count of that component lands within the tolerance (heads and
    embedding channels are coarse units in small models).

    Args:
        arch: the unpruned architecture.
        target: fraction of the FLOPs to remove (`--pruning_flops_percentage`).
        layers: `--pruning_layers`.
        protect: `--pruning_protect`.

    Returns:
        The largest reduction the allowed components can give.
    """
    _check_options(target, layers)
    allowed = _allowed(layers)
    limit = max_prunable(arch, protect)
    k_max = {c: limit[c] for c in allowed}
    best = _even_reduction(arch, k_max)
    what = "all components" if layers == 3 else f"the {LAYER_CHOICES[layers]} alone"
    if best < target - ACCEPT_TOLERANCE:
        raise UserError(f"{TARGET_FLAG} {target} is unreachable with {LAYERS_FLAG} {layers}: pruning everything "
                        f"prunable of {what}{' (protection on)' if protect else ''} removes {best:.2%} of the FLOPs")
    if layers in (0, 2):  # coarse units: is some count close enough?
        c = allowed[0]
        reductions = np.array([_even_reduction(arch, {c: k}) for k in range(limit[c] + 1)])
        closest = reductions[np.argmin(np.abs(reductions - target))]
        if abs(closest - target) > ACCEPT_TOLERANCE:
            raise UserError(f"{TARGET_FLAG} {target} cannot be met within 0.5% with {LAYERS_FLAG} {layers}: "
                            f"pruning {c} gives steps of {reductions[1] - reductions[0]:.2%}, closest {closest:.2%}")
    return best


# -- exact counting and calibration -------------------------------------------------------------------

class _ExactCount:
    """Exact MACs of 'prune the first k units of each component's order'."""

    def __init__(self, arch: DeiTArch, orders: Mapping[str, np.ndarray]):
        self.arch, self.orders = arch, orders
        self.full = analytic_macs(arch)["total"]

    def kept_per_block(self, component: str, k: int) -> list:
        blocks, n = component_shapes(self.arch)[component]
        pruned = np.bincount(self.orders[component][:k] // n, minlength=blocks)
        return (n - pruned).tolist()

    def reduction(self, k_head: int = 0, k_mlp: int = 0, k_embed: int = 0) -> float:
        macs = analytic_macs(self.arch, self.arch.embed_dim - k_embed, self.kept_per_block("heads", k_head),
                             self.kept_per_block("mlp", k_mlp))["total"]
        return 1.0 - macs / self.full

    def reduction_of(self, k: Mapping[str, int]) -> float:
        return self.reduction(k.get("heads", 0), k.get("mlp", 0), k.get("embed", 0))


def _closest_count(reduction: Callable[[int], float], k_max: int, target: float) -> int:
    """k in [0, k_max] whose (non-decreasing) reduction is closest to target (ties: smaller k)."""
    if reduction(k_max) < target:
        return k_max
    lo, hi = 0, k_max
    while lo < hi:  # smallest k with reduction(k) >= target
        mid = (lo + hi) // 2
        if reduction(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(reduction(lo - 1) - target) <= abs(reduction(lo) - target):
        return lo - 1
    return lo


def _fit_mlp(count: _ExactCount, k_head: int, k_embed: int, k_mlp_max: int, target: float,
             tol: float, choose: Callable[[int, int, int], Optional[str]]) -> Tuple[Dict[str, int], int]:
    """Choose k_mlp on the exact count; if it sits at a bound, move heads/embed one unit at a time.

    `choose(k_head, k_embed, direction)` names the component to move ('heads' or 'embed') by
    `direction` (+1 prune one more, -1 one fewer), or None when neither may move.
    Returns the counts and the number of such repair steps.
    """
    def calibrate(kh: int, ke: int) -> Tuple[int, int]:
        km = _closest_count(lambda k: count.reduction(kh, k, ke), k_mlp_max, target)
        red = count.reduction(kh, km, ke)
        if km == k_mlp_max and red < target - tol:
            return km, +1
        if km == 0 and red > target + tol:
            return km, -1
        return km, 0

    k_mlp, need = calibrate(k_head, k_embed)
    direction, steps = need, 0
    while need != 0 and need == direction:
        component = choose(k_head, k_embed, direction)
        if component is None:
            break
        if component == "heads":
            k_head += direction
        else:
            k_embed += direction
        steps += 1
        k_mlp, need = calibrate(k_head, k_embed)
    return {"heads": k_head, "mlp": k_mlp, "embed": k_embed}, steps


def _unit_savings(arch: DeiTArch) -> Dict[str, int]:
    """Exact MACs saved by removing one head, one MLP neuron, one embedding channel of the full model."""
    full = analytic_macs(arch)["total"]
    one_less = [arch.num_heads - 1] + [arch.num_heads] * (arch.depth - 1)
    fewer_hidden = [arch.mlp_hidden - 1] + [arch.mlp_hidden] * (arch.depth - 1)
    return {"heads": full - analytic_macs(arch, heads=one_less)["total"],
            "mlp": full - analytic_macs(arch, hidden=fewer_hidden)["total"],
            "embed": full - analytic_macs(arch, width=arch.embed_dim - 1)["total"]}


# -- orchestration ------------------------------------------------------------------------------------

def _as_matrix(C) -> np.ndarray:
    if isinstance(C, torch.Tensor):
        C = C.detach().to("cpu", torch.float64).numpy()
    m = np.array(C, dtype=np.float64)
    if m.shape != (3, 3):
        raise UserError(f"interaction matrix (hessian.pickle) must be 3x3, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise UserError("interaction matrix (hessian.pickle) has non-finite entries")
    return m


def _criteria_arrays(criteria: Mapping[str, torch.Tensor], arch: DeiTArch) -> Dict[str, np.ndarray]:
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


def _build_mask(arch: DeiTArch, orders: Mapping[str, np.ndarray], k: Mapping[str, int], model: str) -> PruneMask:
    kept = {}
    for c, (blocks, n) in component_shapes(arch).items():
        pruned = np.zeros(blocks * n, dtype=bool)
        pruned[orders[c][: k[c]]] = True
        kept[c] = [np.flatnonzero(~row).tolist() for row in pruned.reshape(blocks, n)]
    return PruneMask(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
                     mlp_hidden=arch.mlp_hidden, heads=kept["heads"], mlp=kept["mlp"], embed=kept["embed"][0],
                     model=model)


def prune(criteria: Mapping[str, torch.Tensor], C, arch: DeiTArch, options: SearchOptions,
          model_name: str = "") -> Tuple[PruneMask, dict]:
    """Choose the pruned units: search, unit selection, exact calibration (see the module docstring).

    Args:
        criteria: {'heads': [depth, num_heads], 'mlp': [depth, mlp_hidden], 'embed': [embed_dim]};
            larger = more important.
        C: 3x3 interaction matrix (heads, MLP, embedding), or None; unused in first-order mode.
        arch: the unpruned architecture.
        options: target, threshold, layers, protection, interactions, seed.
        model_name: stored in the mask.

    Returns:
        (mask, report); the report holds the mode, the search's fractions and fitness, the pruned
        and total counts per component, the final fractions and fitness, and the exact MACs.
    """
    target, layers = options.flops_percentage, options.layers
    check_target_reachable(arch, target, layers, options.protect)
    if options.flops_threshold < 0 or not np.isfinite(options.flops_threshold):
        raise UserError(f"--pruning_flops_threshold must be >= 0, got {options.flops_threshold!r}")
    crit = _criteria_arrays(criteria, arch)
    shapes = component_shapes(arch)
    orders = {c: pruning_order(crit[c], options.protect, _min_keep(c, shapes[c][1], False)) for c in COMPONENTS}
    k_max = {c: len(orders[c]) for c in COMPONENTS}
    totals = {c: b * n for c, (b, n) in shapes.items()}
    count = _ExactCount(arch, orders)
    savings = _unit_savings(arch)
    tol = max(options.flops_threshold, savings["mlp"] / count.full)
    matrix = _as_matrix(C) if C is not None else np.zeros((3, 3))
    report: dict = {"target": target, "layers": layers, "protect": options.protect, "seed": options.seed}
    steps = 0

    if layers != 3:
        only = COMPONENTS[layers]
        k = {c: 0 for c in COMPONENTS}
        k[only] = _closest_count(lambda n: count.reduction_of({only: n}), k_max[only], target)
        report["mode"] = f"{only} only"
    elif options.use_interactions and np.any(matrix != 0):
        found = evolution_search(matrix, arch, target, options.flops_threshold, options.seed,
                                 tuple(k_max[c] / totals[c] for c in COMPONENTS), options.population,
                                 options.children, options.generations)
        if found.feasible:
            start = counts_from_ratios(arch, {"heads": found.r_head, "embed": found.r_embed}, options.protect)
        else:  # the formula found nothing feasible: start from the most pruning, the calibration repairs
            start = dict(k_max)

        def choose(kh: int, ke: int, direction: int) -> Optional[str]:
            r_mlp = k_max["mlp"] / totals["mlp"] if direction > 0 else 0.0
            best = None
            for c in ("heads", "embed"):
                kk = {"heads": kh, "embed": ke}
                kk[c] += direction
                if 0 <= kk[c] <= k_max[c]:
                    f = float(objective(matrix, kk["heads"] / totals["heads"], r_mlp, kk["embed"] / totals["embed"]))
                    if best is None or f > best[0]:
                        best = (f, c)
            return None if best is None else best[1]

        k, steps = _fit_mlp(count, start["heads"], start["embed"], k_max["mlp"], target, tol, choose)
        report.update(mode="interactions", search={"r_head": found.r_head, "r_mlp": found.r_mlp,
                                                   "r_embed": found.r_embed, "fitness": found.fitness,
                                                   "feasible": found.feasible})
    else:
        # first-order mode: criterion per MAC saved, one global threshold over all components
        score = {c: crit[c].ravel()[orders[c]] / savings[c] for c in COMPONENTS}
        merged = np.concatenate([score[c] for c in COMPONENTS])
        which = np.concatenate([np.full(k_max[c], i) for i, c in enumerate(COMPONENTS)])
        ranked = which[np.argsort(merged, kind="stable")]  # stable: each component keeps its own order
        cum = np.stack([np.concatenate([[0], np.cumsum(ranked == i)]) for i in range(3)])

        def prefix_reduction(t: int) -> float:
            return count.reduction(int(cum[0, t]), int(cum[1, t]), int(cum[2, t]))

        t = _closest_count(prefix_reduction, len(ranked), target)

        def choose(kh: int, ke: int, direction: int) -> Optional[str]:
            nxt = {"heads": kh if direction > 0 else kh - 1, "embed": ke if direction > 0 else ke - 1}
            moves = [(score[c][i], c) for c, i in nxt.items() if 0 <= i < k_max[c]]
            if not moves:
                return None
            return (min(moves) if direction > 0 else max(moves))[1]

        k, steps = _fit_mlp(count, int(cum[0, t]), int(cum[2, t]), k_max["mlp"], target, tol, choose)
        report["mode"] = "first-order"

    mask = _build_mask(arch, orders, k, model_name)
    before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
    achieved = 1.0 - after / before
    if abs(achieved - target) > ACCEPT_TOLERANCE:
        raise UserError(f"{TARGET_FLAG} {target}: the closest mask found removes {achieved:.2%} of the FLOPs "
                        f"(more than 0.5% off); choose another target or {LAYERS_FLAG}")
    ratios = {c: k[c] / totals[c] for c in COMPONENTS}
    report.update(counts=dict(k), totals=totals, ratios=ratios, repair_steps=steps,
                  fitness=float(objective(matrix, ratios["heads"], ratios["mlp"], ratios["embed"])),
                  macs_before=before, macs_after=after, achieved_reduction=achieved)
    return mask, report
