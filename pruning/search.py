"""How many units of each component go (docs/METHOD.md section 4; the reference's defects we fix:
section 7): the three allocation modes -- interactions, first-order, one component --, the
calibration of the MLP count on the exact MACs, and `prune`, which selects the units with them.
"""
import dataclasses
import functools
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from models.build import Arch
from models.mask import PruneMask
from pruning.evolution import CHILDREN, GENERATIONS, POPULATION, evolution_search, interaction_matrix, objective
from pruning.flops import analytic_macs, mask_macs
from pruning.mask import COMPONENTS, group_of, group_offsets, group_sizes
from pruning.selection import (block_sequences, component_orders, counts_from_ratios, criteria_flat, group_limits,
                               mask_from_orders, max_prunable)
from utils import UserError

ACCEPT_TOLERANCE = 0.005  # |achieved - target| of the final mask (absolute fraction of MACs)
LAYER_CHOICES = {0: "heads", 1: "mlp", 2: "embed", 3: "all"}
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
        round_to: every block's kept MLP width and the kept embedding width are multiples of it
            (`--round_to`; 1: the reference's unit-level selection).
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
    round_to: int = 1


def _check_options(target: float, layers: int) -> None:
    try:
        ok = bool(0.0 < float(target) < 1.0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"must be a fraction of the FLOPs to remove in (0, 1), got {target!r}",
                        field="pruning_flops_percentage")
    if layers not in LAYER_CHOICES:
        raise UserError(f"must be 0 (heads), 1 (MLP), 2 (embedding) or 3 (all), got {layers!r}", field="pruning_layers")


def check_round_to(arch: Arch, round_to) -> None:
    """Raise `UserError` unless `round_to` is a positive integer dividing the embedding and MLP widths."""
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise UserError(f"must be a positive integer (1: no rounding), got {round_to!r}", field="round_to")
    if arch.family == "swin":
        if round_to > 1:
            raise UserError("is not supported for Swin models yet (their stage widths are cut by one order); use 1",
                            field="round_to")
        return
    for what, width in (("embedding width", arch.embed_dim), ("MLP width", arch.mlp_hidden)):
        if round_to > width:
            raise UserError(f"{round_to} is larger than the model's {what} {width}", field="round_to")
        if width % round_to:
            raise UserError(f"{round_to} does not divide the model's {what} {width}: choose a divisor",
                            field="round_to")


def _aligned_max_prunable(arch: Arch, protect: bool, round_to: int) -> Dict[str, int]:
    """`max_prunable` when the kept MLP and embedding widths must be multiples of `round_to`."""
    limit = dict(max_prunable(arch, protect))
    per_group = group_limits(arch, protect)
    for c in ("mlp", "embed"):
        limit[c] = sum(n - -(-(n - most) // round_to) * round_to for n, most in zip(group_sizes(arch)[c], per_group[c]))
    return limit


def _spread(total: int, sizes: list, limits: list) -> list:
    """Units kept per group when `total` units of the groups go: in proportion to the group sizes
    (equal groups: evenly, the first groups one more), none beyond its group's prunable `limits`
    (what a group cannot take goes to the first groups with room)."""
    whole = sum(sizes)
    pruned = [min(total * n // whole, limit) for n, limit in zip(sizes, limits)]
    left = total - sum(pruned)
    while left > 0:
        room = [i for i, (p, limit) in enumerate(zip(pruned, limits)) if p < limit][:left]
        if not room:
            break
        for i in room:
            pruned[i] += 1
        left -= len(room)
    return [n - p for n, p in zip(sizes, pruned)]


def structure_macs(arch: Arch, width: list, heads: list, hidden: list) -> int:
    """Exact MACs of the kept embedding width of each group (a ViT: one), heads and neurons per block."""
    return analytic_macs(arch, width if arch.family == "swin" else width[0], heads, hidden)["total"]


def _even_macs(arch: Arch, k: Mapping[str, int], protect: bool = True) -> int:
    """Exact MACs when the k pruned units of each component are spread evenly over its groups, each
    within what protection lets it lose (for a ViT the count only depends on the per-block totals:
    the same for any spread that empties no block)."""
    sizes, limits = group_sizes(arch), group_limits(arch, protect)
    return structure_macs(arch, *(_spread(k.get(c, 0), sizes[c], limits[c]) for c in ("embed", "heads", "mlp")))


def _even_reduction(arch: Arch, k: Mapping[str, int], protect: bool = True) -> float:
    return 1.0 - _even_macs(arch, k, protect) / analytic_macs(arch)["total"]


def check_target_reachable(arch: Arch, target: float, layers: int = 3, protect: bool = True,
                           round_to: int = 1) -> float:
    """Raise `UserError` unless the allowed components can remove `target` of the FLOPs (+-0.5%).

    Cheap (analytic counts only): call it before any data is read. For a single component it
    also checks that some count of that component lands within the tolerance (heads and
    embedding channels are coarse units in small models).

    Args:
        arch: the unpruned architecture.
        target: fraction of the FLOPs to remove (`--pruning_flops_percentage`).
        layers: `--pruning_layers`.
        protect: `--pruning_protect`.
        round_to: `--round_to` (checked here too).

    Returns:
        The largest reduction the allowed components can give.
    """
    _check_options(target, layers)
    check_round_to(arch, round_to)
    allowed = COMPONENTS if layers == 3 else (COMPONENTS[layers],)
    limit = max_prunable(arch, protect) if round_to == 1 else _aligned_max_prunable(arch, protect, round_to)
    k_max = {c: limit[c] for c in allowed}
    best = _even_reduction(arch, k_max, protect)
    what = "all components" if layers == 3 else f"the {LAYER_CHOICES[layers]} alone"
    if best < target - ACCEPT_TOLERANCE:
        raise UserError(f"{target} is unreachable with --pruning_layers {layers}: pruning everything "
                        f"prunable of {what}{' (protection on)' if protect else ''} removes {best:.2%} of the FLOPs",
                        field="pruning_flops_percentage")
    if layers in (0, 2):  # coarse units: is some count close enough?
        c = allowed[0]
        step = round_to if c == "embed" else 1
        reductions = np.array([_even_reduction(arch, {c: k}, protect) for k in range(0, limit[c] + 1, step)])
        closest = reductions[np.argmin(np.abs(reductions - target))]
        if abs(closest - target) > ACCEPT_TOLERANCE:
            raise UserError(f"{target} cannot be met within 0.5% with --pruning_layers {layers}: pruning {c} "
                            f"gives steps of {reductions[1] - reductions[0]:.2%}, closest {closest:.2%}",
                            field="pruning_flops_percentage")
    return best


# -- the exact count of one problem -------------------------------------------------------------------

class OrderedCuts:
    """Exact MACs of cutting the first k units of each component's order, with the limits and the target.

    The tolerance of the calibration is max(threshold, one MLP neuron's share of the MACs).
    """

    def __init__(self, arch: Arch, orders: Mapping[str, np.ndarray], target: float, threshold: float):
        self.arch, self.orders, self.target = arch, orders, target
        self.sizes = group_sizes(arch)
        self.full = analytic_macs(arch)["total"]
        self.k_max = {c: len(orders[c]) for c in COMPONENTS}
        self.totals = {c: sum(sizes) for c, sizes in self.sizes.items()}
        self.savings = {c: self.full - _even_macs(arch, {c: 1}) for c in COMPONENTS}  # of one unit
        # groups of unequal cost (a Swin's stages): what one unit of each group saves
        self.group_savings = None if arch.family != "swin" else {
            c: np.array([self.full - self._macs_with_one_less(c, g) for g in range(len(sizes))], dtype=np.float64)
            for c, sizes in self.sizes.items()}
        mlp_step = self.savings["mlp"] if self.group_savings is None else self.group_savings["mlp"].max()
        self.tol = max(threshold, mlp_step / self.full)

    def _macs_with_one_less(self, component: str, group: int) -> int:
        kept = {c: list(sizes) for c, sizes in self.sizes.items()}
        kept[component][group] -= 1
        return structure_macs(self.arch, kept["embed"], kept["heads"], kept["mlp"])

    def unit_savings(self, component: str):
        """What pruning each unit of the component's order saves (a scalar when all units save the same)."""
        if self.group_savings is None:
            return self.savings[component]
        return self.group_savings[component][group_of(self.orders[component], self.sizes[component])]

    def kept_per_block(self, component: str, k: int) -> list:
        sizes = self.sizes[component]
        pruned = np.bincount(group_of(self.orders[component][:k], sizes), minlength=len(sizes))
        return (np.array(sizes) - pruned).tolist()

    def reduction(self, heads: int = 0, mlp: int = 0, embed: int = 0) -> float:
        return self.reduction_per_block(heads, self.kept_per_block("mlp", mlp), embed)

    def reduction_per_block(self, heads: int, mlp_kept: list, embed: int) -> float:
        """As `reduction`, with the kept MLP width of each block given."""
        macs = structure_macs(self.arch, self.kept_per_block("embed", embed), self.kept_per_block("heads", heads),
                              mlp_kept)
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

def _single_component(cuts: OrderedCuts, component: str) -> Counts:
    """`--pruning_layers 0|1|2`: the count of that component whose exact MACs come closest to the target."""
    k = {c: 0 for c in COMPONENTS}
    k[component] = cuts.closest(lambda n: cuts.reduction(**{component: n}), cuts.k_max[component])
    return k


def _interactions_start(cuts: OrderedCuts, matrix: np.ndarray, options: "SearchOptions") -> Tuple[Counts, Move, dict]:
    """Interactions mode: heads and embedding counts from the evolution strategy's fractions.
    Returns the start counts, the repair move (keep F highest) and the report's entries."""
    found = evolution_search(matrix, cuts.arch, cuts.target, options.flops_threshold, options.seed,
                             tuple(cuts.k_max[c] / cuts.totals[c] for c in COMPONENTS), options.population,
                             options.children, options.generations)
    if found.feasible:
        start = counts_from_ratios(cuts.arch, {"heads": found.r_head, "embed": found.r_embed}, options.protect)
    else:  # the formula found nothing feasible: start from the most pruning, the calibration repairs
        start = dict(cuts.k_max)
    info = {"mode": "interactions", "search": dataclasses.asdict(found)}
    return start, functools.partial(_objective_move, cuts, matrix), info


def _objective_move(cuts: OrderedCuts, matrix: np.ndarray, k_head: int, k_embed: int, direction: int) -> Optional[str]:
    """The head or embedding move by `direction` that keeps F highest (None when neither may move)."""
    r_mlp = cuts.k_max["mlp"] / cuts.totals["mlp"] if direction > 0 else 0.0
    best = None
    for c in ("heads", "embed"):
        k = {"heads": k_head, "embed": k_embed}
        k[c] += direction
        if 0 <= k[c] <= cuts.k_max[c]:
            f = float(objective(matrix, k["heads"] / cuts.totals["heads"], r_mlp, k["embed"] / cuts.totals["embed"]))
            if best is None or f > best[0]:
                best = (f, c)
    return None if best is None else best[1]


def _first_order_start(cuts: OrderedCuts, crit: Mapping[str, np.ndarray]) -> Tuple[Counts, Move, dict]:
    """First-order mode: all prunable units ranked by criterion per MAC saved, one global cut.
    Returns the start counts (the cut closest to the target), the repair move (the next unit by
    that score) and the report's entries."""
    score = {c: crit[c][cuts.orders[c]] / cuts.unit_savings(c) for c in COMPONENTS}
    merged = np.concatenate([score[c] for c in COMPONENTS])
    which = np.concatenate([np.full(cuts.k_max[c], i) for i, c in enumerate(COMPONENTS)])
    ranked = which[np.argsort(merged, kind="stable")]  # stable: each component keeps its own order
    cum = np.stack([np.concatenate([[0], np.cumsum(ranked == i)]) for i in range(3)])  # counts in the first t
    t = cuts.closest(lambda t: cuts.reduction(*cum[:, t].tolist()), len(ranked))
    start = {"heads": int(cum[0, t]), "embed": int(cum[2, t])}
    return start, functools.partial(_score_move, cuts, score), {"mode": "first-order"}


def _score_move(cuts: OrderedCuts, score: Mapping[str, np.ndarray], k_head: int, k_embed: int,
                direction: int) -> Optional[str]:
    """The next head or embedding unit by score: the lowest to prune one more, the highest to give one back."""
    nxt = {"heads": k_head if direction > 0 else k_head - 1, "embed": k_embed if direction > 0 else k_embed - 1}
    moves = [(score[c][i], c) for c, i in nxt.items() if 0 <= i < cuts.k_max[c]]
    if not moves:
        return None
    return (min(moves) if direction > 0 else max(moves))[1]


# -- calibration and the whole ------------------------------------------------------------------------

def _mlp_count(cuts: OrderedCuts, k_head: int, k_embed: int) -> Tuple[int, int]:
    """(k_mlp closest to the target, +1 / -1 when the MLP cannot absorb the miss: prune more / less, else 0)."""
    k_mlp = cuts.closest(lambda k: cuts.reduction(k_head, k, k_embed), cuts.k_max["mlp"])
    reduction = cuts.reduction(k_head, k_mlp, k_embed)
    if k_mlp == cuts.k_max["mlp"] and reduction < cuts.target - cuts.tol:
        return k_mlp, +1
    if k_mlp == 0 and reduction > cuts.target + cuts.tol:
        return k_mlp, -1
    return k_mlp, 0


def _calibrate(cuts: OrderedCuts, start: Mapping[str, int], move: Move) -> Tuple[Counts, int]:
    """Choose k_mlp on the exact count; while it sits at a bound, `move` heads/embed one unit at a time.
    Returns the counts and the number of such repair steps."""
    k_head, k_embed = start["heads"], start["embed"]
    k_mlp, need = _mlp_count(cuts, k_head, k_embed)
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
        k_mlp, need = _mlp_count(cuts, k_head, k_embed)
    return {"heads": k_head, "mlp": k_mlp, "embed": k_embed}, steps


# -- hardware-aligned widths (--round_to) --------------------------------------------------------------

class _MlpGroups:
    """Each block's prunable MLP neurons in groups of `n`, lowest criterion first; `j[b]` groups of
    block b pruned keep a multiple of n neurons (n divides the MLP width)."""

    def __init__(self, cuts: OrderedCuts, crit: Mapping[str, np.ndarray], n: int):
        self.cuts, self.n = cuts, n
        self.widths = cuts.sizes["mlp"]
        seqs = block_sequences(cuts.orders["mlp"], self.widths)
        self.limit = [len(s) // n for s in seqs]
        # criterion lost with each group: sum over its n neurons
        self.score = [[float(crit["mlp"][start + s[g * n:(g + 1) * n]].sum()) for g in range(self.limit[b])]
                      for b, (start, s) in enumerate(zip(group_offsets(self.widths), seqs))]

    def nearest(self, k_mlp: int) -> list:
        """Groups per block closest to the per-block counts of the first k_mlp units of the order."""
        pruned = np.array(self.widths) - np.array(self.cuts.kept_per_block("mlp", k_mlp))
        return [min(int(np.floor(x / self.n + 0.5)), lim) for x, lim in zip(pruned, self.limit)]

    def reduction(self, k_head: int, j: list, k_embed: int) -> float:
        return self.cuts.reduction_per_block(k_head, [m - self.n * g for m, g in zip(self.widths, j)], k_embed)

    def calibrate(self, k_head: int, j: list, k_embed: int) -> Tuple[list, float]:
        """Move one group at a time -- the least important next group to prune more, the most important
        pruned one to prune less -- while that brings the exact reduction closer to the target."""
        target, j = self.cuts.target, list(j)
        r = self.reduction(k_head, j, k_embed)
        while True:
            more = r < target
            if more:
                moves = [(self.score[b][g], b) for b, g in enumerate(j) if g < self.limit[b]]
            else:
                moves = [(self.score[b][g - 1], b) for b, g in enumerate(j) if g > 0]
            if not moves:
                break
            b = (min(moves) if more else max(moves))[1]
            trial = list(j)
            trial[b] += 1 if more else -1
            r_trial = self.reduction(k_head, trial, k_embed)
            if abs(r_trial - target) >= abs(r - target):
                break
            j, r = trial, r_trial
        return j, r


def _align(cuts: OrderedCuts, crit: Mapping[str, np.ndarray], k: Counts, options: "SearchOptions") -> dict:
    """Counts whose kept MLP widths (per block) and embedding width are multiples of `options.round_to`.

    The embedding count goes to the nearest aligned one (then the next nearest, ...); for each,
    the MLP groups start at the nearest aligned per-block counts and are calibrated on the exact
    MACs; the first embedding count whose result lies within one MLP group's share of the target
    is taken (else the closest result). Heads are whole units already.

    Returns:
        {'heads': int, 'mlp': [pruned neurons per block], 'embed': int}.
    """
    n, layers = options.round_to, options.layers
    groups = _MlpGroups(cuts, crit, n)
    start = groups.nearest(k["mlp"])
    if layers in (0, 1):  # the embedding stays whole
        embeds = [0]
    else:
        limit = cuts.k_max["embed"] // n * n  # n divides the width: kept = width - multiple of n
        embeds = sorted(range(0, limit + 1, n), key=lambda e: (abs(e - k["embed"]), e))
    tol = max(options.flops_threshold, n * cuts.savings["mlp"] / cuts.full)
    best = None
    for k_embed in embeds:
        if layers in (1, 3):
            j, r = groups.calibrate(k["heads"], start, k_embed)
        else:  # heads or embedding alone: the MLP stays whole
            j, r = start, groups.reduction(k["heads"], start, k_embed)
        if best is None or abs(r - cuts.target) < abs(best[2] - cuts.target):
            best = (k_embed, j, r)
        if layers != 2 and abs(r - cuts.target) <= tol:
            break
    k_embed, j, _ = best
    return {"heads": k["heads"], "mlp": [n * g for g in j], "embed": k_embed}


def _allocate(cuts: OrderedCuts, crit: Mapping[str, np.ndarray], matrix: np.ndarray,
              options: SearchOptions) -> Tuple[Counts, int, dict]:
    """The counts of the mode `options` selects, the repair steps and the report's mode entries."""
    if options.layers != 3:
        component = COMPONENTS[options.layers]
        return _single_component(cuts, component), 0, {"mode": f"{component} only"}
    if options.use_interactions and np.any(matrix != 0):
        start, move, info = _interactions_start(cuts, matrix, options)
    else:
        start, move, info = _first_order_start(cuts, crit)
    return (*_calibrate(cuts, start, move), info)


def prune(criteria: Mapping[str, torch.Tensor], C, arch: Arch, options: SearchOptions,
          model_name: str = "") -> Tuple[PruneMask, dict]:
    """Choose the pruned units (docs/METHOD.md section 4).

    The target is checked; each component gets its order (`pruning.selection`); the counts come
    from one mode -- `layers` 0|1|2: that component alone; 3 with `use_interactions` and C not all
    zero: the evolution strategy; else first-order -- and, for all three components, the MLP count
    is calibrated on the exact MACs. With `round_to` > 1 the counts are then aligned (`_align`):
    kept MLP widths per block and the kept embedding width become multiples of it, the MLP moving
    by whole groups. The mask's exact reduction must be within 0.5% of the target.

    Args:
        criteria: {'heads': [depth, num_heads], 'mlp': [depth, mlp_hidden], 'embed': [embed_dim]} (a
            Swin's: flat, `pruning.mask.criteria_shapes`); larger = more important.
        C: 3x3 interaction matrix (heads, MLP, embedding), or None; unused in first-order mode.
        arch: the unpruned architecture.
        options: target, threshold, layers, protection, interactions, seed.
        model_name: stored in the mask.

    Returns:
        (mask, report); the report holds the mode, the search's fractions and fitness, the pruned
        and total counts per component, the final fractions and fitness, and the exact MACs.
    """
    target, layers = options.flops_percentage, options.layers
    check_target_reachable(arch, target, layers, options.protect, options.round_to)
    if options.flops_threshold < 0 or not np.isfinite(options.flops_threshold):
        raise UserError(f"must be >= 0, got {options.flops_threshold!r}", field="pruning_flops_threshold")
    crit = criteria_flat(criteria, arch)
    cuts = OrderedCuts(arch, component_orders(crit, arch, options.protect), target, options.flops_threshold)
    matrix = interaction_matrix(C) if C is not None else np.zeros((3, 3))
    k, steps, info = _allocate(cuts, crit, matrix, options)
    if options.round_to > 1:
        k = _align(cuts, crit, k, options)
    mask = mask_from_orders(arch, cuts.orders, k, model_name)
    k = {c: int(np.sum(k[c])) for c in COMPONENTS}
    before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
    achieved = 1.0 - after / before
    if abs(achieved - target) > ACCEPT_TOLERANCE:
        raise UserError(f"{target}: the closest mask found removes {achieved:.2%} of the FLOPs (more than 0.5% "
                        f"off); choose another target or --pruning_layers"
                        f"{' or a smaller --round_to' if options.round_to > 1 else ''}",
                        field="pruning_flops_percentage")
    ratios = {c: k[c] / cuts.totals[c] for c in COMPONENTS}
    report = dict(target=target, layers=layers, protect=options.protect, seed=options.seed,
                  round_to=options.round_to, **info)
    report.update(counts=dict(k), totals=cuts.totals, ratios=ratios, repair_steps=steps,
                  fitness=float(objective(matrix, ratios["heads"], ratios["mlp"], ratios["embed"])),
                  macs_before=before, macs_after=after, achieved_reduction=achieved)
    return mask, report
