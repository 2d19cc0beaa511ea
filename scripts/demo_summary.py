"""Summary table of scripts/demo.sh: accuracy, FLOPs, params and CPU throughput, before/after.

Reads the three step folders of the demo's output dir, evaluates each model on the
validation split of the data set the runs were made on (their checkpoints record
`--data-set`, `--data-path` and `--input-size`; the summary refuses when the records are
missing or disagree) with the project's own `engine.evaluate`, counts FLOPs with
`pruning.flops` and times inference with `engine.measure_throughput`, then prints
the table and writes it to `{output_dir}/summary.md`.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from args import data_config, defaults  # noqa: E402
from datasets import build_dataset, build_loaders  # noqa: E402
from engine import evaluate, measure_throughput  # noqa: E402
from models import arch_of, gated_name_of, load_pruned  # noqa: E402
from pruning.flops import mask_macs, mask_params  # noqa: E402
from utils import (Parser, UserError, atomic_write_json, atomic_write_text, cli_entry, environment_line,  # noqa: E402
                   load_torch_file)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPREAD = os.path.join(REPO, "logs", "demo_spread.json")  # scripts/demo_spread.py on the reference machine

STEPS = {"unpruned": os.path.join("1_pretrain", "best_checkpoint.pth"),
         "pruned": os.path.join("2_prune", "checkpoint_pruned_00.pth"),
         "finetuned": os.path.join("3_finetune", "best_checkpoint.pth")}
# the recorded flags that decide the evaluation data and its transform
DATA_KEYS = ("data_set", "data_path", "input_size", "crop_pct", "not_imagenet_default_mean_and_std")


def recorded_data(checkpoints: dict, out: str) -> dict:
    """The data flags (and the model) the runs recorded in their checkpoints' `args`; all must agree.

    Args:
        checkpoints: step name -> (path, loaded checkpoint).
        out: the demo's output dir (for messages).
    """
    records = {}
    for path, checkpoint in checkpoints.values():
        recorded = checkpoint.get("args") if isinstance(checkpoint, dict) else None
        if isinstance(recorded, dict) and recorded.get("data_set"):
            model = recorded.get("model")
            records[path] = {**{k: recorded.get(k) for k in DATA_KEYS}, "model": model and gated_name_of(model)}
    if not records:
        raise UserError(f"{out}: no checkpoint records the data set it was made on (args.data_set); refusing to "
                        f"guess what to evaluate on")
    first_path, first = next(iter(records.items()))
    for path, record in records.items():
        if record != first:
            diff = {k: (first[k], record[k]) for k in first if first[k] != record[k]}
            raise UserError(f"{out}: the runs were made on different data or models ({first_path} vs {path}: {diff})")
    return first


def spread_lines(summary: dict, path: str) -> list:
    """How this run compares with the committed spread of the demo over seeds (same data and model only)."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        spread = json.load(f)
    if spread.get("data_set") != summary["data_set"] or spread.get("model") != summary["model"]:
        return []
    lines = [f"compared with {len(spread['seeds'])} seeds of the demo on {spread['environment']} "
             f"({os.path.relpath(path, REPO)}):"]
    for key, label in (("acc_unpruned", "top-1 unpruned"), ("acc_pruned", "top-1 right after pruning"),
                       ("acc_finetuned", "top-1 after fine-tuning")):
        s = spread["stats"][key]
        inside = s["min"] <= summary[key] <= s["max"]
        lines.append(f"  {label}: {summary[key]:.2f}% here; {s['mean']:.2f} ± {s['std']:.2f} "
                     f"({s['min']:.2f} - {s['max']:.2f}) there: "
                     + ("inside that range" if inside else
                        f"outside that range by {min(abs(summary[key] - s['min']), abs(summary[key] - s['max'])):.2f} "
                        f"points (other CPUs and torch versions round differently; one image = "
                        f"{100 / summary['val_images']:.2f} points)"))
    return lines


