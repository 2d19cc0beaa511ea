"""Variance of the interaction matrix C over seeds: `--hessian_estimator reference|rb`, `--hessian_blocks K`.

On the demo's data and model (DIGITS, deit_demo_patch8_32, its pretrained weights; trained here by
the demo's step 1 (`benchmarks.common.pretrain`, as `benchmarks/ablation.py` does) unless `--pretrained` names a file), in-process,
method 2 with interactions, 1 torch thread:

1. PruningScorer itself scores the first `--check_batches` batches of seed 0 with each estimator:
   its time per batch, and the C that step 2 must reproduce.
2. Per batch, ONE forward and backward and the Hessian-vector products of every row that any
   seed's draws need, with respect to EVERY gate; each (seed, estimator)'s C is then read from
   them with the pass's own draws (`block_draw`), as `add_interactions` does: the C of many seeds
   and estimators at the cost of at most 2 x depth + 1 products per batch. The smaller feeds' C
   are the same pass after its first batches (batch k of a pass does not depend on the feed).

Two ways to vary the seed:
  * seed  -- `--seed s` as in main.py: the scoring batches, their augmentation AND the block draws;
  * draws -- the data of seed 0, only the draws' seed varies: the estimator's own noise.
Reported per mode, feed and estimator: the relative std (sample std / |mean| over seeds) of each
entry of C the search reads (diagonal and upper triangle), the search's choice on each C
(`pruning.search.prune` at 50% FLOPs, search seed 0 throughout), and the time per batch.

    OMP_NUM_THREADS=1 python benchmarks/bench_interactions.py --seeds 8 \
        --pretrained output/bench_interactions/pretrain/best_checkpoint.pth --markdown logs/interactions_variance.md

Everything goes under `--output_dir` (default output/bench_interactions), the table included unless
`--markdown` says otherwise.
"""
import argparse
import itertools
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (DEMO_MODEL, Runner, check_minimums, command_line, environment,  # noqa: E402
                               markdown_table, pretrain, timed, write_report)
from args import data_config, defaults, mixup_config  # noqa: E402
from datasets import build_dataset, build_mixup  # noqa: E402
from losses import build_base_criterion  # noqa: E402
from models import create_model  # noqa: E402
from models.loading import load_pretrained  # noqa: E402
from pruning.feed import feed_batches, num_feed_batches  # noqa: E402
from pruning.scoring import PruningScorer, gates_only_grad  # noqa: E402
from pruning.interactions import block_draw, hvp_sums  # noqa: E402
from pruning.mask import COMPONENTS  # noqa: E402
from pruning.search import SearchOptions, prune  # noqa: E402
from utils import Parser, UserError, atomic_write_json, cli_entry  # noqa: E402

ESTIMATORS = {"reference": ("reference", 1), "rb": ("rb", 1), "rb K=2": ("rb", 2), "rb K=4": ("rb", 4),
              "reference K=4": ("reference", 4)}  # the last: is it rb or the K draws that help?
ENTRIES = [(i, j) for i in range(3) for j in range(i, 3)]  # what the search reads
NAMES = ("H", "M", "E")  # heads, MLP, embedding
MODES = ("seed", "draws")
# main.py's configuration of the demo's step 2 (`benchmarks.common.data_flags`: batch 64 at 32 px, no
# augmentation but the crop, no mixup)
DATA = data_config(defaults(data_set="DIGITS", input_size=32, batch_size=64, num_workers=1, hflip=0.0, aa="",
                            reprob=0.0), device="cpu")
MIXUP = mixup_config(defaults(mixup=0.0, cutmix=0.0))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", default="", help="the demo's pretrained checkpoint (default: trained by the "
                                                    "demo's step 1 into {output_dir}/pretrain)")
    p.add_argument("--pretrain_epochs", type=int, default=40, help="the demo's step 1 (default: 40)")
    p.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (default: 8)")
    p.add_argument("--feeds", type=float, nargs="+", default=[0.1, 0.2, 1.0], help="--pruning_feed_percent values")
    p.add_argument("--seed_feeds", type=float, nargs="+", default=[0.1, 0.2, 1.0],
                   help="the feeds of the seed mode (each seed scores its own data: costlier)")
    p.add_argument("--check_batches", type=int, default=3,
                   help="batches PruningScorer itself scores per estimator: its time, and the check of the "
                        "C rebuilt from the products (default: 3)")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--target", type=float, default=0.5, help="FLOPs fraction removed by the search (default: 0.5)")
    p.add_argument("--output_dir", default="output/bench_interactions")
    p.add_argument("--markdown", default="", help="the table (default: {output_dir}/interactions_variance.md)")
    return p.parse_args(argv)


