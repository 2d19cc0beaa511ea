"""The ablation of SAViT: six ways to pick the units to remove, at several FLOPs targets, over seeds.

The same FLOPs target, the same pretrained model and the same short fine-tune for every row:

1. savit        -- main.py: method 2 criteria + interactions C (`--need_hessian`, the reference's
                   estimator of C) + evolution search;
2. savit_rb     -- the same with `--hessian_estimator rb` (the same criteria; a lower-variance C);
3. first_order  -- main.py without `--need_hessian` (its first-order mode: one global threshold on
                   criterion / MACs saved), on the SAME criteria as (1) (`--pruning_pickle_from`);
4. magnitude    -- L1 norm of each unit's weights (`pruning.baselines.magnitude_criteria`) through
                   the same search (`pruning.search.prune`) with the C of the same seed's run (1):
                   the search's counts depend on C only, so this swaps the criterion and nothing else;
5. random       -- the per-component counts of (1), units drawn at random (protection on);
6. uniform      -- one pruned fraction r for heads, neurons and channels, r meeting the target on
                   the exact MACs count; units by the method 2 criteria of (1), one global threshold
                   per component (protection on).

Pipeline (every step through the project's own entry points):
  * pretrain once: the demo's step 1 (main_deploy.py, no mask) on the chosen data, or `--pretrained`;
  * per target t and seed s: main.py (1), (2) and (3) with `--seed s` (the seed draws the scoring
    batches, the interaction blocks and the search); the other masks are built here and saved as
    mask JSONs; the accuracy right after pruning is that of the deploy model
    (`models.load_pruned` + `engine.evaluate`: exact, mask-aware);
  * every mask is fine-tuned by the same main_deploy.py command (the demo's step 3: hard
    distillation from the pretrained model, lr 8e-3, no warm-up, cosine) with `--seed s`; the
    reported accuracy is that of the LAST epoch (no selection on the validation set).
  * per target, every SAViT estimator is compared with every other row seed by seed (paired
    differences, 95% t-interval over seeds: `benchmarks/ablation_report.py`).
Finished steps are skipped when the command is run again on the same output folder; `--jobs 2`
runs two (target, seed) units at once, one torch thread each.

    python benchmarks/ablation.py --targets 0.3 0.5 0.7 --seeds 0 1 2 3 4 --jobs 2 \
        --output_dir output/ablation

The data are scikit-learn's digits by default; `--data-path DIR` takes any ImageFolder tree
with train/ and val/ instead (then also choose `--model` and `--input-size`).
Everything, the table included (`{output_dir}/ablation.md` unless `--markdown` says otherwise),
goes under `--output_dir`; copy the table to `logs/` to update the committed one.
"""
import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.ablation_report import (ESTIMATORS, METHODS, answer, interactions_table, paired_table,  # noqa: E402
                                        per_seed_table, summary_table, target_verdict)
from benchmarks.common import (DEMO_MODEL, Runner, check_minimums, command_line, data_flags,  # noqa: E402
                               environment, epochs_logged, pretrain, write_report)
from args import data_config, defaults  # noqa: E402
from datasets import build_dataset, build_loaders  # noqa: E402
from engine import evaluate  # noqa: E402
from models import PruneMask, arch_of, load_pruned  # noqa: E402
from pruning.baselines import magnitude_criteria, pruned_counts, random_mask_with_counts, uniform_mask  # noqa: E402
from pruning.flops import mask_macs  # noqa: E402
from pruning.pickles import load_pickles  # noqa: E402
from pruning.search import SearchOptions, prune  # noqa: E402
from utils import Parser, UserError, atomic_write_json, cli_entry, load_torch_file, state_dict_of  # noqa: E402