@cli_entry
def main() -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="gated model name (default: the one the runs recorded)")
    parser.add_argument("--output_dir", default="output/demo")
    parser.add_argument("--batch-sizes", default="1,32", help="throughput batch sizes")
    args = parser.parse_args()
    out = args.output_dir
    checkpoints = {}
    for step, relative in STEPS.items():
        path = os.path.join(out, relative)
        if not os.path.isfile(path):
            raise UserError(f"--output_dir: {path} not found (run scripts/demo.sh {out} first)")
        checkpoints[step] = (path, load_torch_file(path, "checkpoint"))
    data = recorded_data(checkpoints, out)
    model_name = args.model or data["model"]
    if not model_name:
        raise UserError(f"--model: the runs under {out} do not record their model; name it")
    if data["model"] and model_name != data["model"]:
        raise UserError(f"--model {model_name!r}: the runs under {out} recorded {data['model']!r}")
    data_args = data_config(defaults(
        data_set=data["data_set"], data_path=data["data_path"] or "", input_size=data["input_size"],
        crop_pct=data["crop_pct"],
        not_imagenet_default_mean_and_std=bool(data["not_imagenet_default_mean_and_std"]), batch_size=64,
        num_workers=0, repeated_aug=False), device="cpu")
    dataset_val, num_classes = build_dataset(False, data_args)
    _, loader = build_loaders(data_args, None, dataset_val, distributed=False)
    arch = arch_of(model_name, num_classes=num_classes, img_size=data["input_size"])
    device = torch.device("cpu")
    data_name = data["data_set"] + (f" {data['data_path']}" if data["data_path"] else "")

    unpruned, pruned, finetuned = (load_pruned(checkpoints[step][0], arch) for step in STEPS)
    mask = pruned.mask

    def top1(model) -> float:
        return evaluate(loader, model.eval(), device, amp=False, print_fn=lambda _: None)["acc1"]

    acc = {"unpruned": top1(unpruned), "pruned": top1(pruned), "finetuned": top1(finetuned)}
    macs_before, macs_after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
    params_before, params_after = mask_params(arch), mask_params(arch, mask)
    kept, total = mask.kept_counts(), mask.total_counts()
    rows = [
        "| | unpruned | SAViT 50% |",
        "|---|---|---|",
        f"| top-1 ({data_name} val, {len(dataset_val)} images) | {acc['unpruned']:.2f}% | "
        f"{acc['pruned']:.2f}% right after pruning (exact, mask-aware) -> {acc['finetuned']:.2f}% after fine-tuning |",
        f"| MMACs | {macs_before / 1e6:.2f} | {macs_after / 1e6:.2f} ({1 - macs_after / macs_before:.1%} fewer) |",
        f"| params (M) | {params_before / 1e6:.3f} | {params_after / 1e6:.3f} ({1 - params_after / params_before:.1%} fewer) |",
        f"| heads / MLP neurons / embedding channels | {total['heads']} / {total['mlp']} / {total['embed']} | "
        f"{kept['heads']} / {kept['mlp']} / {kept['embed']} |",
    ]
    threads = torch.get_num_threads()
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        # alternate the two models so that machine noise hits both alike
        speeds = {"unpruned": [], "pruned": []}
        for _ in range(3):
            speeds["unpruned"].append(measure_throughput(unpruned, batch, arch.img_size, device, iters=20))
            speeds["pruned"].append(measure_throughput(finetuned, batch, arch.img_size, device, iters=20))
        u, p = sorted(speeds["unpruned"])[1], sorted(speeds["pruned"])[1]
        rows.append(f"| CPU throughput, batch {batch}, {threads} thread(s) | {u:.0f} img/s | {p:.0f} img/s "
                    f"(speedup {p / u:.2f}x; FLOPs ratio {macs_before / macs_after:.2f}x) |")
    summary = {"model": model_name, "data_set": data["data_set"], "val_images": len(dataset_val),
               "environment": environment_line(), **{f"acc_{k}": v for k, v in acc.items()},
               **{f"kept_{k}": v for k, v in kept.items()}, "reduction": 100 * (1 - macs_after / macs_before),
               "macs_before": macs_before, "macs_after": macs_after,
               "params_before": params_before, "params_after": params_after}
    table = "\n".join(rows + ["", f"measured on {summary['environment']}"] + spread_lines(summary, SPREAD))
    print(table)
    atomic_write_json(summary, os.path.join(out, "summary.json"))
    atomic_write_text(table + "\n", os.path.join(out, "summary.md"))
    print(f"\nall artefacts (checkpoints, logs, TensorBoard) are under {out}/; table saved to {out}/summary.md")


if __name__ == "__main__":
    main()
