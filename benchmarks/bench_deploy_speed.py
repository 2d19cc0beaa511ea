"""Throughput of the pruned deploy model (DeiT, any timm ViT or Swin) next to the unpruned one, side by side in one run.

For every model in `--models` and mask (`--masks` glob; default `{model}_*.json` in `--masks-dir`, made
by `benchmarks/make_masks.py`, the hardware-aligned `*_r{N}.json` included), the unpruned and the pruned
`{model}_deploy` (random weights: speed does not depend on them) are timed in each of `--runtimes`:

- torch: inference at each of `--batch-sizes` (`torch.inference_mode`; on CUDA fp32 and, with `--amp`,
  bfloat16 autocast, timed by CUDA events), and a training step (`engine.measure_throughput`) at
  `--train-batch-size`;
- onnxruntime (CPU only): both models exported by `pruning.export.export` (opset 18, dynamic batch),
  timed with `InferenceSession.run`, `intra_op_num_threads` = `--threads`.

The two models alternate (A B, then B A, ...) for `--rounds` rounds so that a noisy machine slows both
alike: the table shows the median img/s of each, the median (min-max) of the paired speedup, and speedup
/ FLOPs ratio (analytic MACs before / after: 1.0 when time follows FLOPs exactly). On CPU a wall-clock
row measured while this process got less than 90% of its `--threads` cores is "not published".

On CPU, glibc's malloc maps every tensor over 32 MB afresh (the kernel zeroes its pages: gigabytes per
batch-32 DeiT-B forward), or not, depending on what was freed before: a 10-15% swing that can favour
either model. `--malloc no-mmap` (the default) keeps large blocks on the heap, as tcmalloc/jemalloc would.

    python benchmarks/bench_deploy_speed.py --out logs/speed_table.md
    python benchmarks/bench_deploy_speed.py --device cuda --amp --out logs/speed_table_cuda.md
"""
import argparse
import ctypes
import ctypes.util
import datetime
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (REPO, call_seconds, check_minimums, command_line, environment, int_list,  # noqa: E402
                               markdown_table, paired, parse_device, write_report)
from engine import measure_throughput  # noqa: E402
from models import arch_of, build_deploy_model, is_prunable  # noqa: E402
from models.mask import PruneMask  # noqa: E402
from pruning.export import DEFAULT_OPSET, export  # noqa: E402
from pruning.flops import mask_macs, mask_params  # noqa: E402
from utils import Parser, UserError, cli_entry  # noqa: E402

