"""Rerun scripts/demo.sh over several seeds and record the spread of what it prints.

The demo's numbers depend on the machine: floating-point rounding differs between CPUs (AVX2,
AVX-512, AMD, Intel) and torch versions, and a few images of a 297-image validation set move
the accuracy by a point. This script runs the whole demo once per seed (`SEED` of demo.sh),
reads each run's `summary.json`, and writes the mean, sample std, min and max of every number,
together with the machine and library versions they came from:

    python scripts/demo_spread.py --seeds 0 1 2 --out logs/demo_spread.md

`{out}` gets the markdown table and `{out minus .md}.json` the numbers that
`scripts/demo_summary.py` compares a new demo run against.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import Parser, UserError, atomic_write_json, atomic_write_text, cli_entry, environment_line  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# summary.json key -> label, in the order of the demo's table
METRICS = {
    "acc_unpruned": "top-1 unpruned (%)",
    "acc_pruned": "top-1 right after pruning (%)",
    "acc_finetuned": "top-1 after fine-tuning (%)",
    "kept_heads": "kept heads",
    "kept_mlp": "kept MLP neurons",
    "kept_embed": "kept embedding channels",
    "reduction": "FLOPs reduction (%)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one demo run per seed (default: 0 1 2)")
    p.add_argument("--output_dir", default="output/demo_spread", help="the runs' folders: {output_dir}/seed{S}")
    p.add_argument("--out", default="output/demo_spread/demo_spread.md",
                   help="markdown table (a .json with the numbers is written beside it)")
    return p.parse_args(argv)


def spread(values: List[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def run_demo(seed: int, out: str) -> dict:
    """One whole demo run (skipped when its summary.json exists); returns its summary."""
    summary = os.path.join(out, "summary.json")
    if not os.path.isfile(summary):
        # OVERWRITE=1: a folder without summary.json is an unfinished run of ours
        env = dict(os.environ, SEED=str(seed), PYTHON=sys.executable, OVERWRITE="1")
        with open(os.path.join(os.path.dirname(out), f"seed{seed}.out"), "w") as log:
            print(f"seed {seed}: bash scripts/demo.sh {out} (output in {log.name})", flush=True)
            rc = subprocess.call(["bash", os.path.join(REPO, "scripts", "demo.sh"), out],
                                 cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            raise UserError(f"the demo with SEED={seed} failed (exit {rc}); see {log.name}")
    with open(summary) as f:
        return json.load(f)


@cli_entry
def main(args) -> None:
    if not args.out.endswith(".md"):
        raise UserError(f"--out must name a .md file, got {args.out!r}")
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    runs = {}
    for seed in args.seeds:
        runs[seed] = run_demo(seed, os.path.join(os.path.abspath(args.output_dir), f"seed{seed}"))
        print(f"seed {seed}: " + ", ".join(f"{k} {runs[seed][k]:g}" for k in METRICS), flush=True)
    stats = {k: spread([r[k] for r in runs.values()]) for k in METRICS}
    environment = environment_line()
    first = next(iter(runs.values()))
    record = {"seeds": args.seeds, "environment": environment, "machine": platform.machine(),
              "model": first["model"], "data_set": first["data_set"],
              "stats": stats, "runs": {str(s): r for s, r in runs.items()}}
    atomic_write_json(record, args.out[:-3] + ".json")
    lines = ["# Spread of `bash scripts/demo.sh` over seeds", "",
             f"    python scripts/demo_spread.py --seeds {' '.join(map(str, args.seeds))} --out {args.out}", "",
             f"- where: {environment}",
             f"- {len(args.seeds)} whole demo runs (`SEED` = {', '.join(map(str, args.seeds))}), "
             f"{(time.time() - start) / 60:.1f} min", "",
             "| | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std | min - max |",
             "|---|" + "---|" * (len(args.seeds) + 2)]
    for key, label in METRICS.items():
        s = stats[key]
        lines.append(f"| {label} | " + " | ".join(f"{runs[seed][key]:g}" for seed in args.seeds)
                     + f" | {s['mean']:.2f} ± {s['std']:.2f} | {s['min']:g} - {s['max']:g} |")
    atomic_write_text("\n".join(lines) + "\n", args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main(parse_args())
