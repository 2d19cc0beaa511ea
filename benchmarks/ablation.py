"""The ablation table of SAViT on the demo's data (scikit-learn digits, deit_demo_patch8_32, 50% FLOPs).

Five ways to pick the units to remove at the same FLOPs target, each given the same short
fine-tune, over several seeds:

1. savit       -- main.py: method 2 criteria + interactions C (`--need_hessian`) + evolution search;
2. first_order -- main.py without `--need_hessian` (its first-order mode: one global threshold on
                  criterion / MACs saved), on the SAME criteria as (1) (`--pruning_pickle_from`);
3. magnitude   -- L1 norm of each unit's weights (`pruning.baselines.magnitude_criteria`) through
                  the same search (`pruning.search.prune`) with the C of the same seed's SAViT run:
                  the search's counts depend on C only, so this swaps the criterion and nothing else;
4. random      -- SAViT's per-component counts, units drawn at random (protection on);
5. uniform     -- one pruned fraction r for heads, neurons and channels, r meeting the target on
                  the exact MACs count; units by the method 2 criteria of (1), one global threshold
                  per component (protection on).

Pipeline (every step through the project's own entry points):
  * pretrain once: the demo's step-1 command (main_deploy.py, no mask), or `--pretrained FILE`;
  * per seed s: main.py (SAViT, then first-order) with `--seed s` (the seed draws the scoring
    batches, the interaction blocks and the search); the other masks are built here and saved as
    mask JSONs; the accuracy right after pruning is that of the deploy model
    (`pruning.deploy.load_masked_model` + `engine.evaluate`: exact, mask-aware);
  * every mask is fine-tuned by the same main_deploy.py command (the demo's step 3: hard
    distillation from the pretrained model, lr 8e-3, no warm-up, cosine) with `--seed s`; the
    reported accuracy is that of the LAST epoch (no selection on the validation set).
Finished steps are skipped when the command is run again on the same output folder.

    OMP_NUM_THREADS=1 python benchmarks/ablation.py --seeds 0 1 2 --finetune_epochs 10 \
        --output_dir output/ablation

Everything, the table included (`{output_dir}/ablation.md` unless `--markdown` says otherwise),
goes under `--output_dir`; copy the table to `logs/` to update the committed one.
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datasets import DataConfig, build_dataset, build_loaders  # noqa: E402
from engine import evaluate  # noqa: E402
from models import arch_of  # noqa: E402
from pruning.baselines import magnitude_criteria, pruned_counts, random_mask, uniform_mask  # noqa: E402
from pruning.deploy import load_masked_model  # noqa: E402
from pruning.flops import mask_macs  # noqa: E402
from pruning.mask import COMPONENTS, PruneMask  # noqa: E402
from pruning.pickles import load_pickles  # noqa: E402
from pruning.search import SearchOptions, prune  # noqa: E402
from utils import (Parser, UserError, atomic_write_json, atomic_write_text, cli_entry, load_torch_file,  # noqa: E402
                   state_dict_of)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "deit_demo_patch8_32"
METHODS = ("savit", "first_order", "magnitude", "random", "uniform")
LABELS = {
    "savit": "SAViT (method 2 + interactions + search)",
    "first_order": "first-order only (no interactions)",
    "magnitude": "magnitude (L1), same search",
    "random": "random units, SAViT's counts",
    "uniform": "uniform ratio per component",
}
# the demo's data flags (scripts/demo.sh)
DATA_FLAGS = ["--data-set", "DIGITS", "--input-size", "32", "--num_workers", "1", "--batch-size", "64", "--aa", "",
              "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--hflip", "0", "--drop-path", "0.05",
              "--log_period", "100"]


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default="output/ablation", help="every run's folder goes here")
    p.add_argument("--markdown", default="",
                   help="where to write the table (atomically; default: {output_dir}/ablation.md)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrained", default="",
                   help="main_deploy.py checkpoint of the unpruned model; when it does not exist yet and is named "
                        "best_checkpoint.pth, step 1 trains it into its folder (default: {output_dir}/pretrain)")
    p.add_argument("--pretrain_epochs", type=int, default=40, help="the demo's step 1 (default: 40)")
    p.add_argument("--finetune_epochs", type=int, default=10, help="the same short fine-tune for every mask")
    p.add_argument("--target", type=float, default=0.50, help="fraction of the FLOPs to remove")
    p.add_argument("--feed_percent", type=float, default=0.2, help="main.py --pruning_feed_percent (demo: 0.2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--python", default=sys.executable)
    return p.parse_args(argv)


class Runner:
    """Runs the project's entry points as subprocesses, output to `{dir}/run.out`; skips finished steps."""

    def __init__(self, python: str):
        self.python = python
        self.env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.start = time.time()
        self.reused = 0  # steps found finished and skipped

    def say(self, message: str) -> None:
        elapsed = int(time.time() - self.start)
        print(f"[ablation {elapsed // 60:3d}:{elapsed % 60:02d}] {message}", flush=True)

    def run(self, script: str, flags: List[str], out_dir: str, done: bool, what: str) -> None:
        """Run `python script flags --output_dir out_dir` unless `done`; an unfinished folder is emptied first."""
        if done:
            self.say(f"{what}: done already ({out_dir})")
            self.reused += 1
            return
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # a partial run of ours (log.txt would be appended to)
        os.makedirs(out_dir)
        cmd = [self.python, script, *flags, "--output_dir", out_dir]
        self.say(f"{what}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
        t0 = time.time()
        with open(os.path.join(out_dir, "run.out"), "w") as log:
            rc = subprocess.call(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            with open(os.path.join(out_dir, "run.out")) as log:
                tail = log.read()[-3000:]
            raise UserError(f"{what} failed (exit {rc}); end of {out_dir}/run.out:\n{tail}")
        self.say(f"{what}: finished in {time.time() - t0:.0f} s")


def epochs_logged(out_dir: str) -> List[dict]:
    path = os.path.join(out_dir, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain(args, runner: Runner) -> str:
    """The demo's step 1 (main_deploy.py, no mask) unless --pretrained exists; returns the checkpoint path."""
    if args.pretrained and os.path.isfile(args.pretrained):
        return os.path.abspath(args.pretrained)
    if args.pretrained and os.path.basename(args.pretrained) != "best_checkpoint.pth":
        raise UserError(f"--pretrained: file not found: {args.pretrained!r} (a missing file is trained only when it "
                        f"is a main_deploy.py best_checkpoint.pth)")
    out = os.path.dirname(os.path.abspath(args.pretrained)) if args.pretrained else \
        os.path.join(args.output_dir, "pretrain")
    ckpt = os.path.join(out, "best_checkpoint.pth")
    if args.pretrained:
        runner.say(f"--pretrained {args.pretrained} does not exist yet: training it (the demo's step 1)")
    flags = ["--model", f"{MODEL}_deploy", *DATA_FLAGS, "--epochs", str(args.pretrain_epochs), "--lr", "1.6e-2",
             "--warmup-epochs", "3", "--cooldown-epochs", "0"]
    done = os.path.isfile(ckpt) and len(epochs_logged(out)) == args.pretrain_epochs
    runner.run("main_deploy.py", flags, out, done, f"pretrain {MODEL} ({args.pretrain_epochs} epochs)")
    return ckpt


def prune_with_main(args, runner: Runner, seed: int, pretrained: str, seed_dir: str) -> Dict[str, str]:
    """SAViT and first-order masks from main.py (the latter re-uses the former's criteria)."""
    common = ["--model", MODEL, *DATA_FLAGS, "--finetune", pretrained, "--pruning_method", "2",
              "--pruning_layers", "3", "--pruning_feed_percent", str(args.feed_percent),
              "--pruning_flops_percentage", str(args.target), "--finetune_op", "2", "--seed", str(seed)]
    savit_dir, fo_dir = os.path.join(seed_dir, "savit"), os.path.join(seed_dir, "first_order")

    def finished(d: str) -> bool:
        return all(os.path.isfile(os.path.join(d, f)) for f in ("mask.json", "pruning_report.json"))

    runner.run("main.py", common + ["--need_hessian"], savit_dir, finished(savit_dir), f"seed {seed}: SAViT pruning")
    if "first_order" in args.methods:
        runner.run("main.py", common + ["--pruning_pickle_from", savit_dir], fo_dir, finished(fo_dir),
                   f"seed {seed}: first-order pruning (same criteria)")
    return {"savit": os.path.join(savit_dir, "mask.json"), "first_order": os.path.join(fo_dir, "mask.json")}


def baseline_masks(args, seed: int, arch, pretrained: str, seed_dir: str, savit_mask: str) -> Dict[str, str]:
    """Magnitude, random and uniform masks of one seed, saved as mask JSONs."""
    savit_dir = os.path.dirname(savit_mask)
    criteria, C = load_pickles(savit_dir, 2, arch, need_hessian=True)
    counts = pruned_counts(PruneMask.load(savit_mask))
    paths = {}
    masks = {}
    if "magnitude" in args.methods:
        weights = state_dict_of(load_torch_file(pretrained, "--pretrained"), pretrained)
        options = SearchOptions(flops_percentage=args.target, use_interactions=True, seed=seed, protect=True)
        masks["magnitude"], _ = prune(magnitude_criteria(weights, arch), C, arch, options, model_name=MODEL)
    if "random" in args.methods:
        masks["random"] = random_mask(arch, counts, seed=seed, protect=True, model=MODEL)
    if "uniform" in args.methods:
        masks["uniform"], _ = uniform_mask(criteria, arch, args.target, protect=True, model=MODEL)
    for name, mask in masks.items():
        paths[name] = os.path.join(seed_dir, "masks", f"{name}.json")
        os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
        mask.save_json(paths[name])
    return paths


def finetune(args, runner: Runner, seed: int, pretrained: str, mask_path: str, out: str, what: str) -> List[dict]:
    """The demo's step 3 with a mask JSON: the same command for every method."""
    flags = ["--model", f"{MODEL}_deploy", *DATA_FLAGS, "--epochs", str(args.finetune_epochs),
             "--masked_model", mask_path, "--finetune", pretrained,
             "--teacher-model", f"{MODEL}_deploy", "--teacher-path", pretrained, "--distillation-type", "hard",
             "--lr", "8e-3", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--no-model-ema",
             "--seed", str(seed)]
    done = len(epochs_logged(out)) == args.finetune_epochs
    runner.run("main_deploy.py", flags, out, done, what)
    return epochs_logged(out)


def mean_std(values: List[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _stats(results: Dict[str, List[dict]], method: str, key: str):
    v = np.asarray([r[key] for r in results[method]], dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def verdict(results: Dict[str, List[dict]], methods: List[str]) -> List[str]:
    """Plain statements: where SAViT ranks in each column, by how much, and an overall answer."""
    if "savit" not in methods or len(methods) < 2:
        return ["(SAViT or every baseline was left out: no comparison.)"]
    lines, clear_win = [], {}
    for key, column in (("acc_pruned", "right after pruning"), ("acc_finetuned", "after fine-tuning")):
        means = {m: _stats(results, m, key)[0] for m in methods}
        best_other = max((m for m in methods if m != "savit"), key=lambda m: means[m])
        gap = means["savit"] - means[best_other]
        noise = max(_stats(results, "savit", key)[1], _stats(results, best_other, key)[1])
        rank = 1 + sum(means[m] > means["savit"] for m in methods if m != "savit")
        runner_up = f"{means['savit']:.2f}% vs {means[best_other]:.2f}% for {LABELS[best_other]}"
        if gap > 0:
            strength = "more than" if gap > noise else "less than"
            lines.append(f"- **{column}**: SAViT has the best mean, {runner_up} (+{gap:.2f} points, {strength} "
                         f"one seed-to-seed standard deviation, {noise:.2f}).")
        elif gap == 0:
            lines.append(f"- **{column}**: SAViT ties for the best mean with {LABELS[best_other]} "
                         f"({means['savit']:.2f}%).")
        else:
            lines.append(f"- **{column}**: SAViT does NOT win: it ranks {rank} of {len(methods)}, {runner_up} "
                         f"({gap:+.2f} points; seed-to-seed standard deviation {noise:.2f}).")
        clear_win[key] = gap > 0 and gap > noise
    if clear_win["acc_finetuned"]:
        overall = "SAViT wins after the fine-tune, by more than the seed-to-seed spread."
    elif _stats(results, "savit", "acc_finetuned")[0] > max(_stats(results, m, "acc_finetuned")[0]
                                                             for m in methods if m != "savit"):
        overall = ("SAViT has the best mean after the fine-tune, but by less than the seed-to-seed spread: "
                   "no clear win on this benchmark.")
    else:
        overall = "SAViT does not win after the fine-tune on this benchmark."
    return [f"**{overall}**", ""] + lines


def paired_differences(results: Dict[str, List[dict]], methods: List[str]) -> List[str]:
    """SAViT minus each baseline, seed by seed (same pretrained model, same fine-tune data order)."""
    lines = ["| SAViT minus | after pruning (mean ± std) | SAViT ahead (seeds) | after fine-tune (mean ± std) | "
             "SAViT ahead (seeds) |", "|---|---|---|---|---|"]
    savit = {r["seed"]: r for r in results["savit"]}
    for m in methods:
        if m == "savit":
            continue
        cells = []
        for key in ("acc_pruned", "acc_finetuned"):
            d = [savit[r["seed"]][key] - r[key] for r in results[m]]
            ahead = sum(x > 0 for x in d)
            ties = sum(x == 0 for x in d)
            cells += [mean_std(d), f"{ahead} of {len(d)}" + (f" ({ties} tied)" if ties else "")]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return lines


def negative_diagonal_note(interactions: List[dict]) -> List[str]:
    """A line naming the seeds where a diagonal entry of C is negative (F then rewards pruning that component)."""
    names = ("heads", "MLP", "embedding")
    found = [f"seed {x['seed']} ({', '.join(names[i] for i in range(3) if x['C'][i][i] < 0)})"
             for x in interactions if any(x["C"][i][i] < 0 for i in range(3))]
    if not found:
        return []
    return [f"Negative diagonal entries of C in {len(found)} of {len(interactions)} seeds: {'; '.join(found)}. "
            "On its own, such an entry makes F(r) = -(r^T C r) grow with that component's pruned fraction, so the "
            "search favours pruning more of it.", ""]


def write_markdown(args, path: str, results: Dict[str, List[dict]], unpruned: float, pretrained_from: str,
                   wall: float, reused: int, interactions: List[dict]) -> None:
    methods = [m for m in METHODS if m in results]
    cmd = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "1") + " python benchmarks/ablation.py " + \
        " ".join(shlex.quote(a) for a in sys.argv[1:])
    n = len(args.seeds)
    lines = [
        "# Ablation of SAViT on the demo's data (digits, deit_demo_patch8_32, 50% FLOPs)",
        "",
        "```",
        cmd,
        "```",
        "",
        f"Written by `benchmarks/ablation.py` in {wall / 60:.1f} min of wall-clock on {platform.machine()} CPU "
        f"({os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__})"
        + (f"; {reused} finished step(s) of an earlier run were reused, their time is not included." if reused
           else "."),
        "",
        f"Data: scikit-learn's handwritten digits, 1500 training / 297 validation images upscaled to 32x32 "
        f"(one validation image = 0.34 points). Model `{MODEL}` (6 blocks, 6 heads of 16, width 96, MLP 384). "
        f"Pretrained once ({pretrained_from}); unpruned top-1 **{unpruned:.2f}%**. "
        f"FLOPs target {args.target:.0%}; seeds {', '.join(map(str, args.seeds))} (a seed draws main.py's scoring "
        f"batches ({args.feed_percent:.0%} of the training batches), its interaction blocks and its search, the random "
        "units, and the fine-tune's data order).",
        "",
        f"Fine-tune, identical for every row: main_deploy.py `--masked_model MASK.json --finetune PRETRAINED`, "
        f"{args.finetune_epochs} epochs, AdamW lr 8e-3 (x batch 64/512), no warm-up, cosine, hard distillation from "
        "the pretrained model, the demo's data flags (`scripts/demo.sh` step 3, shorter; no EMA, which the demo "
        "only evaluates). *After pruning* = top-1 of the deploy model built from the mask and the pretrained "
        "weights (exact, mask-aware). *After fine-tune* = top-1 at the LAST epoch (no checkpoint selection on "
        "the validation set).",
        "",
        f"Mean ± sample std over {n} seeds (top-1 %, DIGITS validation):",
        "",
        "| method | pruned heads / neurons / channels (mean) | FLOPs reduction | top-1 after pruning | "
        "top-1 after fine-tune |",
        "|---|---|---|---|---|",
        f"| unpruned | 0 / 0 / 0 of 36 / 2304 / 96 | 0 | {unpruned:.2f} | - |",
    ]
    for m in methods:
        rs = results[m]
        counts = " / ".join(f"{np.mean([r['counts'][c] for r in rs]):.0f}" for c in COMPONENTS)
        red = [100 * r["reduction"] for r in rs]
        lines.append(f"| {LABELS[m]} | {counts} | {np.mean(red):.2f}% | {mean_std([r['acc_pruned'] for r in rs])} | "
                     f"{mean_std([r['acc_finetuned'] for r in rs])} |")
    lines += ["", "## Does SAViT win?", ""] + verdict(results, methods) + [
        "",
        "Paired by seed (points of top-1; a seed shares the pretrained model, the scoring data and the fine-tune's "
        "data order across rows):",
        "",
        *paired_differences(results, methods),
        "",
        "## SAViT's interaction matrix and search, per seed",
        "",
        "C as main.py logs it (rows/columns heads, MLP, embedding; the search reads the diagonal and the upper "
        "triangle), the search's pruned fractions and the final counts:",
        "",
        "| seed | C_hh | C_mm | C_ee | C_hm | C_he | C_me | search r_head / r_mlp / r_embed | pruned heads / neurons "
        "/ channels |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {x['seed']} | " + " | ".join(f"{x['C'][i][j]:+.2e}" for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2),
                                                                              (1, 2)))
          + f" | {x['search']['r_head']:.3f} / {x['search']['r_mlp']:.3f} / {x['search']['r_embed']:.3f} | "
          + " / ".join(str(x["counts"][c]) for c in COMPONENTS) + " |" for x in interactions],
        "",
        *negative_diagonal_note(interactions),
        "## Per seed",
        "",
        "| method | seed | pruned heads / neurons / channels | FLOPs reduction | after pruning | after fine-tune "
        "(best epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        for r in results[m]:
            counts = " / ".join(str(r["counts"][c]) for c in COMPONENTS)
            lines.append(f"| {m} | {r['seed']} | {counts} | {100 * r['reduction']:.2f}% | {r['acc_pruned']:.2f} | "
                         f"{r['acc_finetuned']:.2f} ({r['acc_best']:.2f}) |")
    lines += [
        "",
        "## The rows",
        "",
        "- **SAViT**: `main.py --need_hessian --pruning_method 2 --pruning_layers 3` (the demo's step 2): Taylor "
        "criteria (g dL/dg)^2, the 3x3 interaction matrix C, the evolution search over the pruned fractions, "
        "one global threshold per component, protection of each block's top 5%.",
        "- **first-order only**: the same main.py command without `--need_hessian`, reading the SAME seed's criteria "
        "(`--pruning_pickle_from`), so only the choice of counts differs: main.py's documented first-order mode, one "
        "global threshold over all units on criterion / MACs saved.",
        "- **magnitude**: the criterion of a unit is the L1 norm of the weight-matrix entries it owns "
        "(`pruning.baselines.magnitude_criteria`): a head its 3 x head_dim rows of `qkv` and head_dim columns of "
        "`proj`; a neuron its row of `fc1` and column of `fc2`; an embedding channel its patch-embedding filter, its "
        "column of every `qkv`, `fc1` and of the classifier, and its row of every `proj` and `fc2` (biases, "
        "LayerNorm parameters, tokens and pos_embed are left out). C has no meaning for magnitudes, so the search "
        "(`pruning.search.prune`, interactions mode) runs with the C of the same seed's SAViT run: the search's "
        "counts depend on C alone, so this row swaps the unit criterion and keeps SAViT's allocation "
        "(first-order mode is not an option: it compares criteria across components, and magnitudes of heads, "
        "neurons and channels are not on one scale). Protection on.",
        "- **random**: the same number of heads, neurons and channels as the seed's SAViT mask, chosen uniformly at "
        "random (`pruning.baselines.random_mask`); protection on (a random 5% of every block is kept, as SAViT "
        "keeps its top 5%), so the FLOPs equal SAViT's.",
        "- **uniform**: one fraction r pruned from heads, neurons and channels alike, r chosen by bisection on the "
        "exact MACs count (`pruning.flops.mask_macs`) to come closest to the target "
        "(`pruning.baselines.uniform_mask`); the units by the seed's method 2 criteria, one global threshold per "
        "component, protection on. With 36 heads and 96 channels, r lands on a coarse grid: see the FLOPs column.",
        "",
        f"Every run's folder (main.py logs, masks, fine-tune logs and checkpoints) is under `{args.output_shown}/`; "
        f"the numbers above are also in `{args.output_shown}/results.json`.",
        "",
    ]
    atomic_write_text("\n".join(lines), path)


@cli_entry
def main(args) -> None:
    if args.finetune_epochs < 1 or args.pretrain_epochs < 1:
        raise UserError("--finetune_epochs and --pretrain_epochs must be >= 1")
    if not 0 < args.target < 1:
        raise UserError(f"--target must be in (0, 1), got {args.target}")
    if "savit" not in args.methods:  # its criteria, C and counts feed the other rows
        args.methods = ["savit"] + list(args.methods)
    args.output_shown = args.output_dir  # as given, for the markdown
    args.output_dir = os.path.abspath(args.output_dir)
    args.markdown = args.markdown or os.path.join(args.output_dir, "ablation.md")
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runner = Runner(args.python)
    started = time.time()
    pretrained = pretrain(args, runner)

    data_args = DataConfig(data_set="DIGITS", input_size=32, batch_size=64, num_workers=0, repeated_aug=False)
    dataset_val, num_classes = build_dataset(False, data_args)
    _, loader_val = build_loaders(data_args, None, dataset_val, distributed=False)
    arch = arch_of(MODEL, num_classes=num_classes, img_size=32)
    device = torch.device("cpu")

    def top1(mask_path: str) -> float:
        _, model = load_masked_model(arch, mask_path, pretrained)
        return evaluate(loader_val, model, device, amp=False, print_fn=lambda _: None)["acc1"]

    unpruned_mask = os.path.join(args.output_dir, "unpruned_mask.json")
    PruneMask.full(arch, model=MODEL).save_json(unpruned_mask)
    unpruned = top1(unpruned_mask)
    runner.say(f"unpruned model: top-1 {unpruned:.2f}%")

    full_macs = mask_macs(arch)["total"]
    interactions: List[dict] = []
    results: Dict[str, List[dict]] = {m: [] for m in METHODS if m in args.methods}
    for seed in args.seeds:
        seed_dir = os.path.join(args.output_dir, f"seed{seed}")
        masks = prune_with_main(args, runner, seed, pretrained, seed_dir)
        masks.update(baseline_masks(args, seed, arch, pretrained, seed_dir, masks["savit"]))
        with open(os.path.join(seed_dir, "savit", "pruning_report.json")) as f:
            report = json.load(f)
        C = load_pickles(os.path.join(seed_dir, "savit"), 2, arch, need_hessian=True)[1]
        interactions.append({"seed": seed, "C": C.tolist(), "search": report["search"], "counts": report["counts"]})
        for m in results:
            mask = PruneMask.load(masks[m])
            acc_pruned = top1(masks[m])
            reduction = 1 - mask_macs(arch, mask)["total"] / full_macs
            counts = pruned_counts(mask)
            runner.say(f"seed {seed} {m}: pruned {counts}, FLOPs -{reduction:.2%}, "
                       f"top-1 after pruning {acc_pruned:.2f}%")
            log = finetune(args, runner, seed, pretrained, masks[m], os.path.join(seed_dir, f"ft_{m}"),
                           f"seed {seed}: fine-tune {m} ({args.finetune_epochs} epochs)")
            results[m].append({"seed": seed, "counts": counts, "reduction": reduction, "acc_pruned": acc_pruned,
                               "acc_finetuned": log[-1]["test_acc1"], "acc_best": max(r["test_acc1"] for r in log),
                               "mask": os.path.relpath(masks[m], args.output_dir)})
            runner.say(f"seed {seed} {m}: top-1 after fine-tune {log[-1]['test_acc1']:.2f}%")
        atomic_write_json({"unpruned_acc1": unpruned, "args": vars(args), "results": results,
                           "interactions": interactions},
                          os.path.join(args.output_dir, "results.json"))

    wall = time.time() - started
    pretrained_from = (f"`--pretrained {args.pretrained}`" if args.pretrained else
                       f"the demo's step 1, {args.pretrain_epochs} epochs, best checkpoint")
    write_markdown(args, args.markdown, results, unpruned, pretrained_from, wall, runner.reused, interactions)
    runner.say(f"done in {wall / 60:.1f} min; table written to {args.markdown}")
    with open(args.markdown) as f:
        print(f.read())


if __name__ == "__main__":
    main(parse_args())