# main.py's extra flags per SAViT estimator
SAVIT_FLAGS = {"savit": ["--need_hessian"], "savit_rb": ["--need_hessian", "--hessian_estimator", "rb"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="output/ablation", help="every run's folder goes here")
    p.add_argument("--markdown", default="",
                   help="where to write the table (atomically; default: {output_dir}/ablation.md)")
    p.add_argument("--targets", "--target", type=float, nargs="+", default=[0.3, 0.5, 0.7],
                   help="fractions of the FLOPs to remove, each in (0, 1) (default: 0.3 0.5 0.7)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="rows of the table (savit always runs: its criteria, C and counts feed the baselines)")
    p.add_argument("--pretrained", default="",
                   help="main_deploy.py checkpoint of the unpruned model; when it does not exist yet and is named "
                        "best_checkpoint.pth, step 1 trains it into its folder (default: {output_dir}/pretrain)")
    p.add_argument("--pretrain_epochs", type=int, default=40, help="the demo's step 1 (default: 40)")
    p.add_argument("--finetune_epochs", type=int, default=8,
                   help="the same short fine-tune for every mask (default: 8)")
    p.add_argument("--feed_percent", type=float, default=1.0,
                   help="main.py --pruning_feed_percent: share of the training batches scored (default: 1.0)")
    p.add_argument("--data-set", dest="data_set", default="",
                   help="DIGITS (default) or IMNET (any ImageFolder with train/ and val/, implied by --data-path)")
    p.add_argument("--data-path", dest="data_path", default="", help="the ImageFolder tree for --data-set IMNET")
    p.add_argument("--model", default=DEMO_MODEL, help=f"the gated model to prune (default: {DEMO_MODEL})")
    p.add_argument("--input-size", dest="input_size", type=int, default=32, help="image size (default: 32)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="training batch (default: 64)")
    p.add_argument("--jobs", type=int, default=1, help="(target, seed) units run at once (default: 1)")
    p.add_argument("--python", default=sys.executable)
    return p.parse_args(argv)


def check_args(args) -> None:
    check_minimums(args, {"--finetune_epochs": 1, "--pretrain_epochs": 1, "--jobs": 1})
    for t in args.targets:
        if not 0 < t < 1:
            raise UserError(f"--targets: each must be in (0, 1), got {t}")
    if not 0 < args.feed_percent <= 1:
        raise UserError(f"--feed_percent must be in (0, 1], got {args.feed_percent}")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.targets)) != len(args.targets):
        raise UserError("--seeds and --targets must not repeat a value")
    args.data_set = args.data_set or ("IMNET" if args.data_path else "DIGITS")
    if args.data_set not in ("DIGITS", "IMNET"):
        raise UserError(f"--data-set: expected DIGITS or IMNET (an ImageFolder), got {args.data_set!r}")
    if args.data_set == "IMNET" and not os.path.isdir(args.data_path):
        raise UserError(f"--data-path: expected a folder with train/ and val/, got {args.data_path!r}")
    if "savit" not in args.methods:
        args.methods = ["savit"] + list(args.methods)
    args.data_flags = data_flags(args.data_set, args.data_path, args.input_size, args.batch_size)


class Unit:
    """One (target, seed): main.py's masks, the baselines' masks, their accuracy and their fine-tunes."""

    def __init__(self, args, runner: Runner, target: float, seed: int, pretrained: str, evaluator):
        self.args, self.runner, self.target, self.seed = args, runner, target, seed
        self.pretrained, self.evaluator = pretrained, evaluator
        self.dir = os.path.join(args.output_dir, f"target{target:g}", f"seed{seed}")
        self.name = f"target {target:g}, seed {seed}"

    def prune_with_main(self) -> Dict[str, str]:
        """SAViT (each estimator asked for) and first-order masks; first-order re-uses savit's criteria."""
        common = ["--model", self.args.model, *self.args.data_flags, "--finetune", self.pretrained,
                  "--pruning_method", "2", "--pruning_layers", "3",
                  "--pruning_feed_percent", str(self.args.feed_percent),
                  "--pruning_flops_percentage", str(self.target), "--finetune_op", "2", "--seed", str(self.seed)]

        def finished(d: str) -> bool:
            return all(os.path.isfile(os.path.join(d, f)) for f in ("mask.json", "pruning_report.json"))

        runs = [(m, SAVIT_FLAGS[m]) for m in SAVIT_FLAGS if m in self.args.methods]
        if "first_order" in self.args.methods:
            runs.append(("first_order", ["--pruning_pickle_from", os.path.join(self.dir, "savit")]))
        for method, flags in runs:
            out = os.path.join(self.dir, method)
            self.runner.run("main.py", common + flags, out, finished(out), f"{self.name}: {method} pruning")
        return {m: os.path.join(self.dir, m, "mask.json") for m, _ in runs}

    def baseline_masks(self, arch, criteria, C) -> Dict[str, str]:
        """Magnitude, random and uniform masks from savit's `criteria` and `C`, saved as mask JSONs."""
        savit_dir = os.path.join(self.dir, "savit")
        counts = pruned_counts(PruneMask.load(os.path.join(savit_dir, "mask.json")))
        masks = {}
        if "magnitude" in self.args.methods:
            weights = state_dict_of(load_torch_file(self.pretrained, "--pretrained"), self.pretrained)
            options = SearchOptions(flops_percentage=self.target, use_interactions=True, seed=self.seed, protect=True)
            masks["magnitude"], _ = prune(magnitude_criteria(weights, arch), C, arch, options,
                                          model_name=self.args.model)
        if "random" in self.args.methods:
            masks["random"] = random_mask_with_counts(arch, counts, seed=self.seed, protect=True, model=self.args.model)
        if "uniform" in self.args.methods:
            masks["uniform"], _ = uniform_mask(criteria, arch, self.target, protect=True, model=self.args.model)
        paths = {}
        for name, mask in masks.items():
            paths[name] = os.path.join(self.dir, "masks", f"{name}.json")
            os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
            mask.save_json(paths[name])
        return paths

    def finetune(self, mask_path: str, method: str) -> List[dict]:
        """The demo's step 3 with a mask JSON: the same command for every method."""
        model = f"{self.args.model}_deploy"
        flags = ["--model", model, *self.args.data_flags, "--epochs", str(self.args.finetune_epochs),
                 "--masked_model", mask_path, "--finetune", self.pretrained,
                 "--teacher-model", model, "--teacher-path", self.pretrained, "--distillation-type", "hard",
                 "--lr", "8e-3", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--no-model-ema",
                 "--seed", str(self.seed)]
        out = os.path.join(self.dir, f"ft_{method}")
        done = len(epochs_logged(out)) == self.args.finetune_epochs
        self.runner.run("main_deploy.py", flags, out, done,
                        f"{self.name}: fine-tune {method} ({self.args.finetune_epochs} epochs)")
        return epochs_logged(out)

    def run(self, arch) -> Tuple[Dict[str, dict], List[dict]]:
        """Per method its row, and the C / search of each SAViT estimator."""
        masks = self.prune_with_main()
        pickles = {m: load_pickles(os.path.join(self.dir, m), 2, arch, need_hessian=True)
                   for m in SAVIT_FLAGS if m in masks}  # (criteria, C) of each SAViT run
        masks.update(self.baseline_masks(arch, *pickles["savit"]))
        interactions = []
        for m, (_, C) in pickles.items():
            with open(os.path.join(self.dir, m, "pruning_report.json")) as f:
                report = json.load(f)
            interactions.append({"seed": self.seed, "estimator": ESTIMATORS[m],
                                 "C": C.tolist(), "search": report["search"], "counts": report["counts"]})
        full_macs = mask_macs(arch)["total"]
        rows = {}
        for m in METHODS:
            if m not in masks:
                continue
            mask = PruneMask.load(masks[m])
            acc_pruned = self.evaluator(masks[m])
            reduction = 1 - mask_macs(arch, mask)["total"] / full_macs
            counts = pruned_counts(mask)
            self.runner.say(f"{self.name} {m}: pruned {counts}, FLOPs -{reduction:.2%}, "
                            f"top-1 after pruning {acc_pruned:.2f}%")
            log = self.finetune(masks[m], m)
            rows[m] = {"seed": self.seed, "counts": counts, "reduction": reduction, "acc_pruned": acc_pruned,
                       "acc_finetuned": log[-1]["test_acc1"], "acc_best": max(r["test_acc1"] for r in log),
                       "mask": os.path.relpath(masks[m], self.args.output_dir)}
            self.runner.say(f"{self.name} {m}: top-1 after fine-tune {log[-1]['test_acc1']:.2f}%")
        return rows, interactions


def describe_data(args, n_train: int, n_val: int, num_classes: int) -> str:
    if args.data_set == "DIGITS":
        what = f"scikit-learn's handwritten digits, {n_train} training / {n_val} validation images upscaled to " \
               f"{args.input_size}x{args.input_size}"
    else:
        what = f"the ImageFolder `{args.data_path}`, {n_train} training / {n_val} validation images of " \
               f"{num_classes} classes at {args.input_size}x{args.input_size}"
    return f"{what} (one validation image = {100 / n_val:.2f} points; one point = {n_val / 100:.1f} images)"


def write_markdown(args, path: str, by_target: Dict[float, Dict[str, List[dict]]], interactions: Dict[float, list],
                   unpruned: float, data_text: str, arch, pretrained_from: str, wall: float, reused: int) -> None:
    cmd = command_line(__file__)
    seeds = ", ".join(map(str, args.seeds))
    total = PruneMask.full(arch).total_counts()
    lines = [
        f"# Ablation of SAViT ({args.model}, FLOPs targets {', '.join(f'{t:.0%}' for t in sorted(by_target))})",
        "", "```", cmd, "```", "",
        f"Written by `benchmarks/ablation.py` in {wall / 60:.1f} min of wall-clock on {environment()} "
        f"({args.jobs} unit(s) at once, one torch thread each)"
        + (f"; {reused} finished step(s) of an earlier run were reused, their time is not included." if reused
           else "."),
        "",
        f"Data: {data_text}. Model `{args.model}` ({arch.depth} blocks, {arch.num_heads} heads of {arch.head_dim}, "
        f"width {arch.embed_dim}, MLP {arch.mlp_hidden}). Pretrained once ({pretrained_from}); unpruned top-1 "
        f"**{unpruned:.2f}%**. Seeds {seeds}: a seed draws main.py's scoring batches ({args.feed_percent:.0%} of the "
        "training batches), its interaction blocks and its search, the random units, and the fine-tune's data order.",
        "",
        f"Fine-tune, identical for every row: main_deploy.py `--masked_model MASK.json --finetune PRETRAINED`, "
        f"{args.finetune_epochs} epochs, AdamW lr 8e-3 (x batch {args.batch_size}/512), no warm-up, cosine, hard "
        "distillation from the pretrained model, the demo's data flags (`scripts/demo.sh` step 3, shorter; no EMA). "
        "*After pruning* = top-1 of the deploy model built from the mask and the pretrained weights (exact, "
        "mask-aware). *After fine-tune* = top-1 at the LAST epoch (no checkpoint selection on the validation set).",
        "",
        "Noise: a difference between two rows is *beyond the noise* when the two-sided 95% interval of the paired "
        "t-test over the seeds excludes zero (per seed, both rows share the pretrained model, the scoring data and "
        "the fine-tune's data order); anything else is within the noise and is not a win.",
        "",
        "## Does SAViT win?",
        "",
        *answer(by_target),
        "",
    ]
    for target in sorted(by_target):
        results = by_target[target]
        lines += [f"## {target:.0%} of the FLOPs removed", "",
                  f"Mean ± sample std over {len(args.seeds)} seeds (top-1 %):", "",
                  *summary_table(results, unpruned, total), "",
                  *target_verdict(results), "",
                  "Paired by seed (points of top-1):", "",
                  *paired_table(results), "",
                  "SAViT's interaction matrix C as main.py logs it (rows/columns heads, MLP, embedding; the search "
                  "reads the diagonal and the upper triangle), the search's pruned fractions and the final counts:",
                  "", *interactions_table(interactions[target]), "",
                  "Per seed:", "", *per_seed_table(results), ""]
    lines += [
        "## The rows",
        "",
        "- **SAViT, reference estimator**: `main.py --need_hessian --pruning_method 2 --pruning_layers 3` (the demo's "
        "step 2): Taylor criteria (g dL/dg)^2, the 3x3 interaction matrix C as the reference estimates it (one "
        "block l per batch, one block m <= l per entry), the evolution search over the pruned fractions, one global "
        "threshold per component, protection of each block's top 5%.",
        "- **SAViT, rb estimator**: the same with `--hessian_estimator rb`: the exact average over m in [0, l] "
        "instead of one draw (the same expectation, the same Hessian-vector products, docs/METHOD.md).",
        "- **first-order only**: the same main.py command without `--need_hessian`, reading the SAME seed's criteria "
        "(`--pruning_pickle_from`), so only the choice of counts differs: one global threshold over all units on "
        "criterion / MACs saved.",
        "- **magnitude**: a unit's criterion is the L1 norm of the weight-matrix entries it owns "
        "(`pruning.baselines.magnitude_criteria`). C has no meaning for magnitudes, so the search runs with the C of "
        "the same seed's reference run: it swaps the unit criterion and keeps SAViT's allocation. Protection on.",
        "- **random**: the same number of heads, neurons and channels as the seed's reference SAViT mask, chosen "
        "uniformly at random (`pruning.baselines.random_mask_with_counts`), protection on, so the FLOPs equal SAViT's.",
        "- **uniform**: one fraction r pruned from heads, neurons and channels alike, r by bisection on the exact MACs "
        "count (`pruning.baselines.uniform_mask`); units by the seed's method 2 criteria, protection on. r lands on "
        "a coarse grid when a component has few units: see the FLOPs column.",
        "",
        f"Every run's folder (main.py logs, masks, fine-tune logs and checkpoints) is under `{args.output_shown}/`; "
        f"the numbers above are also in `{args.output_shown}/results.json`.",
    ]
    write_report(lines, path, say=False)


@cli_entry
def main(args) -> None:
    check_args(args)
    args.output_shown = args.output_dir  # as given, for the markdown
    args.output_dir = os.path.abspath(args.output_dir)
    args.markdown = args.markdown or os.path.join(args.output_dir, "ablation.md")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(1)
    runner = Runner(args.python)
    started = time.time()

    data_cfg = data_config(defaults(data_set=args.data_set, data_path=args.data_path, input_size=args.input_size,
                                    batch_size=64, num_workers=0, repeated_aug=False), device="cpu")
    dataset_val, num_classes = build_dataset(False, data_cfg)
    n_train = len(build_dataset(True, data_cfg)[0])
    arch = arch_of(args.model, num_classes=num_classes, img_size=args.input_size)
    pretrained = pretrain(runner, args.pretrained, args.pretrain_epochs, args.output_dir, args.model,
                          args.data_flags)
    _, loader_val = build_loaders(data_cfg, None, dataset_val, distributed=False)
    eval_lock = threading.Lock()

    def top1(mask_path: str) -> float:
        with eval_lock:  # one evaluation at a time; they are short
            model = load_pruned(mask_path, arch, pretrained)
            return evaluate(loader_val, model, torch.device("cpu"), amp=False, print_fn=lambda _: None)["acc1"]

    unpruned_mask = os.path.join(args.output_dir, "unpruned_mask.json")
    PruneMask.full(arch, model=args.model).save_json(unpruned_mask)
    unpruned = top1(unpruned_mask)
    runner.say(f"unpruned model: top-1 {unpruned:.2f}%")

    units = [Unit(args, runner, t, s, pretrained, top1) for t in args.targets for s in args.seeds]
    by_target = {t: {m: [] for m in METHODS if m in args.methods} for t in args.targets}
    interactions: Dict[float, list] = {t: [] for t in args.targets}
    save_lock = threading.Lock()

    def run_unit(unit: Unit) -> None:
        rows, found = unit.run(arch)
        with save_lock:
            for m, row in rows.items():
                by_target[unit.target][m].append(row)
            interactions[unit.target] += found
            atomic_write_json({"unpruned_acc1": unpruned, "args": vars(args),
                               "results": {f"{t:g}": r for t, r in by_target.items()},
                               "interactions": {f"{t:g}": x for t, x in interactions.items()}},
                              os.path.join(args.output_dir, "results.json"))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run_unit, u) for u in units]:
            future.result()  # re-raises the first failure
    for t in args.targets:  # completion order varies with --jobs
        for rows in by_target[t].values():
            rows.sort(key=lambda r: r["seed"])
        interactions[t].sort(key=lambda x: (x["seed"], x["estimator"]))

    wall = time.time() - started
    pretrained_from = (f"`--pretrained {args.pretrained}`" if args.pretrained else
                       f"the demo's step 1, {args.pretrain_epochs} epochs, best checkpoint")
    write_markdown(args, args.markdown, by_target, interactions, unpruned,
                   describe_data(args, n_train, len(dataset_val), num_classes), arch, pretrained_from, wall,
                   runner.reused)
    runner.say(f"done in {wall / 60:.1f} min; table written to {args.markdown}")
    with open(args.markdown) as f:
        print(f.read())


if __name__ == "__main__":
    main(parse_args())