DEFAULT_MODELS = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"
SHORT = {"deit_tiny_patch16_224": "DeiT-T", "deit_small_patch16_224": "DeiT-S", "deit_base_patch16_224": "DeiT-B"}
RUNTIMES = ("torch", "onnxruntime")
SHORT_RUNTIME = {"torch": "torch", "onnxruntime": "ORT"}
DEFAULT_BATCHES = {"cpu": "1,32", "cuda": "256,1"}
PRUNING_PASS_COMMAND = "python benchmarks/bench_pruning_pass.py --model deit_small_patch16_224 --batch-size 8 --batches 3"
# the bar: at batch 32, speedup >= 0.9 x FLOPs ratio for the 50% DeiT-B mask (on CPU)
TARGET_EFFICIENCY = 0.9
MIN_CPU_SHARE = 0.9  # below this share of its cores the process was competing with others: not published


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="Deploy (pruned) vs unpruned model throughput, side by side.")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated DeiT names (default: T, S, B)")
    p.add_argument("--masks-dir", default=os.path.join(REPO, "logs", "masks"),
                   help="folder with {model}_*.json masks (default: logs/masks)")
    p.add_argument("--masks", default="",
                   help="glob of mask files instead of --masks-dir, e.g. 'logs/masks/*_0.5*.json'; a file goes "
                        "with the model its name starts with")
    p.add_argument("--runtimes", default=None,
                   help="comma-separated, of torch, onnxruntime (default: both on CPU, torch on CUDA)")
    p.add_argument("--batch-sizes", default=None, help="inference batch sizes (default: 1,32 on CPU, 256,1 on CUDA)")
    p.add_argument("--train-batch-size", type=int, default=8,
                   help="batch of the timed torch training step; 0 skips it (default: 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement (default: 3)")
    p.add_argument("--iters", type=int, default=2, help="timed calls per model per round (default: 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before a model's first round (and before every training round; default: 1)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads and onnxruntime intra-op threads (default: 2, this machine's cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--amp", action="store_true", help="CUDA: also time inference under bfloat16 autocast")
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
    kind = parse_device(args.device, available=False).type  # CUDA is checked by `main`: parsing runs anywhere
    args.batch_sizes = int_list(args.batch_sizes or DEFAULT_BATCHES[kind], "--batch-sizes")
    runtimes = args.runtimes if args.runtimes is not None else ("torch,onnxruntime" if kind == "cpu" else "torch")
    args.runtimes = [r.strip() for r in runtimes.split(",") if r.strip()]
    if not args.runtimes or any(r not in RUNTIMES for r in args.runtimes):
        raise UserError(f"--runtimes: expected a comma-separated list of {', '.join(RUNTIMES)}, got {runtimes!r}")
    if "onnxruntime" in args.runtimes and kind != "cpu":
        raise UserError("--runtimes onnxruntime: the ONNX Runtime rows run on CPU only; use --device cpu")
    if args.amp and kind != "cuda":
        raise UserError("--amp: bfloat16 autocast is timed on CUDA only (--device cuda)")
    check_minimums(args, {"--rounds": 1, "--iters": 1, "--warmup": 0, "--threads": 1, "--train-batch-size": 0})
    if args.clock == "cpu" and (args.threads != 1 or kind != "cpu"):
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


def find_masks(masks_dir: str, model: str, pattern: str = "") -> List[Tuple[str, PruneMask]]:
    """The masks of `model` (e.g. 'deit_base_patch16_224'), sorted by name, each checked against it: the
    files of glob `pattern` (`--masks`) whose name starts with `{model}_`, or (no pattern) `{model}_*.json`
    in `masks_dir` (`--masks-dir`)."""
    if pattern:
        paths = sorted(p for p in glob.glob(pattern) if os.path.basename(p).startswith(model + "_"))
        if not paths:
            raise UserError(f"--masks {pattern!r}: no file {model}_*.json matches (make masks with "
                            "benchmarks/make_masks.py)")
    else:
        if not os.path.isdir(masks_dir):
            raise UserError(f"--masks-dir: not a directory: {masks_dir!r} (make masks with benchmarks/make_masks.py)")
        paths = sorted(glob.glob(os.path.join(masks_dir, f"{model}_*.json")))
        if not paths:
            raise UserError(f"--masks-dir: no mask {model}_*.json in {masks_dir!r} "
                            "(make one with benchmarks/make_masks.py)")
    arch = arch_of(model)
    found = []
    for path in paths:
        mask = PruneMask.load(path)
        if mask.model and mask.model != model:
            raise UserError(f"mask {path} is for {mask.model!r}, not {model!r}")
        mask.check_fits(arch)
        found.append((path, mask))
    return found


def round_to_of(path: str) -> int:
    """The N of a `*_r{N}.json` mask (widths aligned to multiples of N; make_masks.py's names), else 1."""
    found = re.search(r"_r(\d+)\.json$", os.path.basename(path))
    return int(found.group(1)) if found else 1


def torch_infer_rate(model: torch.nn.Module, images: torch.Tensor, warmup: int, iters: int, precision: str,
                     clock: str = "wall") -> float:
    """Images/s of inference (median over `iters` calls after `warmup` untimed ones).

    On CUDA each call is timed with CUDA events (after the warm-up, on the current stream);
    `precision` 'bf16' runs under bfloat16 autocast. On CPU: `clock` ('wall' or 'cpu').
    """
    device = images.device

    def call() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(images)

    return images.shape[0] / statistics.median(call_seconds(call, iters, warmup, clock, device))


