"""Masks for the speed table: DeiT-T/S/B at the paper's FLOPs targets, from main.py on random weights.

No pretrained DeiT exists offline: each mask comes from `main.py --need_hessian` (method 2, all
components) on a random model and a batch of DIGITS at 224. Its FLOPs are right but its mix of
components is arbitrary (random weights, random C), and the mix decides the speed, so a second mask
keeps the paper's per-component counts (docs/METHOD.md section 8) with the units chosen by the same
run's criteria. Hardware-aligned masks (`--round-to`, default 8,32,64) come from the SAME run's
pickles: main.py's search again with `SearchOptions(round_to=N)` (N = 1 reproduces main.py's mask.json,
checked), and the paper-counts mask aligned by the search's rounding step (`pruning.search._align`),
calibrated to its own FLOPs reduction (+-0.5%).

Writes, under `--out-dir` (default logs/masks/): {model}_{target}.json (main.py's mask),
{model}_{target}_paper-counts.json, the `_r{N}.json` of each, and README.md (commands and counts).

    python benchmarks/make_masks.py                      # all three, about 3 minutes on 2 cores
    python benchmarks/make_masks.py --models deit_tiny_patch16_224
"""
import argparse
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import REPO, int_list  # noqa: E402
from models import arch_of  # noqa: E402
from models.vit_arch import ViTArch  # noqa: E402
from pruning.flops import mask_macs  # noqa: E402
from models.mask import PruneMask  # noqa: E402
from pruning.pickles import load_pickles  # noqa: E402
from pruning.search import ACCEPT_TOLERANCE, OrderedCuts, SearchOptions, _align, check_round_to, prune  # noqa: E402
from pruning.selection import component_orders, criteria_flat, mask_from_orders, select_units  # noqa: E402
from utils import Parser, UserError, atomic_write_text, cli_entry  # noqa: E402

# The paper's targets (fraction of FLOPs removed) and the reference's pruned counts on ImageNet
# (heads, MLP neurons, embedding channels), docs/METHOD.md section 8.
PAPER = {
    "deit_tiny_patch16_224": (0.235, {"heads": 3, "mlp": 1828, "embed": 27}),
    "deit_small_patch16_224": (0.30, {"heads": 7, "mlp": 3157, "embed": 80}),
    "deit_base_patch16_224": (0.50, {"heads": 26, "mlp": 9441, "embed": 285}),
}


def mask_file_names(model: str, target: float) -> Tuple[str, str]:
    """File names of the main.py mask and of the paper-counts mask of `model` at `target`."""
    stem = f"{model}_{target:g}"
    return stem + ".json", stem + "_paper-counts.json"


def aligned_names(model: str, target: float, n: int) -> Tuple[str, str]:
    """File names of the main.py mask and of the paper-counts mask aligned to multiples of `n`."""
    stem = f"{model}_{target:g}"
    return f"{stem}_r{n}.json", f"{stem}_paper-counts_r{n}.json"


def search_options(target: float, seed: int, round_to: int) -> SearchOptions:
    """The SearchOptions `main_py_command` gives main.py (all components, interactions, protection)."""
    return SearchOptions(flops_percentage=target, layers=3, protect=True, use_interactions=True, seed=seed,
                         round_to=round_to)


def main_py_command(model: str, target: float, output_dir: str, batch_size: int, feed_percent: float,
                    seed: int) -> List[str]:
    """The main.py command line (random weights, DIGITS at 224, one-shot SAViT pruning)."""
    return [sys.executable, os.path.join(REPO, "main.py"), "--model", model, "--data-set", "DIGITS",
            "--input-size", "224", "--batch-size", str(batch_size), "--num_workers", "0", "--device", "cpu",
            "--pruning_method", "2", "--pruning_layers", "3", "--need_hessian",
            "--pruning_feed_percent", str(feed_percent), "--pruning_flops_percentage", str(target),
            "--finetune_op", "2", "--seed", str(seed), "--pruning_silent", "--output_dir", output_dir]