def load_batches(dataset, num_classes: int, seed: int, count: int) -> list:
    """The first `count` batches of the pass of `--seed seed` (any feed's batches are a prefix of these)."""
    mixup_fn = build_mixup(MIXUP, num_classes)
    batches, mine, _ = feed_batches(dataset, DATA.batch_size, 1.0, seed, 0, 1, mixup_fn, 0, False)
    return [b for _, b in zip(range(min(mine, count)), batches)]


def draws_of(seed: int, batch_index: int, depth: int, blocks: int) -> list:
    """The pass's draws (`PruningScorer._draws`)."""
    return [block_draw(seed, batch_index, depth)] + [block_draw(seed, batch_index, depth, draw=k)
                                                     for k in range(1, blocks)]


def batch_rows(model, criterion, images, targets, blocks_l) -> dict:
    """One batch's Hessian-vector products with respect to EVERY gate tensor (sums per tensor, float64):
    (i, l) -> row of heads (i=0) / MLP (i=1) at block l, for l in `blocks_l`; 'embed' -> the embedding row.
    Every estimator's C for any draw of these blocks is read from them (`estimate`)."""
    depth = model.arch.depth
    with gates_only_grad(model) as gates, torch.enable_grad():
        grads = torch.autograd.grad(criterion(model(images), targets), gates, create_graph=True)
        rows = {(i, l): torch.stack(hvp_sums(grads[i * depth + l], gates, True)).numpy()
                for l in sorted(blocks_l) for i in range(2)}
        rows["embed"] = torch.stack(hvp_sums(grads[-1], gates, False)).numpy()
    return rows


def estimate(rows: dict, draws: list, estimator: str, depth: int) -> np.ndarray:
    """One batch's C (before the normalisers), as `pruning.interactions.add_interactions` computes it."""
    C = np.zeros((3, 3))
    for d in draws:
        for i in range(2):
            r = rows[(i, d.l)]
            if estimator == "reference":
                C[i] += np.array([r[d.m[i][0]], r[depth + d.m[i][1]], r[-1]]) / len(draws)
            else:
                C[i] += np.array([r[:d.l + 1].mean(), r[depth:depth + d.l + 1].mean(), r[-1]]) / len(draws)
    C[2] = rows["embed"][[0, depth, -1]]
    return C


def pass_C(model, criterion, batches: list, seeds: List[int], estimators: List[str], prefixes: List[int],
           normalisers: np.ndarray) -> Tuple[Dict[tuple, np.ndarray], dict]:
    """({(seed, estimator name, prefix): C of the pass with that seed's draws on the first `prefix` batches},
    {prefix: the method 2 criteria of those batches (PruningScorer, first order)})."""
    depth = model.arch.depth
    total = {(s, e): np.zeros((3, 3)) for s in seeds for e in estimators}
    first_order = PruningScorer(model, criterion, method=2)
    out, criteria = {}, {}
    for k, (images, targets) in enumerate(batches):
        first_order.score_batch(images, targets, k)
        if k + 1 in prefixes:
            criteria[k + 1] = first_order.finalize()[0]
        draws = {(s, e): draws_of(s, k, depth, ESTIMATORS[e][1]) for s in seeds for e in estimators}
        rows = batch_rows(model, criterion, images, targets, {d.l for ds in draws.values() for d in ds})
        for (s, e), ds in draws.items():
            total[(s, e)] += estimate(rows, ds, ESTIMATORS[e][0], depth) / normalisers
            if k + 1 in prefixes:
                out[(s, e, k + 1)] = total[(s, e)] / (k + 1)
    return out, criteria


def real_pass(model, criterion, batches: list, seed: int, name: str) -> dict:
    """PruningScorer itself on `batches`: its criteria, C and time per batch."""
    estimator, blocks = ESTIMATORS[name]
    scorer = PruningScorer(model, criterion, method=2, need_hessian=True, seed=seed, estimator=estimator,
                           hessian_blocks=blocks)
    wall, cpu = [], []
    for k, (images, targets) in enumerate(batches):
        _, w, c = timed(lambda: scorer.score_batch(images, targets, k))
        wall.append(w)
        cpu.append(c)
    criteria, C = scorer.finalize()
    return {"criteria": criteria, "C": C.numpy(), "wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def search_choice(criteria, C, arch, target: float) -> Dict[str, float]:
    _, report = prune(criteria, C, arch, SearchOptions(flops_percentage=target, seed=0))
    return {c: float(report["ratios"][c]) for c in COMPONENTS}


def rel_std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / abs(np.mean(values)))