def train_rate(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device, warmup: int,
               iters: int, clock: str = "wall") -> float:
    """Images/s of a training step (`engine.measure_throughput`, fp32; on a fresh copy of the model),
    from its median wall time or from this thread's CPU time over the timed calls (`clock` 'cpu';
    the CPU time also holds the copy of the model and its first gradient allocation)."""
    if clock == "wall":
        return measure_throughput(model, batch_size, img_size, device, train_step=True, warmup=warmup, iters=iters)
    if warmup:
        measure_throughput(model, batch_size, img_size, device, train_step=True, warmup=0, iters=warmup)
    start = time.thread_time()
    measure_throughput(model, batch_size, img_size, device, train_step=True, warmup=0, iters=iters)
    return batch_size * iters / (time.thread_time() - start)


def ort_session(model: torch.nn.Module, arch, threads: int, path: str):
    """Export `model` (CPU, eval) to `path` with the project's exporter and open it in ONNX Runtime
    (CPUExecutionProvider, `threads` intra-op threads, sequential execution)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--runtimes onnxruntime: onnxruntime is not installed (pip install onnxruntime onnxscript)")
    export(model, arch, "onnx", path, opset=DEFAULT_OPSET)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # no busy-waiting between runs: ORT's idle worker threads would otherwise spin on the cores
    # while the PyTorch model of the same process is timed
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_infer_rate(session, images: np.ndarray, warmup: int, iters: int, clock: str = "wall") -> float:
    """Images/s of `session.run` (median over `iters` calls after `warmup` untimed ones)."""
    seconds = call_seconds(lambda: session.run(None, {"images": images}), iters, warmup, clock)
    return images.shape[0] / statistics.median(seconds)


def measured_cpu_share(row: dict, cpu_used: float, threads: int) -> float:
    """The share of `threads` cores this process got while measuring `row` (< 1: others competed)."""
    return cpu_used / (row["seconds"] * threads)


def load_line() -> str:
    """`uptime`'s load averages, or a note where the OS has none."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: n/a"
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def device_line(device: torch.device, threads: int) -> str:
    return f"{environment(device)}; torch threads {threads} ({torch.backends.cpu.get_cpu_capability()})"


