"""How many units of each component go (docs/METHOD.md section 4; the reference's defects we fix:
section 7): the three allocation modes -- interactions, first-order, one component --, the
calibration of the MLP count on the exact MACs, and `prune`, which selects the units with them.
"""
import dataclasses
import functools
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from models.deit_base import DeiTArch
from pruning.evolution import CHILDREN, GENERATIONS, POPULATION, evolution_search, interaction_matrix, objective
from pruning.flops import analytic_macs, mask_macs
from pruning.mask import COMPONENTS, PruneMask, component_shapes
from pruning.selection import component_orders, counts_from_ratios, criteria_blocks, mask_from_orders, max_prunable
from utils import UserError

ACCEPT_TOLERANCE = 0.005  # |achieved - target| of the final mask (absolute fraction of MACs)
LAYER_CHOICES = {0: "heads", 1: "mlp", 2: "embed", 3: "all"}
TARGET_FLAG = "--pruning_flops_percentage"
LAYERS_FLAG = "--pruning_layers"
Counts = Dict[str, int]
Move = Callable[[int, int, int], Optional[str]]  # (k_head, k_embed, direction) -> component to move, or None


@dataclasses.dataclass(frozen=True)
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


def _check_options(target: float, layers: int) -> None:
    try:
        ok = bool(0.0 < float(target) < 1.0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{TARGET_FLAG} must be a fraction of the FLOPs to remove in (0, 1), got {target!r}")
    if layers not in LAYER_CHOICES:
        raise UserError(f"{LAYERS_FLAG} must be 0 (heads), 1 (MLP), 2 (embedding) or 3 (all), got {layers!r}")


def _spread(total: int, n: int, depth: int) -> list:
    """Units kept per block when `total` of the depth * n units go, spread evenly over the blocks."""
    base, extra = divmod(total, depth)
    return [n - base - (1 if i < extra else 0) for i in range(depth)]


def _even_macs(arch: DeiTArch, k: Mapping[str, int]) -> int:
    """Exact MACs when the k pruned units of each component are spread evenly over the blocks (the
    count only depends on the per-block totals: the same for any spread that empties no block)."""
    depth = arch.depth
    return analytic_macs(arch, arch.embed_dim - k.get("embed", 0), _spread(k.get("heads", 0), arch.num_heads, depth),
                         _spread(k.get("mlp", 0), arch.mlp_hidden, depth))["total"]


def _even_reduction(arch: DeiTArch, k: Mapping[str, int]) -> float:
    return 1.0 - _even_macs(arch, k) / analytic_macs(arch)["total"]


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
    allowed = COMPONENTS if layers == 3 else (COMPONENTS[layers],)
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


# -- the exact count of one problem -------------------------------------------------------------------

class _Problem:
    """Exact MACs of 'prune the first k units of each component's order', with the limits and the target.

    The tolerance of the calibration is max(threshold, one MLP neuron's share of the MACs).
    """

    def __init__(self, arch: DeiTArch, orders: Mapping[str, np.ndarray], target: float, threshold: float):
        self.arch, self.orders, self.target = arch, orders, target
        self.full = analytic_macs(arch)["total"]
        self.k_max = {c: len(orders[c]) for c in COMPONENTS}
        self.totals = {c: blocks * n for c, (blocks, n) in component_shapes(arch).items()}
        self.savings = {c: self.full - _even_macs(arch, {c: 1}) for c in COMPONENTS}  # of one unit
        self.tol = max(threshold, self.savings["mlp"] / self.full)

    def kept_per_block(self, component: str, k: int) -> list:
        blocks, n = component_shapes(self.arch)[component]
        pruned = np.bincount(self.orders[component][:k] // n, minlength=blocks)
        return (n - pruned).tolist()

    def reduction(self, heads: int = 0, mlp: int = 0, embed: int = 0) -> float:
        macs = analytic_macs(self.arch, self.arch.embed_dim - embed, self.kept_per_block("heads", heads),
                             self.kept_per_block("mlp", mlp))["total"]
        return 1.0 - macs / self.full

    def closest(self, reduction: Callable[[int], float], k_max: int) -> int:
        """k in [0, k_max] whose (non-decreasing) reduction is closest to the target (ties: smaller k)."""
        if reduction(k_max) < self.target:
            return k_max
        lo, hi = 0, k_max
        while lo < hi:  # smallest k with reduction(k) >= target
            mid = (lo + hi) // 2
            if reduction(mid) >= self.target:
                hi = mid
            else:
                lo = mid + 1
        if lo > 0 and abs(reduction(lo - 1) - self.target) <= abs(reduction(lo) - self.target):
            return lo - 1
        return lo


# -- the three allocation modes -----------------------------------------------------------------------

def _single_component(p: _Problem, component: str) -> Counts:
    """`--pruning_layers 0|1|2`: the count of that component whose exact MACs come closest to the target."""
    k = {c: 0 for c in COMPONENTS}
    k[component] = p.closest(lambda n: p.reduction(**{component: n}), p.k_max[component])
    return k


def _interactions_start(p: _Problem, matrix: np.ndarray, options: "SearchOptions") -> Tuple[Counts, Move, dict]:
    """Interactions mode: heads and embedding counts from the evolution strategy's fractions.
    Returns the start counts, the repair move (keep F highest) and the report's entries."""
    found = evolution_search(matrix, p.arch, p.target, options.flops_threshold, options.seed,
                             tuple(p.k_max[c] / p.totals[c] for c in COMPONENTS), options.population,
                             options.children, options.generations)
    if found.feasible:
        start = counts_from_ratios(p.arch, {"heads": found.r_head, "embed": found.r_embed}, options.protect)
    else:  # the formula found nothing feasible: start from the most pruning, the calibration repairs
        start = dict(p.k_max)
    info = {"mode": "interactions", "search": dataclasses.asdict(found)}
    return start, functools.partial(_objective_move, p, matrix), info


def _objective_move(p: _Problem, matrix: np.ndarray, k_head: int, k_embed: int, direction: int) -> Optional[str]:
    """The head or embedding move by `direction` that keeps F highest (None when neither may move)."""
    r_mlp = p.k_max["mlp"] / p.totals["mlp"] if direction > 0 else 0.0
    best = None
    for c in ("heads", "embed"):
        k = {"heads": k_head, "embed": k_embed}
        k[c] += direction
        if 0 <= k[c] <= p.k_max[c]:
            f = float(objective(matrix, k["heads"] / p.totals["heads"], r_mlp, k["embed"] / p.totals["embed"]))
            if best is None or f > best[0]:
                best = (f, c)
    return None if best is None else best[1]


def _first_order_start(p: _Problem, crit: Mapping[str, np.ndarray]) -> Tuple[Counts, Move, dict]:
    """First-order mode: all prunable units ranked by criterion per MAC saved, one global cut.
    Returns the start counts (the cut closest to the target), the repair move (the next unit by
    that score) and the report's entries."""
    score = {c: crit[c].ravel()[p.orders[c]] / p.savings[c] for c in COMPONENTS}
    merged = np.concatenate([score[c] for c in COMPONENTS])
    which = np.concatenate([np.full(p.k_max[c], i) for i, c in enumerate(COMPONENTS)])
    ranked = which[np.argsort(merged, kind="stable")]  # stable: each component keeps its own order
    cum = np.stack([np.concatenate([[0], np.cumsum(ranked == i)]) for i in range(3)])  # counts in the first t
    t = p.closest(lambda t: p.reduction(*cum[:, t].tolist()), len(ranked))
    start = {"heads": int(cum[0, t]), "embed": int(cum[2, t])}
    return start, functools.partial(_score_move, p, score), {"mode": "first-order"}


def _score_move(p: _Problem, score: Mapping[str, np.ndarray], k_head: int, k_embed: int,
                direction: int) -> Optional[str]:
    """The next head or embedding unit by score: the lowest to prune one more, the highest to give one back."""
    nxt = {"heads": k_head if direction > 0 else k_head - 1, "embed": k_embed if direction > 0 else k_embed - 1}
    moves = [(score[c][i], c) for c, i in nxt.items() if 0 <= i < p.k_max[c]]
    if not moves:
        return None
    return (min(moves) if direction > 0 else max(moves))[1]


# -- calibration and the whole ------------------------------------------------------------------------

def _mlp_count(p: _Problem, k_head: int, k_embed: int) -> Tuple[int, int]:
    """(k_mlp closest to the target, +1 / -1 when the MLP cannot absorb the miss: prune more / less, else 0)."""
    k_mlp = p.closest(lambda k: p.reduction(k_head, k, k_embed), p.k_max["mlp"])
    reduction = p.reduction(k_head, k_mlp, k_embed)
    if k_mlp == p.k_max["mlp"] and reduction < p.target - p.tol:
        return k_mlp, +1
    if k_mlp == 0 and reduction > p.target + p.tol:
        return k_mlp, -1
    return k_mlp, 0


def _calibrate(p: _Problem, start: Mapping[str, int], move: Move) -> Tuple[Counts, int]:
    """Choose k_mlp on the exact count; while it sits at a bound, `move` heads/embed one unit at a time.
    Returns the counts and the number of such repair steps."""
    k_head, k_embed = start["heads"], start["embed"]
    k_mlp, need = _mlp_count(p, k_head, k_embed)
    direction, steps = need, 0
    while need != 0 and need == direction:
        component = move(k_head, k_embed, direction)
        if component is None:
            break
        if component == "heads":
            k_head += direction
        else:
            k_embed += direction
        steps += 1
        k_mlp, need = _mlp_count(p, k_head, k_embed)
    return {"heads": k_head, "mlp": k_mlp, "embed": k_embed}, steps


def _allocate(p: _Problem, crit: Mapping[str, np.ndarray], matrix: np.ndarray,
              options: SearchOptions) -> Tuple[Counts, int, dict]:
    """The counts of the mode `options` selects, the repair steps and the report's mode entries."""
    if options.layers != 3:
        component = COMPONENTS[options.layers]
        return _single_component(p, component), 0, {"mode": f"{component} only"}
    if options.use_interactions and np.any(matrix != 0):
        start, move, info = _interactions_start(p, matrix, options)
    else:
        start, move, info = _first_order_start(p, crit)
    return (*_calibrate(p, start, move), info)


def prune(criteria: Mapping[str, torch.Tensor], C, arch: DeiTArch, options: SearchOptions,
          model_name: str = "") -> Tuple[PruneMask, dict]:
    """Choose the pruned units (docs/METHOD.md section 4).

    The target is checked; each component gets its order (`pruning.selection`); the counts come
    from one mode -- `layers` 0|1|2: that component alone; 3 with `use_interactions` and C not all
    zero: the evolution strategy; else first-order -- and, for all three components, the MLP count
    is calibrated on the exact MACs. The mask's exact reduction must be within 0.5% of the target.

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
    crit = criteria_blocks(criteria, arch)
    p = _Problem(arch, component_orders(crit, options.protect), target, options.flops_threshold)
    matrix = interaction_matrix(C) if C is not None else np.zeros((3, 3))
    k, steps, info = _allocate(p, crit, matrix, options)
    mask = mask_from_orders(arch, p.orders, k, model_name)
    before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
    achieved = 1.0 - after / before
    if abs(achieved - target) > ACCEPT_TOLERANCE:
        raise UserError(f"{TARGET_FLAG} {target}: the closest mask found removes {achieved:.2%} of the FLOPs "
                        f"(more than 0.5% off); choose another target or {LAYERS_FLAG}")
    ratios = {c: k[c] / p.totals[c] for c in COMPONENTS}
    report = dict(target=target, layers=layers, protect=options.protect, seed=options.seed, **info)
    report.update(counts=dict(k), totals=p.totals, ratios=ratios, repair_steps=steps,
                  fitness=float(objective(matrix, ratios["heads"], ratios["mlp"], ratios["embed"])),
                  macs_before=before, macs_after=after, achieved_reduction=achieved)
    return mask, report
