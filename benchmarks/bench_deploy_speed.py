"""Throughput of the pruned deploy DeiT next to the unpruned one, side by side in one run.

For every model in `--models` and every mask `{model}_*.json` in `--masks-dir` (made by
`benchmarks/make_masks.py`), the unpruned `{model}_deploy` and the pruned `{model}_deploy`
(random weights: speed does not depend on them) are timed with `engine.measure_throughput`:
inference at each of `--batch-sizes`, and a training step (forward + backward + SGD) at
`--train-batch-size`. The two models alternate (A B, then B A, ...) for `--rounds` rounds so
that a shared, noisy machine slows both alike; the table shows the median images/s of each,
and the median (min-max) over rounds of the paired speedup pruned/unpruned, next to the
FLOPs ratio (analytic MACs before / after) it would reach if time followed FLOPs.

On CPU, glibc's malloc hands every tensor over 32 MB fresh pages that the kernel zeroes on
first touch (gigabytes per batch-32 DeiT-B forward), or not, depending on what was freed
before: a 10-15% swing that can favour either model. `--malloc no-mmap` (the default) keeps
large blocks on the heap, as tcmalloc/jemalloc would, so both models run alike.

    python benchmarks/bench_deploy_speed.py --out logs/speed_table.md
    python benchmarks/bench_deploy_speed.py --device cuda --batch-sizes 1,32,128 --out logs/speed_table_cuda.md
"""
import argparse
import ctypes
import ctypes.util
import datetime
import glob
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import measure_throughput  # noqa: E402
from models import arch_of, create_model, list_models  # noqa: E402
from pruning.flops import mask_macs, mask_params  # noqa: E402
from pruning.mask import PruneMask  # noqa: E402
from utils import UserError, atomic_write_text, cli_entry  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"
SHORT = {"deit_tiny_patch16_224": "DeiT-T", "deit_small_patch16_224": "DeiT-S", "deit_base_patch16_224": "DeiT-B"}
PRUNING_PASS_COMMAND = "python benchmarks/bench_pruning_pass.py --model deit_small_patch16_224 --batch-size 8 --batches 3"
# the bar: at batch 32, speedup >= 0.9 x FLOPs ratio for the 50% DeiT-B mask (on CPU)
TARGET_EFFICIENCY = 0.9
MIN_CPU_SHARE = 0.8  # below this share of its cores the process was competing with others