def paper_counts_mask(criteria: Dict[str, "np.ndarray"], arch: ViTArch, counts: Dict[str, int],
                      model: str) -> PruneMask:
    """Prune exactly `counts` units per component, lowest `criteria` first (one threshold per component;
    criteria as {'heads': [depth, H], 'mlp': [depth, M], 'embed': [D]}, larger = more important)."""
    kept = {}
    for c in ("heads", "mlp", "embed"):
        pruned = select_units(criteria[c], counts[c], protect=True, min_keep=1 if c == "embed" else 0)
        rows = np.atleast_2d(pruned)
        kept[c] = [np.flatnonzero(~row).tolist() for row in rows]
    mask = PruneMask(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
                     mlp_hidden=arch.mlp_hidden, heads=kept["heads"], mlp=kept["mlp"], embed=kept["embed"][0],
                     model=model)
    mask.validate()
    return mask


def same_units(a: PruneMask, b: PruneMask) -> bool:
    """Whether two masks keep the same units (the model name and the recorded classes/input size aside)."""
    skip = ("model", "num_classes", "img_size")
    da, db = a.to_dict(), b.to_dict()
    return {k: v for k, v in da.items() if k not in skip} == {k: v for k, v in db.items() if k not in skip}


def reduction(mask: PruneMask, arch: ViTArch) -> float:
    return 1.0 - mask_macs(arch, mask)["total"] / mask_macs(arch)["total"]


def aligned_paper_mask(criteria: Dict[str, "np.ndarray"], arch: ViTArch, counts: Dict[str, int], n: int,
                       model: str) -> PruneMask:
    """The paper-counts mask with widths aligned to multiples of `n` by the search's rounding step.

    Heads keep the paper's count; the embedding count goes to the nearest multiple of `n` and
    each block's MLP count to whole groups of `n` (by criterion), calibrated on the exact MACs
    to the unaligned paper-counts mask's FLOPs reduction. Raises `UserError` when the result is
    more than 0.5% (absolute) off that reduction.
    """
    check_round_to(arch, n)
    crit = criteria_flat(criteria, arch)
    orders = component_orders(crit, arch, protect=True)
    target = reduction(mask_from_orders(arch, orders, counts, model), arch)
    cuts = OrderedCuts(arch, orders, target, SearchOptions(flops_percentage=target).flops_threshold)
    k = _align(cuts, crit, dict(counts), SearchOptions(flops_percentage=target, round_to=n))
    mask = mask_from_orders(arch, orders, k, model)
    mask.validate()
    got = reduction(mask, arch)
    if abs(got - target) > ACCEPT_TOLERANCE:
        raise UserError(f"{model}: the paper's counts aligned to {n} remove {got:.2%} of the FLOPs, "
                        f"more than 0.5% off the unaligned {target:.2%}")
    return mask


def widths(mask: PruneMask) -> str:
    """Kept embedding width and the distinct kept MLP widths per block."""
    mlp = sorted({len(b) for b in mask.mlp})
    return f"width {len(mask.embed)}, MLP widths {{{', '.join(map(str, mlp))}}}"


def describe(mask: PruneMask, arch: ViTArch) -> str:
    """One line: pruned/total units per component and the FLOPs reduction."""
    kept, total = mask.kept_counts(), mask.total_counts()
    before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
    parts = [f"{c} {total[c] - kept[c]}/{total[c]}" for c in ("heads", "mlp", "embed")]
    return ", ".join(parts) + f"; GMACs {before / 1e9:.3f} -> {after / 1e9:.3f} ({1 - after / before:.2%} removed)"


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="Make the speed table's masks with main.py on random weights.")
    p.add_argument("--models", default=",".join(PAPER), help="comma-separated DeiT names (default: T, S, B)")
    p.add_argument("--out-dir", default=os.path.join(REPO, "logs", "masks"), help="where the masks go")
    p.add_argument("--batch-size", type=int, default=4, help="main.py --batch-size (default: 4)")
    p.add_argument("--feed-percent", type=float, default=0.003,
                   help="main.py --pruning_feed_percent (default 0.003: one batch of 4 of the 1500 DIGITS images)")
    p.add_argument("--seed", type=int, default=0, help="main.py --seed (initial weights, data order)")
    p.add_argument("--round-to", default="8,32,64",
                   help="comma-separated N of the aligned masks (main.py --round_to N); '' for none (default: 8,32,64)")
    args = p.parse_args(argv)
    args.round_to = int_list(args.round_to, "--round-to", least=2, empty=True)
    return args