def summarise(rows: List[dict]) -> dict:
    """Over seeds: relative std per entry, the search's fractions and how often its choice differs."""
    Cs = np.stack([r["C"] for r in rows])
    ratios = [r["ratios"] for r in rows]
    pruned_sets = [frozenset(c for c in COMPONENTS if r[c] > 0) for r in ratios]
    orders = [tuple(sorted(COMPONENTS, key=lambda c: r[c])) for r in ratios]
    pairs = list(itertools.combinations(range(len(rows)), 2))
    return {
        "rel_std": {f"{NAMES[i]}{NAMES[j]}": rel_std(Cs[:, i, j]) for i, j in ENTRIES},
        "sign_flips": sum(len({np.sign(v) for v in Cs[:, i, j]}) > 1 for i, j in ENTRIES),
        "r_mean": {c: float(np.mean([r[c] for r in ratios])) for c in COMPONENTS},
        "r_std": {c: float(np.std([r[c] for r in ratios], ddof=1)) for c in COMPONENTS},
        "set_differs": sum(pruned_sets[a] != pruned_sets[b] for a, b in pairs) / len(pairs),
        "order_differs": sum(orders[a] != orders[b] for a, b in pairs) / len(pairs),
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else ("same (no spread)" if a == 0 else "inf")


def write_markdown(args, path: str, results: dict, timing: dict, check_diff: dict, batches_of: Dict[float, int],
                   feeds: dict, command: str, wall: float) -> None:
    diag = [f"{n}{n}" for n in NAMES]
    lines = [
        "# Variance of the interaction matrix C over seeds: reference vs Rao-Blackwellised estimator", "",
        "```", command, "```", "",
        f"Written by `benchmarks/bench_interactions.py` in {wall / 60:.1f} min on {environment()}.", "",
        f"Demo model `{DEMO_MODEL}` (6 blocks), its pretrained weights ({args.pretrained_from}), "
        "DIGITS training set with the demo's data flags (batch 64), method 2 with interactions, "
        f"seeds 0..{args.seeds - 1}. "
        "Feeds and their batch counts: " + ", ".join(f"{f} -> {n}" for f, n in batches_of.items()) + ".", "",
        "* *seed* mode: the seed does what `--seed` does in main.py -- it draws the scoring batches, their "
        "augmentation and the interaction blocks; *draws* mode: the data of seed 0 for every seed, only the "
        "blocks' seed varies (the estimator's own noise).",
        "* How C is computed: per batch, the Hessian-vector products of every drawn row with respect to EVERY "
        "gate, then each estimator's C is read from them with the pass's own draws (`block_draw` of (seed, batch, "
        "draw)), as `add_interactions` does. Check against `PruningScorer` itself on the first "
        f"{args.check_batches} batches of seed 0 (max relative difference of C): "
        + ", ".join(f"{e} {d:.1e}" for e, d in check_diff.items()) + ".",
        "* rel std = sample std / |mean| over seeds of each entry of C the search reads (H heads, M MLP, "
        "E embedding; diagonal and upper triangle). *flips*: entries (of 6) whose sign is not the same for every "
        "seed.",
        f"* The search: `pruning.search.prune` at {args.target:.0%} FLOPs on each seed's criteria and C, search "
        "seed 0 for all (only C, and in seed mode the criteria, differ). r = pruned fraction of heads / MLP "
        "neurons / embedding channels, mean ± sample std over seeds. *set differs*: fraction of seed pairs whose "
        "sets of pruned components (r > 0) differ; *order differs*: fraction of seed pairs whose ordering of the "
        "three components by pruned fraction differs.", "",
    ]
    for mode in args.modes:
        lines += [f"## {mode} mode", ""]
        for feed in feeds[mode]:
            res = results[mode][str(feed)]
            lines += [f"### feed {feed} ({batches_of[feed]} batches)", "",
                      "| estimator | " + " | ".join(f"rel std {NAMES[i]}{NAMES[j]}" for i, j in ENTRIES) +
                      " | mean rel std diag | flips | r heads / mlp / embed | set differs | order differs |",
                      "|---" * (len(ENTRIES) + 6) + "|"]
            for name in args.estimators:
                s = res[name]
                r = " / ".join(f"{s['r_mean'][c]:.3f}±{s['r_std'][c]:.3f}" for c in COMPONENTS)
                lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in s["rel_std"].values()) +
                             f" | {np.mean([s['rel_std'][d] for d in diag]):.3f} | {s['sign_flips']} | {r} | "
                             f"{s['set_differs']:.2f} | {s['order_differs']:.2f} |")
            if "reference" in res:
                ratios = [f"{name}: " + ", ".join(f"{d} {ratio(res['reference']['rel_std'][d], res[name]['rel_std'][d])}"
                                                  for d in diag) for name in args.estimators if name != "reference"]
                lines += ["", "Diagonal rel std of reference / estimator (> 1: lower variance): "
                          + "; ".join(ratios) + "."]
            lines.append("")
    lines += ["## Time per batch (PruningScorer itself)", "",
              f"Median over the first {args.check_batches} batches of seed 0, 1 torch thread, on a shared machine.", ""]
    lines += markdown_table(
        ["estimator", "Hessian-vector products", "s/batch (wall)", "s/batch (CPU)", "CPU vs reference"],
        [[name, 2 * ESTIMATORS[name][1] + 1, f"{timing[name]['wall']:.3f}", f"{timing[name]['cpu']:.3f}",
          f"{timing[name]['cpu'] / timing['reference']['cpu']:.2f}x" if "reference" in timing else "-"]
         for name in args.estimators])
    write_report(lines, path, say=False)