def fmt_range(values: List[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def structure_line(mask: PruneMask) -> str:
    kept, total = mask.kept_counts(), mask.total_counts()
    return (f"heads {total['heads'] - kept['heads']}/{total['heads']}, mlp {total['mlp'] - kept['mlp']}/{total['mlp']}, "
            f"embed {total['embed'] - kept['embed']}/{total['embed']}")


def short(model: str) -> str:
    return SHORT.get(model, model)


def _plan(args: argparse.Namespace, device: torch.device, img_size: int, unpruned: torch.nn.Module,
          pruned: torch.nn.Module, sessions: dict) -> List[Tuple[str, str, str, int, Dict[str, Callable], bool]]:
    """(runtime, precision, mode label, batch, {'unpruned': f, 'pruned': f}, warm every round) of each row."""
    nets = {"unpruned": unpruned, "pruned": pruned}
    precisions = ["fp32", "bf16"] if args.amp else ["fp32"]
    plan = []
    if "torch" in args.runtimes:
        for precision in precisions:
            for b in args.batch_sizes:
                images = torch.randn(b, 3, img_size, img_size, device=device)
                rate = {k: (lambda w, net=net, x=images, pr=precision:
                            torch_infer_rate(net, x, w, args.iters, pr, args.clock)) for k, net in nets.items()}
                label = f"infer b{b}" + (f" {precision}" if device.type == "cuda" else "")
                plan.append(("torch", precision, label, b, rate, False))
        if args.train_batch_size:
            tb = args.train_batch_size
            rate = {k: (lambda w, net=net: train_rate(net, tb, img_size, device, w, args.iters, args.clock))
                    for k, net in nets.items()}
            plan.append(("torch", "fp32", f"train b{tb}", tb, rate, True))
    if "onnxruntime" in args.runtimes:
        for b in args.batch_sizes:
            images = np.random.default_rng(b).standard_normal((b, 3, img_size, img_size)).astype(np.float32)
            rate = {k: (lambda w, s=s, x=images: ort_infer_rate(s, x, w, args.iters, args.clock))
                    for k, s in sessions.items()}
            plan.append(("onnxruntime", "fp32", f"infer b{b}", b, rate, False))
    return plan


def run(args: argparse.Namespace) -> Tuple[List[dict], List[str]]:
    """Measure every (model, mask, runtime, mode); returns the rows and a list of warnings."""
    device = torch.device(args.device)
    warnings = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m.endswith("_deploy") or not is_prunable(m):
            raise UserError(f"--models: {m!r} is not a prunable ViT name (e.g. deit_base_patch16_224)")
    plan = [(m, find_masks(args.masks_dir, m, args.masks)) for m in models]
    rows = []
    for model, masks in plan:
        arch = arch_of(model)
        with tempfile.TemporaryDirectory(prefix="bench_onnx_") as tmp:
            unpruned = build_deploy_model(arch).eval()
            sessions = {}
            if "onnxruntime" in args.runtimes:
                print(f"{short(model)}: exporting the unpruned model to ONNX ...", flush=True)
                sessions["unpruned"] = ort_session(unpruned, arch, args.threads, os.path.join(tmp, "unpruned.onnx"))
            unpruned = unpruned.to(device)
            for path, mask in masks:
                pruned = build_deploy_model(arch, mask).eval()
                if "onnxruntime" in args.runtimes:
                    sessions["pruned"] = ort_session(pruned, arch, args.threads, os.path.join(tmp, "pruned.onnx"))
                pruned = pruned.to(device)
                before, after = mask_macs(arch)["total"], mask_macs(arch, mask)["total"]
                info = {"model": model, "mask": os.path.basename(path), "round_to": round_to_of(path),
                        "structure": structure_line(mask), "macs_before": before, "macs_after": after,
                        "flops_ratio": before / after, "params_before": mask_params(arch),
                        "params_after": mask_params(arch, mask)}
                for runtime, precision, label, batch, rate, warm_every in _plan(args, device, arch.img_size, unpruned,
                                                                                pruned, sessions):
                    rows.append(measure_row(args, device, dict(info, runtime=runtime, precision=precision, mode=label,
                                                               batch=batch), rate, warm_every, warnings))
                del pruned
                sessions.pop("pruned", None)
            del unpruned, sessions
    return rows, warnings


def measure_row(args: argparse.Namespace, device: torch.device, row: dict, rate: Dict[str, Callable],
                warm_every: bool, warnings: List[str]) -> dict:
    """Time one row (`paired`), add its numbers and CPU share, decide whether it is published, print it."""
    start, cpu_start, thread_start = time.perf_counter(), time.process_time(), time.thread_time()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    got = paired(rate, args.rounds, args.warmup, warm_every)
    row.update(unpruned=got["unpruned"], pruned=got["pruned"], ratio=got["ratio"],
               speedup=statistics.median(got["ratio"]), load=load_before, seconds=time.perf_counter() - start)
    row["efficiency"] = row["speedup"] / row["flops_ratio"]
    row["cpu_share"] = None
    if device.type == "cpu":
        cpu_used = time.process_time() - cpu_start
        row["cpu_share"] = measured_cpu_share(row, cpu_used, args.threads)
        if args.clock == "cpu" and cpu_used > 1.05 * (time.thread_time() - thread_start):
            warnings.append(f"{short(row['model'])} {row['mask']} {row['runtime']} {row['mode']}: other threads of "
                            "this process used CPU time too, which --clock cpu does not count")
    # wall-clock rows on a CPU this process did not have to itself are not the model's numbers
    row["published"] = not (device.type == "cpu" and args.clock == "wall" and row["cpu_share"] < MIN_CPU_SHARE)
    where = f"{short(row['model'])} {row['mask']} {SHORT_RUNTIME[row['runtime']]} {row['mode']}"
    share = "" if row["cpu_share"] is None else f"CPU share {row['cpu_share']:.0%}, "
    if row["published"]:
        print(f"{where}: unpruned {fmt_range(got['unpruned'])} img/s, pruned {fmt_range(got['pruned'])} img/s, "
              f"speedup {fmt_range(got['ratio'])}x (FLOPs ratio {row['flops_ratio']:.2f}x, speedup / ratio "
              f"{row['efficiency']:.2f}; {share}load {load_before:.1f}; {row['seconds']:.0f} s)", flush=True)
    else:
        print(f"{where}: not published: CPU share {row['cpu_share']:.0%} (load {load_before:.1f})", flush=True)
    return row


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


def _where(args: argparse.Namespace) -> str:
    if args.masks:
        return f"`--masks {args.masks}`"
    d = args.masks_dir
    return f"`{os.path.relpath(d, REPO) if os.path.abspath(d).startswith(REPO) else d}` (see its README.md)"


def summary_lines(rows: List[dict], cuda: bool) -> List[str]:
    """One line per (model, mask): round_to, FLOPs ratio, then speedup / FLOPs ratio per runtime, batch
    (and precision on CUDA) of the inference rows."""
    columns, masks = [], []
    for r in rows:
        if r["mode"].startswith("infer"):
            col = (r["runtime"], r["precision"], r["batch"])
            if col not in columns:
                columns.append(col)
        if (r["model"], r["mask"]) not in masks:
            masks.append((r["model"], r["mask"]))
    label = {c: f"{SHORT_RUNTIME[c[0]]} b{c[2]}" + (f" {c[1]}" if cuda else "") for c in columns}
    cells = {(r["model"], r["mask"], r["runtime"], r["precision"], r["batch"]): r
             for r in rows if r["mode"].startswith("infer")}
    table = []
    for model, name in masks:
        first = next(r for r in rows if (r["model"], r["mask"]) == (model, name))
        found = [cells.get((model, name) + c) for c in columns]
        table.append([short(model), f"`{name}`", first["round_to"], f"{first['flops_ratio']:.2f}x"] + [
            "-" if r is None else f"{r['efficiency']:.2f}" if r["published"]
            else f"not published (CPU share {r['cpu_share']:.0%})" for r in found])
    return markdown_table(["model", "mask", "round_to", "FLOPs ratio"] + [label[c] for c in columns], table)


def render(args: argparse.Namespace, rows: List[dict], warnings: List[str], command: str, started: str,
           load_start: str, load_end: str, total_s: float) -> str:
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dropped = [r for r in rows if not r["published"]]
    runtimes = [f"torch {torch.__version__}"]
    if "onnxruntime" in args.runtimes:
        import onnxruntime
        runtimes.append(f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, intra_op_num_threads "
                        f"{args.threads}; models exported by `pruning.export.export`, opset {DEFAULT_OPSET})")
    if "torch" not in args.runtimes:
        runtimes = runtimes[1:]
    precision = "fp32" + (" and bfloat16 autocast" if args.amp else "")
    lines = ["# Deploy (pruned) vs unpruned model throughput", "",
             "Command (from the repository root):", "", f"    {command}", "",
             f"- when: {started}; took {total_s:.0f} s",
             f"- device: {device_line(device, args.threads)}" + (f", malloc: {args.malloc}" if cpu else ""),
             f"- runtimes: {'; '.join(runtimes)}",
             f"- inference batches: {', '.join(map(str, args.batch_sizes))}; precision: {precision}"
             + (f"; torch training step: batch {args.train_batch_size}, fp32" if args.train_batch_size
                and "torch" in args.runtimes else ""),
             f"- machine load before: {load_start}; after: {load_end}",
             f"- method: the two models alternating (A B, B A, ...) for {args.rounds} rounds of {args.iters} timed "
             "calls each (after warm-up); "
             + ("each call timed with CUDA events; " if not cpu else
                "img/s from the median wall time of the calls of a round; " if args.clock == "wall" else
                "img/s from this thread's CPU time of the calls of a round (`--clock cpu`: time other processes "
                "take from the machine does not count); ")
             + "img/s = median over rounds, speedup = median (min-max) over rounds of pruned/unpruned img/s "
             "measured back to back; FLOPs ratio = analytic MACs before / after (`pruning.flops.mask_macs`); "
             "speedup / FLOPs ratio = 1.0 when time follows FLOPs exactly"
             + ("; CPU share = CPU time this process got / (wall time x threads) while measuring the row "
                "(below 100%: other processes took cores)." if cpu else "."),
             f"- masks: {_where(args)}: `{{model}}_{{target}}.json` is main.py's mask on random weights; "
             "`*_paper-counts.json` has the paper's per-component counts; `*_r{N}.json`: every block's kept MLP "
             "width and the kept embedding width are multiples of N (round_to). Weights are random: speed only."]
    if cpu and args.clock == "wall":
        lines.append(f"- not published: {len(dropped)} of {len(rows)} rows (measured while this process got less "
                     f"than {MIN_CPU_SHARE:.0%} of its {args.threads} cores: other processes competed)")
    lines.append("")
    if warnings:
        lines += ["**Warnings:**", ""] + [f"- {w}" for w in warnings] + [""]
    table = []
    for r in rows:
        cells = [short(r["model"]), f"`{r['mask']}`", r["round_to"], r["structure"],
                 f"{r['macs_before'] / 1e9:.2f} -> {r['macs_after'] / 1e9:.2f}", f"{r['flops_ratio']:.2f}x",
                 f"{r['params_before'] / 1e6:.1f} -> {r['params_after'] / 1e6:.1f}", SHORT_RUNTIME[r["runtime"]],
                 r["mode"]]
        cells += ([f"{statistics.median(r['unpruned']):.2f}", f"{statistics.median(r['pruned']):.2f}",
                   f"{fmt_range(r['ratio'])}x", f"{r['efficiency']:.2f}"] if r["published"] else
                  [f"not published: CPU share {r['cpu_share']:.0%}", "", "", ""])
        table.append(cells + ([f"{r['cpu_share']:.0%}"] if cpu else []))
    lines += markdown_table(["model", "mask", "round_to", "pruned units", "GMACs before -> after", "FLOPs ratio",
                             "params (M) before -> after", "runtime", "mode", "img/s unpruned", "img/s pruned",
                             "speedup (min-max)", "speedup / FLOPs ratio"] + (["CPU share"] if cpu else []), table)
    lines += ["", "## Summary: speedup / FLOPs ratio", ""] + summary_lines(rows, not cpu)
    target_rows = [r for r in rows if r["model"] == "deit_base_patch16_224" and r["runtime"] == "torch"
                   and r["mode"] == "infer b32" and r["published"]
                   and abs(1 - r["macs_after"] / r["macs_before"] - 0.5) < 0.01]
    if target_rows and cpu:
        lines += ["", f"Issue 4's bar (CPU, torch, DeiT-B at 50% FLOPs, batch 32: speedup >= {TARGET_EFFICIENCY} x "
                      "FLOPs ratio):"]
        for r in target_rows:
            verdict = "meets it" if r["efficiency"] >= TARGET_EFFICIENCY else "FALLS SHORT"
            lines.append(f"- `{r['mask']}`: {r['speedup']:.2f}x for a {r['flops_ratio']:.2f}x FLOPs ratio = "
                         f"{r['efficiency']:.2f} of it -- {verdict}")
    lines += ["", "## Pruning-pass cost per batch", ""] + pruning_pass_lines(args.pruning_pass_log)
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    device = parse_device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cpu" and args.malloc == "no-mmap" and not malloc_without_mmap():
        print("note: --malloc no-mmap needs glibc's mallopt; using the C library's default", flush=True)
        args.malloc = "default"
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load_start = load_line()
    print(f"device: {device_line(device, args.threads)}; {load_start}", flush=True)
    if device.type == "cpu" and args.clock == "wall" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: the machine is busy ({load_start}): rows measured with less than {MIN_CPU_SHARE:.0%} of "
              f"the cores will not be published (--clock cpu --threads 1 is not disturbed)", flush=True)
    start = time.perf_counter()
    rows, warnings = run(args)
    total = time.perf_counter() - start
    text = render(args, rows, warnings, command_line(__file__, argv), started, load_start, load_line(), total)
    print()
    print(text)
    if args.out:
        write_report([text.rstrip("\n")], args.out)


if __name__ == "__main__":
    main()