@cli_entry
def main(args: argparse.Namespace) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in PAPER:
            raise UserError(f"--models: {m!r} has no paper target; choose from {', '.join(PAPER)}")
    os.makedirs(args.out_dir, exist_ok=True)
    readme = ["# Masks for the speed table", "",
              "Made by `python benchmarks/make_masks.py` (random weights: for speed only, not accuracy).", ""]
    for model in models:
        target, counts = PAPER[model]
        arch = arch_of(model)
        with tempfile.TemporaryDirectory() as work:
            cmd = main_py_command(model, target, work, args.batch_size, args.feed_percent, args.seed)
            print(f"{model}: main.py at {target:g} ...", flush=True)
            done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode != 0:
                raise UserError(f"main.py failed for {model} (exit {done.returncode}):\n{done.stdout[-3000:]}")
            mask = PruneMask.load(os.path.join(work, "mask.json"))
            criteria, interactions = load_pickles(work, 2, arch, need_hessian=True, field=None)
        crit = {c: v.numpy() for c, v in criteria.items()}
        paper = paper_counts_mask(crit, arch, counts, model)
        name, paper_name = mask_file_names(model, target)
        # the search again on the run's pickles, on main.py's architecture (its data set's classes:
        # the head's MACs count in the calibration): with N = 1 it must give main.py's mask exactly
        run_arch = arch_of(model, num_classes=mask.num_classes, img_size=mask.img_size)
        again, _ = prune(criteria, interactions, run_arch, search_options(target, args.seed, 1), model_name=model)
        if not same_units(again, mask):
            raise UserError(f"{model}: pruning.search.prune on main.py's pickles does not reproduce its mask.json")
        mask.num_classes = mask.img_size = None  # the speed table's masks fit the 1000-class model
        aligned = []
        for n in args.round_to:
            r_mask, _ = prune(criteria, interactions, run_arch, search_options(target, args.seed, n), model_name=model)
            aligned.append((n, r_mask, aligned_paper_mask(crit, arch, counts, n, model)))
        for file_name, m in [(name, mask), (paper_name, paper)] + [
                (f, m) for n, r_mask, r_paper in aligned for f, m in zip(aligned_names(model, target, n), (r_mask, r_paper))]:
            path = os.path.join(args.out_dir, file_name)
            if os.path.isfile(path) and file_name in (name, paper_name):
                if same_units(PruneMask.load(path), m):  # reproduced: keep the file byte for byte
                    print(f"  {file_name}: reproduced (same units as the existing file, left as is)", flush=True)
                    continue
                print(f"  NOTE: {file_name}: this run differs from the existing file (overwritten)", flush=True)
            m.save_json(path)
        shown = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd[1:])
        work_arg = cmd.index("--output_dir") + 1
        shown = shown.replace(cmd[work_arg], "OUT")
        readme += [f"## {model} (target {target:g})", "",
                   f"- `{name}`: main.py's mask: {describe(mask, arch)}",
                   f"- `{paper_name}`: the paper's counts, this run's criteria: {describe(paper, arch)}",
                   "", f"    python {shown}", ""]
        print(f"  {name}: {describe(mask, arch)}")
        print(f"  {paper_name}: {describe(paper, arch)}", flush=True)
        if aligned:
            readme += ["Aligned (`--round_to N`: kept MLP width of every block and kept embedding width are "
                       "multiples of N), from the same run's pickles:", ""]
        for n, r_mask, r_paper in aligned:
            r_name, r_paper_name = aligned_names(model, target, n)
            readme += [f"- `{r_name}`: main.py's search, N={n}: {describe(r_mask, arch)}; {widths(r_mask)}",
                       f"- `{r_paper_name}`: the paper's counts aligned, N={n}: {describe(r_paper, arch)}; "
                       f"{widths(r_paper)}"]
            print(f"  {r_name}: {describe(r_mask, arch)}; {widths(r_mask)}")
            print(f"  {r_paper_name}: {describe(r_paper, arch)}; {widths(r_paper)}", flush=True)
        if aligned:
            readme += ["", f"    python main.py --pruning_pickle_from OUT --round_to N ... (the flags above)  "
                           f"# same units as {name[:-5]}_rN.json", ""]
    readme_path = os.path.join(args.out_dir, "README.md")
    atomic_write_text("\n".join(readme), readme_path)
    print(f"wrote {readme_path}")


if __name__ == "__main__":
    main(parse_args())