def _int_list(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Deploy (pruned) vs unpruned DeiT throughput, side by side.")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated DeiT names (default: T, S, B)")
    p.add_argument("--masks-dir", default=os.path.join(REPO, "logs", "masks"),
                   help="folder with {model}_*.json masks (default: logs/masks)")
    p.add_argument("--batch-sizes", default="1,32", help="inference batch sizes (default: 1,32)")
    p.add_argument("--train-batch-size", type=int, default=8,
                   help="batch of the timed training step; 0 skips it (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement (default: 3)")
    p.add_argument("--iters", type=int, default=2, help="timed calls per model per round (default: 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before a model's first round (and before every training round; default: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2, this machine's cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: wall time (default); cpu: this thread's CPU time, which other processes do not "
                        "disturb (CPU device and --threads 1 only)")
    p.add_argument("--malloc", choices=["no-mmap", "default"], default="no-mmap",
                   help="CPU, glibc: 'no-mmap' (default) keeps large tensors on the heap, as tcmalloc/jemalloc "
                        "would, so that neither model pays the kernel's page zeroing by chance of the allocator's "
                        "history; 'default': the C library's own setting")
    p.add_argument("--pruning-pass-log", default=os.path.join(REPO, "logs", "pruning_pass.md"),
                   help="the committed output of benchmarks/bench_pruning_pass.py, quoted if it exists")
    p.add_argument("--out", default="", help="also write the table as markdown to this file (atomically)")
    args = p.parse_args(argv)
    args.batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    for flag, value, low in (("--rounds", args.rounds, 1), ("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                             ("--threads", args.threads, 1), ("--train-batch-size", args.train_batch_size, 0)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.clock == "cpu" and (args.threads != 1 or not args.device.startswith("cpu")):
        raise UserError("--clock cpu needs --device cpu and --threads 1 (CPU time of several threads counts "
                        "their idle spinning too)")
    return args


def malloc_without_mmap() -> bool:
    """glibc only: serve large blocks from the heap and keep freed memory, instead of mapping fresh
    pages for every large tensor (glibc maps blocks over 32 MB anew each time and the kernel zeroes
    every page on first touch -- gigabytes per batch-32 DeiT-B forward). Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def find_masks(masks_dir: str, model: str) -> List[Tuple[str, PruneMask]]:
    """The masks `{model}_*.json` in `masks_dir`, sorted by name, each checked against the model.

    Args:
        masks_dir: folder to look in.
        model: gated DeiT name, e.g. 'deit_base_patch16_224'.
    """
    if not os.path.isdir(masks_dir):
        raise UserError(f"--masks-dir: not a directory: {masks_dir!r} (make masks with benchmarks/make_masks.py)")
    paths = sorted(glob.glob(os.path.join(masks_dir, f"{model}_*.json")))
    if not paths:
        raise UserError(f"--masks-dir: no mask {model}_*.json in {masks_dir!r} (make one with benchmarks/make_masks.py)")
    arch = arch_of(model)
    found = []
    for path in paths:
        mask = PruneMask.load(path)
        if mask.model and mask.model != model:
            raise UserError(f"mask {path} is for {mask.model!r}, not {model!r}")
        mask.check_fits(arch)
        found.append((path, mask))
    return found


def timed_throughput(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device,
                     train_step: bool, iters: int, warmup: int, amp: bool, clock: str) -> float:
    """Images/s of one `engine.measure_throughput` call, read from the wall clock or from CPU time.

    Args:
        model: the network.
        batch_size: images per call.
        img_size: input resolution.
        device: where to run.
        train_step: time a training step instead of inference.
        iters: timed calls.
        warmup: untimed calls first.
        amp: float16 autocast (CUDA only).
        clock: 'wall' -- measure_throughput's own median wall time; 'cpu' -- this thread's CPU time
            over the timed calls (one thread only): other processes on the machine do not count,
            so it is the fair reading on a shared machine. With a training step, the CPU time also
            holds measure_throughput's copy of the model and its first gradient allocation.
    """
    if clock == "wall":
        return measure_throughput(model, batch_size, img_size, device, train_step=train_step, warmup=warmup,
                                  iters=iters, amp=amp)
    if warmup:
        measure_throughput(model, batch_size, img_size, device, train_step=train_step, warmup=0, iters=warmup)
    start = time.thread_time()
    measure_throughput(model, batch_size, img_size, device, train_step=train_step, warmup=0, iters=iters)
    return batch_size * iters / (time.thread_time() - start)


def paired_throughput(unpruned: torch.nn.Module, pruned: torch.nn.Module, batch_size: int, img_size: int,
                      device: torch.device, train_step: bool, rounds: int, iters: int, warmup: int,
                      amp: bool, clock: str = "wall") -> Dict[str, List[float]]:
    """Images/s of both models, alternating A B / B A over `rounds` rounds.

    Args:
        unpruned: the reference model.
        pruned: the smaller model.
        batch_size: images per call.
        img_size: input resolution.
        device: where to run.
        train_step: time a training step instead of inference.
        rounds: alternating rounds.
        iters: timed calls per model per round.
        warmup: untimed calls before the first round (and before every round of a training step,
            which measure_throughput runs on a fresh copy of the model).
        amp: float16 autocast (CUDA only).
        clock: 'wall' or 'cpu' (see `timed_throughput`).

    Returns:
        {'unpruned': [img/s per round], 'pruned': [...], 'ratio': [pruned / unpruned per round]}.
    """
    models = {"unpruned": unpruned, "pruned": pruned}
    out: Dict[str, List[float]] = {"unpruned": [], "pruned": []}
    for r in range(rounds):
        order = ("unpruned", "pruned") if r % 2 == 0 else ("pruned", "unpruned")
        for name in order:
            w = warmup if (r == 0 or train_step) else 0
            out[name].append(timed_throughput(models[name], batch_size, img_size, device, train_step, iters, w,
                                              amp, clock))
    out["ratio"] = [p / u for p, u in zip(out["pruned"], out["unpruned"])]
    return out


def load_line() -> str:
    """`uptime`'s load averages, or a note where the OS has none."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: n/a"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def device_line(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}, "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")


def fmt_range(values: List[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def structure_line(mask: PruneMask) -> str:
    kept, total = mask.kept_counts(), mask.total_counts()
    return (f"heads {total['heads'] - kept['heads']}/{total['heads']}, mlp {total['mlp'] - kept['mlp']}/{total['mlp']}, "
            f"embed {total['embed'] - kept['embed']}/{total['embed']}")


def run(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    """Measure every (model, mask, mode); returns the rows and a list of warnings."""
    device = torch.device(args.device)
    warnings = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in list_models() or m.endswith("_deploy"):
            raise UserError(f"--models: {m!r} is not a gated DeiT name of this project (e.g. deit_base_patch16_224)")
    plan = [(m, find_masks(args.masks_dir, m)) for m in models]
    modes = [(f"infer b{b}", b, False) for b in args.batch_sizes]
    if args.train_batch_size:
        modes.append((f"train b{args.train_batch_size}", args.train_batch_size, True))
    rows = []
    for model, masks in plan:
        arch = arch_of(model)
        unpruned = create_model(model + "_deploy").eval()
        for path, mask in masks:
            pruned = create_model(model + "_deploy", mask=mask).eval()
            before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
            for label, batch, train in modes:
                start, cpu_start, thread_start = time.perf_counter(), time.process_time(), time.thread_time()
                load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                got = paired_throughput(unpruned, pruned, batch, arch.img_size, device, train, args.rounds,
                                        args.iters, args.warmup, args.amp, args.clock)
                row = {"model": model, "mask": os.path.basename(path), "structure": structure_line(mask),
                       "macs_before": before, "macs_after": after, "flops_ratio": before / after,
                       "params_before": mask_params(arch), "params_after": mask_params(arch, mask),
                       "mode": label, "unpruned": got["unpruned"], "pruned": got["pruned"], "ratio": got["ratio"],
                       "speedup": statistics.median(got["ratio"]), "load": load_before,
                       "seconds": time.perf_counter() - start}
                # the share of `threads` cores this process got: < 1 when other processes competed
                cpu_used = time.process_time() - cpu_start
                row["cpu_share"] = cpu_used / (row["seconds"] * args.threads)
                if args.clock == "cpu" and cpu_used > 1.05 * (time.thread_time() - thread_start):
                    warnings.append(f"{SHORT.get(model, model)} {row['mask']} {label}: other threads of this process "
                                    "used CPU time too, which --clock cpu does not count")
                row["efficiency"] = row["speedup"] / row["flops_ratio"]
                rows.append(row)
                print(f"{SHORT.get(model, model)} {row['mask']} {label}: unpruned {fmt_range(got['unpruned'])} img/s, "
                      f"pruned {fmt_range(got['pruned'])} img/s, speedup {fmt_range(got['ratio'])}x "
                      f"(FLOPs ratio {row['flops_ratio']:.2f}x; CPU share {row['cpu_share']:.0%}, "
                      f"load {load_before:.1f}; {row['seconds']:.0f} s)", flush=True)
                if device.type == "cpu" and args.clock == "wall" and row["cpu_share"] < MIN_CPU_SHARE:
                    warnings.append(f"{SHORT.get(model, model)} {row['mask']} {label}: this process got "
                                    f"{row['cpu_share']:.0%} of {args.threads} cores (1-min load {load_before:.1f}): "
                                    "other processes competed; its img/s are low and noisy")
            del pruned
        del unpruned
    return rows, warnings


def pruning_pass_lines(path: str) -> List[str]:
    """Markdown quoting the per-batch table of benchmarks/bench_pruning_pass.py's log, or its command."""
    if not path or not os.path.isfile(path):
        return ["Measured by the pruning benchmark (not run here):", "", f"    {PRUNING_PASS_COMMAND}"]
    with open(path) as f:
        text = f.read().splitlines()
    name = os.path.relpath(path, REPO) if os.path.abspath(path).startswith(REPO) else path
    # the lines from the one naming the model ("deit_... at 224, batch ...") to the end of the variant table
    start = next((i for i, line in enumerate(text) if " at " in line and "batch" in line and "threads" in line), None)
    end = next((i for i, line in enumerate(text) if line.startswith("(s/batch")), None)
    if start is None or end is None or end <= start:
        return [f"See `{name}` (benchmarks/bench_pruning_pass.py)."]
    command = next((line.strip() for line in text if line.strip().startswith("python benchmarks/bench_pruning_pass")),
                   PRUNING_PASS_COMMAND)
    return [f"From `{name}` (not re-run here; its command: `{command}`):", "", "```"] + text[start:end] + ["```"]


def render(args: argparse.Namespace, rows: List[dict], warnings: List[str], command: str, started: str,
           load_start: str, load_end: str, total_s: float) -> str:
    device = torch.device(args.device)
    lines = ["# Deploy (pruned) vs unpruned DeiT throughput", "",
             "Command (from the repository root):", "", f"    {command}", "",
             f"- when: {started}; took {total_s:.0f} s",
             f"- device: {device_line(device, args.threads)}" + (", AMP fp16" if args.amp else ", fp32")
             + (f", malloc: {args.malloc}" if device.type == "cpu" else ""),
             f"- machine load before: {load_start}; after: {load_end}",
             f"- method: `engine.measure_throughput` on random input, the two models alternating (A B, B A, ...) "
             f"for {args.rounds} rounds of {args.iters} timed calls each; "
             + ("img/s from the median wall time of the calls of a round; " if args.clock == "wall" else
                "img/s from this thread's CPU time over the calls of a round (`--clock cpu`: time other processes "
                "take from the machine does not count); ")
             + "img/s = median over rounds, speedup = median (min-max) over rounds of pruned/unpruned img/s "
             "measured back to back; FLOPs ratio = analytic MACs before / after (`pruning.flops.mask_macs`); "
             "efficiency = speedup / FLOPs ratio (1.0: time follows FLOPs exactly)"
             + ("; CPU share = CPU time this process got / (wall time x threads) while measuring the row "
                "(below 100%: other processes took cores)." if device.type == "cpu" else "."),
             f"- masks: `{os.path.relpath(args.masks_dir, REPO) if args.masks_dir.startswith(REPO) else args.masks_dir}`"
             " (see its README.md): `{model}_{target}.json` is main.py's mask on random weights; "
             "`*_paper-counts.json` has the paper's per-component counts. Weights are random: speed only.", ""]
    if warnings:
        lines += ["**Warnings:**", ""] + [f"- {w}" for w in warnings] + [""]
    cpu = device.type == "cpu"
    lines += ["| model | mask | pruned units | GMACs before -> after | FLOPs ratio | params (M) before -> after "
              "| mode | img/s unpruned | img/s pruned | speedup (min-max) | speedup / FLOPs ratio |"
              + (" CPU share |" if cpu else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cpu else "")]
    for r in rows:
        lines.append(
            f"| {SHORT.get(r['model'], r['model'])} | `{r['mask']}` | {r['structure']} "
            f"| {r['macs_before'] / 1e9:.2f} -> {r['macs_after'] / 1e9:.2f} | {r['flops_ratio']:.2f}x "
            f"| {r['params_before'] / 1e6:.1f} -> {r['params_after'] / 1e6:.1f} | {r['mode']} "
            f"| {statistics.median(r['unpruned']):.2f} | {statistics.median(r['pruned']):.2f} "
            f"| {fmt_range(r['ratio'])}x | {r['efficiency']:.2f} |" + (f" {r['cpu_share']:.0%} |" if cpu else ""))
    target_rows = [r for r in rows if r["model"] == "deit_base_patch16_224" and r["mode"] == "infer b32"
                   and abs(1 - r["macs_after"] / r["macs_before"] - 0.5) < 0.01]
    if target_rows and device.type == "cpu":
        lines += ["", f"Issue 4's bar (CPU, DeiT-B at 50% FLOPs, batch 32: speedup >= {TARGET_EFFICIENCY} x FLOPs "
                      "ratio):"]
        for r in target_rows:
            verdict = "meets it" if r["efficiency"] >= TARGET_EFFICIENCY else "FALLS SHORT"
            lines.append(f"- `{r['mask']}`: {r['speedup']:.2f}x for a {r['flops_ratio']:.2f}x FLOPs ratio = "
                         f"{r['efficiency']:.2f} of it -- {verdict}")
    lines += ["", "## Pruning-pass cost per batch", ""] + pruning_pass_lines(args.pruning_pass_log)
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    if device.type == "cpu" and args.malloc == "no-mmap" and not malloc_without_mmap():
        print("note: --malloc no-mmap needs glibc's mallopt; using the C library's default", flush=True)
        args.malloc = "default"
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = load_line()
    print(f"device: {device_line(device, args.threads)}; {load_start}", flush=True)
    if device.type == "cpu" and args.clock == "wall" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: the machine is busy ({load_start}): wall-clock timings will be noisy; the alternating "
              "rounds keep the speedups comparable, the img/s less so (--clock cpu --threads 1 is not disturbed)", flush=True)
    start = time.perf_counter()
    rows, warnings = run(args)
    total = time.perf_counter() - start
    shown = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__), REPO)] + [shlex.quote(a) for a in shown])
    text = render(args, rows, warnings, command, started, load_start, load_line(), total)
    print()
    print(text)
    if args.out:
        atomic_write_text(text, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
