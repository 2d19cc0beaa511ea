"""The tables and the verdict of `benchmarks/ablation.py`: statistics over seeds, paired comparisons.

A difference between two methods is called *beyond the noise* when the two-sided 95% interval of
the paired t-test over seeds excludes zero: mean(d) +- t(0.975, n-1) * std(d) / sqrt(n), with d the
per-seed difference (both rows of a seed share the pretrained model, the scoring data and the
fine-tune's data order). Everything else is *within the noise* and is never called a win.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.stats

from pruning.mask import COMPONENTS

SAVIT_METHODS = ("savit", "savit_rb")
ESTIMATORS = {"savit": "reference", "savit_rb": "rb"}  # each SAViT row's main.py --hessian_estimator
BASELINES = ("first_order", "magnitude", "random", "uniform")
METHODS = SAVIT_METHODS + BASELINES
LABELS = {
    "savit": "SAViT, reference estimator of C",
    "savit_rb": "SAViT, rb estimator of C",
    "first_order": "first-order only (no interactions)",
    "magnitude": "magnitude (L1), same search",
    "random": "random units, SAViT's counts",
    "uniform": "uniform ratio per component",
}
STAGES = (("acc_pruned", "right after pruning"), ("acc_finetuned", "after fine-tune"))


def t975(df: int) -> float:
    """Student's t quantile t(0.975, df): the two-sided 95% interval's factor."""
    if df < 1:
        raise ValueError("a paired interval needs at least 2 seeds")
    return float(scipy.stats.t.ppf(0.975, df))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_mean_std(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


class Paired:
    """A minus B over the seeds both have: mean, std, 95% half-width and the verdict."""

    def __init__(self, a: Dict[int, float], b: Dict[int, float]):
        seeds = sorted(set(a) & set(b))
        self.diffs = np.asarray([a[s] - b[s] for s in seeds], dtype=np.float64)
        self.n = len(seeds)
        self.mean = float(self.diffs.mean()) if self.n else 0.0
        self.std = float(self.diffs.std(ddof=1)) if self.n > 1 else 0.0
        self.half_width = t975(self.n - 1) * self.std / math.sqrt(self.n) if self.n > 1 else math.inf
        self.ahead = int((self.diffs > 0).sum())
        self.tied = int((self.diffs == 0).sum())

    @property
    def verdict(self) -> str:
        """'ahead', 'behind' (beyond the noise) or 'within'."""
        if self.n > 1 and self.mean - self.half_width > 0:
            return "ahead"
        if self.n > 1 and self.mean + self.half_width < 0:
            return "behind"
        return "within"

    def cells(self) -> List[str]:
        interval = "-" if math.isinf(self.half_width) else \
            f"[{self.mean - self.half_width:+.2f}, {self.mean + self.half_width:+.2f}]"
        seeds = f"{self.ahead} of {self.n}" + (f" ({self.tied} tied)" if self.tied else "")
        verdict = {"ahead": "**A ahead**", "behind": "**A behind**", "within": "within the noise"}[self.verdict]
        return [f"{self.mean:+.2f} ± {self.std:.2f}", interval, seeds, verdict]


def by_seed(rows: List[dict], key: str) -> Dict[int, float]:
    return {r["seed"]: r[key] for r in rows}


def comparisons(results: Dict[str, List[dict]], savit: str, key: str) -> Dict[str, Paired]:
    """`savit` minus every other method present (the other SAViT estimator included)."""
    return {m: Paired(by_seed(results[savit], key), by_seed(results[m], key))
            for m in METHODS if m in results and m != savit}


def savit_stages(results: Dict[str, List[dict]]) -> List[Tuple[str, str, str]]:
    """(SAViT row, accuracy key, stage) for each SAViT row in `results` and each stage."""
    return [(savit, key, stage) for savit in SAVIT_METHODS if savit in results for key, stage in STAGES]


def target_verdict(results: Dict[str, List[dict]]) -> List[str]:
    """One plain line per SAViT estimator and stage: whom it beats, whom it loses to, beyond the noise."""
    lines = []
    for savit, key, stage in savit_stages(results):
        pairs = comparisons(results, savit, key)
        baselines = [m for m in BASELINES if m in pairs]
        named = {v: ", ".join(f"{m} ({pairs[m].mean:+.2f})" for m in baselines if pairs[m].verdict == v) or "none"
                 for v in ("ahead", "behind", "within")}
        means = {m: mean_std([r[key] for r in results[m]])[0] for m in results}
        rank = 1 + sum(means[m] > means[savit] for m in means if m != savit)
        win = "**wins**" if wins(results, savit, key) else "does not win"
        lines.append(f"- {LABELS[savit]}, {stage}: {win} (best mean: rank {rank} of {len(means)}). "
                     f"Ahead beyond the noise of: {named['ahead']}; behind beyond the noise: {named['behind']}; "
                     f"within the noise: {named['within']}.")
    return lines


def wins(results: Dict[str, List[dict]], savit: str, key: str) -> Optional[bool]:
    """True when `savit` is ahead of every baseline present beyond the noise; None without baselines."""
    if savit not in results:
        return None
    pairs = comparisons(results, savit, key)
    baselines = [m for m in BASELINES if m in pairs]
    if not baselines:
        return None
    return all(pairs[m].verdict == "ahead" for m in baselines)


def summary_table(results: Dict[str, List[dict]], unpruned: float, total_units: Dict[str, int]) -> List[str]:
    lines = ["| method | pruned heads / neurons / channels (mean) | FLOPs reduction | top-1 after pruning | "
             "top-1 after fine-tune |", "|---|---|---|---|---|",
             "| unpruned | 0 / 0 / 0 of " + " / ".join(str(total_units[c]) for c in COMPONENTS)
             + f" | 0 | {unpruned:.2f} | - |"]
    for m in METHODS:
        if m not in results:
            continue
        rs = results[m]
        counts = " / ".join(f"{np.mean([r['counts'][c] for r in rs]):.0f}" for c in COMPONENTS)
        reduction = np.mean([100 * r["reduction"] for r in rs])
        lines.append(f"| {LABELS[m]} | {counts} | {reduction:.2f}% | {fmt_mean_std([r['acc_pruned'] for r in rs])} "
                     f"| {fmt_mean_std([r['acc_finetuned'] for r in rs])} |")
    return lines


def paired_table(results: Dict[str, List[dict]]) -> List[str]:
    lines = ["| A minus B | stage | mean ± std (points) | 95% interval | A ahead (seeds) | verdict |",
             "|---|---|---|---|---|---|"]
    for savit, key, stage in savit_stages(results):
        for m, pair in comparisons(results, savit, key).items():
            if m not in SAVIT_METHODS or savit == "savit_rb":  # rb minus reference is listed once
                lines.append(f"| {LABELS[savit]} minus {LABELS[m]} | {stage} | " + " | ".join(pair.cells()) + " |")
    return lines


def interactions_table(interactions: List[dict]) -> List[str]:
    lines = ["| seed | estimator | C_hh | C_mm | C_ee | C_hm | C_he | C_me | search r_head / r_mlp / r_embed | "
             "pruned heads / neurons / channels |", "|---|---|---|---|---|---|---|---|---|---|"]
    for x in interactions:
        entries = " | ".join(f"{x['C'][i][j]:+.2e}" for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))
        search = x["search"]
        lines.append(f"| {x['seed']} | {x['estimator']} | {entries} | {search['r_head']:.3f} / {search['r_mlp']:.3f} "
                     f"/ {search['r_embed']:.3f} | " + " / ".join(str(x["counts"][c]) for c in COMPONENTS) + " |")
    return lines


def per_seed_table(results: Dict[str, List[dict]]) -> List[str]:
    lines = ["| method | seed | pruned heads / neurons / channels | FLOPs reduction | after pruning | after fine-tune "
             "(best epoch) |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        for r in results.get(m, []):
            counts = " / ".join(str(r["counts"][c]) for c in COMPONENTS)
            lines.append(f"| {m} | {r['seed']} | {counts} | {100 * r['reduction']:.2f}% | {r['acc_pruned']:.2f} | "
                         f"{r['acc_finetuned']:.2f} ({r['acc_best']:.2f}) |")
    return lines


def answer(by_target: Dict[float, Dict[str, List[dict]]]) -> List[str]:
    """The plain answer over all targets: where (target, estimator, stage) SAViT beats every baseline."""
    lines = ["| FLOPs removed | estimator | beats every baseline right after pruning | "
             "beats every baseline after fine-tune |", "|---|---|---|---|"]
    won = []
    for target in sorted(by_target):
        for savit in SAVIT_METHODS:
            flags = [wins(by_target[target], savit, key) for key, _ in STAGES]
            if flags[0] is None:
                continue
            lines.append(f"| {target:.0%} | {ESTIMATORS[savit]} | "
                         + " | ".join("yes" if f else "no" for f in flags) + " |")
            won += [(target, savit, stage) for f, (_, stage) in zip(flags, STAGES) if f]
    if won:
        head = "SAViT beats every baseline beyond the noise at: " + "; ".join(
            f"{t:.0%} with the {ESTIMATORS[s]} estimator of C, {stage}" for t, s, stage in won) + "."
    else:
        head = "SAViT beats every baseline beyond the noise at no target, with neither estimator, at neither stage."
    return [f"**{head}**", ""] + lines
