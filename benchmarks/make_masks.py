"""Masks for the speed table: DeiT-T/S/B at the paper's FLOPs targets, from main.py on random weights.

No pretrained DeiT exists offline, so each mask comes from the real pruning path -- `main.py`
with `--need_hessian`, method 2, all components -- run on a randomly initialised model and a
batch of the DIGITS data set upscaled to 224. Such a mask has the right FLOPs but an arbitrary
mix of components (random weights give a random interaction matrix C, so the search may cut
only MLP neurons, or only embedding channels). Because the mix decides how fast the smaller
network runs, a second mask per model keeps the paper's own per-component counts
(docs/METHOD.md section 8, from the reference's ImageNet logs), with the units chosen by the
same run's criteria (one global threshold per component, protection on).

Writes, under `--out-dir` (default logs/masks/):
    {model}_{target}.json              -- main.py's mask.json
    {model}_{target}_paper-counts.json -- the paper's counts, this run's criteria
    README.md                          -- the commands and the counts of every mask

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

from models import arch_of  # noqa: E402
from models.deit_base import DeiTArch  # noqa: E402
from pruning.flops import mask_macs  # noqa: E402
from pruning.mask import PruneMask  # noqa: E402
from pruning.pickles import load_pickles  # noqa: E402
from pruning.selection import select_units  # noqa: E402
from utils import UserError, atomic_write_text, cli_entry  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def main_py_command(model: str, target: float, output_dir: str, batch_size: int, feed_percent: float,
                    seed: int) -> List[str]:
    """The main.py command line (random weights, DIGITS at 224, one-shot SAViT pruning)."""
    return [sys.executable, os.path.join(REPO, "main.py"), "--model", model, "--data-set", "DIGITS",
            "--input-size", "224", "--batch-size", str(batch_size), "--num_workers", "0", "--device", "cpu",
            "--pruning_method", "2", "--pruning_layers", "3", "--need_hessian",
            "--pruning_feed_percent", str(feed_percent), "--pruning_flops_percentage", str(target),
            "--finetune_op", "2", "--seed", str(seed), "--pruning_silent", "--output_dir", output_dir]


def paper_counts_mask(criteria: Dict[str, "np.ndarray"], arch: DeiTArch, counts: Dict[str, int],
                      model: str) -> PruneMask:
    """Prune exactly `counts` units per component, lowest criteria first (one threshold per component).

    Args:
        criteria: {'heads': [depth, H], 'mlp': [depth, M], 'embed': [D]} (larger = more important).
        arch: the unpruned architecture.
        counts: units to prune per component.
        model: stored in the mask.
    """
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


def describe(mask: PruneMask, arch: DeiTArch) -> str:
    """One line: pruned/total units per component and the FLOPs reduction."""
    kept, total = mask.kept_counts(), mask.total_counts()
    before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
    parts = [f"{c} {total[c] - kept[c]}/{total[c]}" for c in ("heads", "mlp", "embed")]
    return ", ".join(parts) + f"; GMACs {before / 1e9:.3f} -> {after / 1e9:.3f} ({1 - after / before:.2%} removed)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Make the speed table's masks with main.py on random weights.")
    p.add_argument("--models", default=",".join(PAPER), help="comma-separated DeiT names (default: T, S, B)")
    p.add_argument("--out-dir", default=os.path.join(REPO, "logs", "masks"), help="where the masks go")
    p.add_argument("--batch-size", type=int, default=4, help="main.py --batch-size (default: 4)")
    p.add_argument("--feed-percent", type=float, default=0.003,
                   help="main.py --pruning_feed_percent (default 0.003: one batch of 4 of the 1500 DIGITS images)")
    p.add_argument("--seed", type=int, default=0, help="main.py --seed (initial weights, data order)")
    return p.parse_args(argv)


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
            criteria, _ = load_pickles(work, 2, arch, need_hessian=False, flag="main.py output")
        crit = {c: v.numpy() for c, v in criteria.items()}
        paper = paper_counts_mask(crit, arch, counts, model)
        name, paper_name = mask_file_names(model, target)
        mask.save_json(os.path.join(args.out_dir, name))
        paper.save_json(os.path.join(args.out_dir, paper_name))
        shown = " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd[1:])
        work_arg = cmd.index("--output_dir") + 1
        shown = shown.replace(cmd[work_arg], "OUT")
        readme += [f"## {model} (target {target:g})", "",
                   f"- `{name}`: main.py's mask: {describe(mask, arch)}",
                   f"- `{paper_name}`: the paper's counts, this run's criteria: {describe(paper, arch)}",
                   "", f"    python {shown}", ""]
        print(f"  {name}: {describe(mask, arch)}")
        print(f"  {paper_name}: {describe(paper, arch)}", flush=True)
    readme_path = os.path.join(args.out_dir, "README.md")
    atomic_write_text("\n".join(readme), readme_path)
    print(f"wrote {readme_path}")


if __name__ == "__main__":
    main(parse_args())