@cli_entry
def main(args) -> None:
    check_minimums(args, {"--seeds": 2})  # a std over seeds
    if not all(0 < f <= 1 for f in args.feeds + args.seed_feeds):
        raise UserError(f"--feeds and --seed_feeds must be in (0, 1], got {args.feeds} and {args.seed_feeds}")
    torch.set_num_threads(1)
    start = time.time()
    command = "OMP_NUM_THREADS=1 " + command_line(sys.argv[0])
    runner = Runner(sys.executable)
    args.pretrained_from = (f"`--pretrained {args.pretrained}`" if args.pretrained else
                            f"the demo's step 1, {args.pretrain_epochs} epochs, best checkpoint")
    pretrained = pretrain(runner, args.pretrained, args.pretrain_epochs, args.output_dir)
    dataset, num_classes = build_dataset(True, DATA, what="training set")
    criterion = build_base_criterion(build_mixup(MIXUP, num_classes) is not None, MIXUP.smoothing)
    model = create_model(DEMO_MODEL, num_classes=num_classes, img_size=DATA.input_size)
    load_pretrained(model, pretrained)
    model.eval()
    arch, seeds = model.arch, list(range(args.seeds))
    # main.py's default --hessian_embed: the scorer's own
    normalisers = PruningScorer(model, criterion, method=2, need_hessian=True).normalisers.cpu().numpy()
    feeds = {"draws": sorted(args.feeds), "seed": sorted(args.seed_feeds)}
    batches_of = {f: num_feed_batches(len(dataset), DATA.batch_size, f) for f in sorted(set(args.feeds + args.seed_feeds))}

    # 1. PruningScorer itself (time per batch) and the check that `estimate` reproduces its C
    check = load_batches(dataset, num_classes, 0, args.check_batches)
    timing, check_diff = {}, {}
    for name in args.estimators:
        real = real_pass(model, criterion, check, 0, name)
        rebuilt = pass_C(model, criterion, check, [0], [name], [len(check)], normalisers)[0][(0, name, len(check))]
        timing[name] = {"wall": real["wall"], "cpu": real["cpu"]}
        check_diff[name] = float(np.max(np.abs(rebuilt - real["C"]) / np.abs(real["C"])))
        runner.say(f"PruningScorer {name}: {real['wall']:.3f} s/batch; C rebuilt from the products: max rel diff "
                   f"{check_diff[name]:.1e}")

    # 2. C and the search's choice per mode, feed, estimator and seed
    rows = {m: {str(f): {e: [] for e in args.estimators} for f in feeds[m]} for m in args.modes}
    for mode in args.modes:
        prefixes = [batches_of[f] for f in feeds[mode]]
        for data_seed in ([0] if mode == "draws" else seeds):
            batches = load_batches(dataset, num_classes, data_seed, max(prefixes))
            Cs, criteria = pass_C(model, criterion, batches, seeds if mode == "draws" else [data_seed],
                                  args.estimators, prefixes, normalisers)
            for (seed, name, n), C in sorted(Cs.items()):
                feed = [f for f in feeds[mode] if batches_of[f] == n]
                for f in feed:
                    rows[mode][str(f)][name].append({"seed": seed, "C": C, "ratios": search_choice(
                        criteria[n], torch.from_numpy(C), arch, args.target)})
            runner.say(f"{mode} mode, data of seed {data_seed}: {len(batches)} batches scored")
    results = {m: {f: {e: summarise(v) for e, v in fs.items()} for f, fs in ms.items()} for m, ms in rows.items()}
    raw = {m: {f: {e: [{"seed": r["seed"], "C": r["C"].tolist(), "ratios": r["ratios"]} for r in v]
                   for e, v in fs.items()} for f, fs in ms.items()} for m, ms in rows.items()}
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_json({"command": command, "summary": results, "timing": timing, "check_rel_diff": check_diff,
                       "runs": raw}, os.path.join(args.output_dir, "interactions_variance.json"))
    path = args.markdown or os.path.join(args.output_dir, "interactions_variance.md")
    write_markdown(args, path, results, timing, check_diff, batches_of, feeds, command, time.time() - start)
    runner.say(f"wrote {path}")


if __name__ == "__main__":
    main(parse_args())
