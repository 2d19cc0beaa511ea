"""The GPU check: six steps, each in a subprocess stopped when its time budget is spent (a failing or
hanging step leaves the others' results), as a markdown table rewritten after every step. Exit status 1
when a step failed. On CPU (or with --tiny) it runs on `deit_test_patch8_32` at batch 4.

  1. the tests that skip without CUDA (by their skipif);
  2. bench_pruning_pass.py's 'ours' worker, DeiT-B at batch 32: s/batch and peak memory, next to the
     reference's 4.2 s/it and 18.7 GB;
  3-5. `DEPLOY_RUNS`: main_deploy.py under torchrun (nccl; gloo on CPU), AMP, a few steps on random images,
     the 50% DeiT-B of logs/masks with random weights;
  6. `--worker deploy_speed`: bench_deploy_speed's inference timing of the 50% and the unpruned DeiT-B.

    bash scripts/gpu_check.sh                 # GPU: logs/gpu_check.md
    python benchmarks/gpu_check.py --tiny     # any machine: output/gpu_check/gpu_check.md
"""
import argparse
import ast
import datetime
import functools
import glob
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import (REPO, check_minimums, command_line, environment, make_image_folder,  # noqa: E402
                               markdown_table, parse_device, run_steps, run_streaming, run_worker, write_report)
from utils import Parser, atomic_write_json, cli_entry  # noqa: E402

STEPS = ("cuda_tests", "pruning_pass", "deploy_training", "distilled_student", "two_ranks", "deploy_speed")
TITLES = {"cuda_tests": "CUDA-only tests", "pruning_pass": "pruning pass",
          "deploy_training": "deploy fine-tuning (torchrun, AMP, hard distillation)",
          "distilled_student": "distilled student (no teacher; hard distillation)",
          "two_ranks": "two ranks (torchrun --nproc_per_node 2)", "deploy_speed": "deploy speed, pruned vs unpruned"}
REFERENCE_PASS = (4.2, 18.7)  # the reference's pruning pass of DeiT-B at batch 32: s/it, GB, one GPU
TOTAL_BUDGET_S = 450  # GPU: under the shell script's `timeout 480`
# one main_deploy.py run: the student and its number of steps (keys of `settings`), distillation, ranks
DeployRun = NamedTuple("DeployRun", [("student", str), ("distillation", str), ("nproc", int), ("steps", str)])
DEPLOY_RUNS = {"deploy_training": [DeployRun("model", "hard", 1, "train_steps")],
               "distilled_student": [DeployRun("distilled", "none", 1, "extra_steps"),
                                     DeployRun("distilled", "hard", 1, "extra_steps")],
               "two_ranks": [DeployRun("model", "hard", 2, "extra_steps")]}
FULL = dict(model="deit_base_patch16_224", distilled="deit_base_distilled_patch16_224",
            teacher="deit_tiny_patch16_224_deploy", img=224,
            mask=os.path.join(REPO, "logs", "masks", "deit_base_patch16_224_0.5.json"),
            prune_batch=32, prune_batches=3, train_batch=32, train_steps=5, extra_steps=3, workers=4,
            speed_batches=(256, 1), warmup=5, iters=20, budgets=dict(cuda_tests=60, pruning_pass=60,
                                                                     deploy_training=90, distilled_student=120,
                                                                     two_ranks=60, deploy_speed=60))
TINY = dict(FULL, model="deit_test_patch8_32", distilled="deit_test_distilled_patch8_32",
            teacher="deit_test_patch8_32_deploy", img=32, mask=None, prune_batch=4, prune_batches=2, train_batch=4,
            train_steps=3, workers=0, speed_batches=(4, 1), warmup=1, iters=3, budgets=dict(
                cuda_tests=120, pruning_pass=120, deploy_training=150, distilled_student=240, two_ranks=150,
                deploy_speed=120))


def settings(tiny: bool) -> dict:
    """Models, batches and budgets (seconds) of the full (DeiT-B) or the tiny check."""
    return dict(TINY if tiny else FULL)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="GPU check: CUDA tests, pruning pass, deploy training and speed.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda[:N] or cpu (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="deit_test_patch8_32 at batch 4 (automatic on CPU)")
    p.add_argument("--out", default="", help="markdown file (default: logs/gpu_check.md for the full check on "
                                             "CUDA, else output/gpu_check/gpu_check.md)")
    p.add_argument("--budget", type=float, default=0,
                   help=f"seconds for the whole check (default: {TOTAL_BUDGET_S} for the full check, else none)")
    p.add_argument("--worker", choices=["deploy_speed"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = parse_device(args.device).type == "cuda"
    args.tiny = args.tiny or not cuda
    check_minimums(args, {"--budget": 0})
    args.budget = args.budget or (0 if args.tiny else TOTAL_BUDGET_S)
    args.out = args.out or (os.path.join(REPO, "logs", "gpu_check.md") if cuda and not args.tiny else
                            os.path.join(REPO, "output", "gpu_check", "gpu_check.md"))
    return args


def cuda_test_ids(tests_dir: str = os.path.join(REPO, "tests")) -> List[str]:
    """Node ids (tests/FILE.py::NAME) of the test functions whose decorators test `cuda.is_available`."""
    ids = []
    for path in sorted(glob.glob(os.path.join(tests_dir, "test_*.py"))):
        with open(path) as f:
            source = f.read()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and any(
                    "cuda.is_available" in (ast.get_source_segment(source, d) or "") for d in node.decorator_list):
                ids.append(f"{os.path.relpath(path, REPO)}::{node.name}")
    return ids


def load_mask(cfg: dict):
    """(mask, arch, name) of the check: logs/masks' 50% DeiT-B mask, or (tiny) one head fewer and every
    other MLP neuron kept in each block."""
    from models import PruneMask, arch_of

    arch = arch_of(cfg["model"])
    if cfg["mask"]:
        mask = PruneMask.load(cfg["mask"])
        mask.check_fits(arch)
        return mask, arch, os.path.relpath(cfg["mask"], REPO)
    mask = PruneMask.full(arch)
    mask.heads = [list(range(arch.num_heads - 1)) for _ in range(arch.depth)]
    mask.mlp = [list(range(0, arch.mlp_hidden, 2)) for _ in range(arch.depth)]
    return mask, arch, "half_mask (tiny)"


# steps: each returns {"status": "passed" | "failed: why" | "skipped: why", "summary": str, "details": [lines]}

def step_cuda_tests(args, cfg, timeout: float) -> dict:
    if torch.device(args.device).type != "cuda":
        return {"status": "skipped: no CUDA", "summary": "the CUDA-only tests need a GPU"}
    ids = cuda_test_ids()
    if not ids:
        return {"status": "failed: no CUDA-only test found in tests/", "summary": ""}
    rc, lines = run_streaming([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids], timeout)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", "\n".join(lines[-5:]))}
    summary = f"`python -m pytest -q {' '.join(ids)}`: " + (", ".join(f"{n} {k}" for k, n in counts.items())
                                                            or "no summary line")
    if rc is None:
        return {"status": f"failed: timed out after {timeout:.0f} s", "summary": summary}
    ok = rc == 0 and counts.get("passed", 0) > 0 and set(counts) == {"passed"}
    return {"status": "passed" if ok else f"failed: pytest exit status {rc}", "summary": summary}


def worker_failure(rc, lines: List[str], timeout: float) -> dict:
    """The result of a worker process that wrote none."""
    return {"status": f"failed: timed out after {timeout:.0f} s" if rc is None else f"failed: exit status {rc}",
            "summary": lines[-1] if lines and rc is not None else "", "details": ["```", *lines[-15:], "```"]}


def step_pruning_pass(args, cfg, timeout: float) -> dict:
    """bench_pruning_pass.py's 'ours' variant (its worker process) on the check's model, batch and device."""
    rc, lines, got = run_worker(os.path.join(REPO, "benchmarks", "bench_pruning_pass.py"), [
        "--model", cfg["model"], "--input-size", str(cfg["img"]), "--batch-size", str(cfg["prune_batch"]),
        "--batches", str(cfg["prune_batches"]), "--device", args.device, "--worker", "ours"], timeout)
    if got is None:
        return worker_failure(rc, lines, timeout)
    finite = all(bool(torch.isfinite(torch.tensor(v)).all()) for v in [*got["criteria"].values(), got["C"]])
    s_per_batch, cuda = statistics.median(got["times"]), "peak_cuda_mb" in got
    peak_gb = (got["peak_cuda_mb"] if cuda else got["peak_rss_mb"]) / 2 ** 10
    summary = f"{s_per_batch:.3f} s/batch, " + (
        f"peak {peak_gb:.2f} GB allocated (torch.cuda.max_memory_allocated), "
        f"{got['reserved_cuda_mb'] / 2 ** 10:.2f} GB reserved" if cuda else
        f"peak RSS {peak_gb:.2f} GB (whole process)")
    if not args.tiny:
        ref_s, ref_gb = REFERENCE_PASS
        summary += (f"; reference: {ref_s} s/it, {ref_gb} GB (ours: {s_per_batch / ref_s:.2f}x the time, "
                    f"{peak_gb / ref_gb:.2f}x the memory)")
    details = [f"- `benchmarks/bench_pruning_pass.py` variant 'ours' (`pruning.scoring.PruningScorer`: method 2 "
               f"with C, gates-only gradients, criteria in fp32) of `{cfg['model']}` at {cfg['img']}, batch "
               f"{cfg['prune_batch']}, random data, median of {len(got['times'])} batches after 1 warm-up: {summary}",
               f"- criteria and C finite: {finite}"]
    return {"status": "passed" if finite else "failed: non-finite criteria or C", "summary": summary,
            "details": details}


def training_result(lines: List[str], rc, cuda: bool, run: DeployRun, batch: int, steps: int, took: float) -> dict:
    """What main_deploy.py's output says (configuration, distillation, step times, completion): the run's
    {'problems', 'summary'}."""
    text = "\n".join(lines)
    found = re.search(r"configuration: (\{.*\})", text)
    config = json.loads(found.group(1)) if found else {}
    rates = [float(r) for r in re.findall(r"Epoch: \[0\] \[\s*\d+/\d+\].*?samples/s: ([0-9.]+)", text)]
    step_s = [batch / r for r in rates if r > 0]
    per_it = re.search(r"Epoch: \[0\] Total time: \S+ \(([0-9.]+) s / it\)", text)
    seen = bool(re.search({"hard": r"distillation: teacher .*, hard loss", "none": r"distillation: none"}
                          [run.distillation], text))
    backend, amp_on, steady = config.get("dist_backend"), bool(config.get("amp")) and cuda, step_s[1:] or step_s
    step_line = (f"{statistics.median(steady):.3f} s/step (median after the first), "
                 f"{float(per_it.group(1)):.3f} s/it over the epoch" if steady and per_it else "no step timings")
    amp_line = ("AMP on (fp16 autocast, GradScaler)" if amp_on else
                "AMP off (main_deploy.py autocasts on CUDA only)" if not cuda else "AMP OFF")
    summary = (f"{len(step_s)} steps at batch {batch} x {run.nproc} rank{'s' if run.nproc > 1 else ''}, "
               f"{step_line}; {amp_line}; backend {backend}; distillation {run.distillation} "
               f"{'seen' if seen else 'NOT SEEN'}; {took:.0f} s in all")
    checks = [(rc is not None, "timed out"), (rc in (0, None), f"exit status {rc}"),
              (bool(re.search(r"done: best top-1", text)), "no 'done' line"),
              (len(step_s) == steps, f"{len(step_s)} of {steps} steps logged"),
              (backend == ("nccl" if cuda else "gloo") and bool(config.get("distributed")),
               f"backend {backend!r}, distributed {config.get('distributed')}"),
              (config.get("world_size") == run.nproc, f"world size {config.get('world_size')}, expected {run.nproc}"),
              (amp_on or not cuda, "AMP was off"), (seen, f"no {run.distillation!r} distillation line")]
    return {"problems": [why for ok, why in checks if not ok], "summary": summary}


def deploy_run(args, cfg, timeout: float, run: DeployRun) -> dict:
    """`run` under `torchrun --nproc_per_node run.nproc` on a random ImageFolder, with the check's mask and
    random weights (prepared here, within `timeout`): {'problems', 'summary', 'details'}."""
    from models import arch_of, create_model

    student, batch, steps = cfg[run.student], cfg["train_batch"], cfg[run.steps]
    start, models = time.perf_counter(), {"student": student}
    if run.distillation != "none":
        models["teacher"] = cfg["teacher"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        make_image_folder(os.path.join(tmp, "data"), cfg["img"], train=batch * steps * run.nproc, val=batch)
        mask, _, mask_name = load_mask(cfg)
        mask.check_fits(arch_of(student))
        mask.save_json(os.path.join(tmp, "mask.json"))
        torch.manual_seed(0)  # random weights: the gated model the mask slices, and the teacher
        for role, name in models.items():
            torch.save(create_model(name, num_classes=2, img_size=cfg["img"]).state_dict(), f"{tmp}/{role}.pth")
        teacher = ["--teacher-model", cfg["teacher"], "--teacher-path", f"{tmp}/teacher.pth"] if len(models) > 1 else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(run.nproc), "--standalone",
               os.path.join(REPO, "main_deploy.py"), "--model", student + "_deploy", "--input-size", str(cfg["img"]),
               "--data-set", "IMNET", "--data-path", f"{tmp}/data", "--masked_model", f"{tmp}/mask.json",
               "--finetune", f"{tmp}/student.pth", *teacher, "--distillation-type", run.distillation,
               "--batch-size", str(batch), "--epochs", "1", "--warmup-epochs", "0", "--no-repeated-aug",
               "--no-model-ema", "--num_workers", str(cfg["workers"]), "--log_period", "1", "--device", args.device,
               "--amp", "--output_dir", ""]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        launched = time.perf_counter()
        rc, lines = run_streaming(cmd, timeout - (launched - start))
    got = training_result(lines, rc, torch.device(args.device).type == "cuda", run, batch, steps,
                          time.perf_counter() - launched)
    got["details"] = [f"- `torchrun --nproc_per_node {run.nproc} main_deploy.py` (command above in its output): "
                      f"`{student}_deploy` from `{mask_name}` ({mask.kept_counts()} kept), "
                      + (f"teacher `{cfg['teacher']}`" if teacher else "no teacher") + ", random weights, "
                      f"random {cfg['img']} px images: {got['summary']}"]
    if got["problems"]:
        got["details"].append("- output tail:\n\n```\n" + "\n".join(lines[-15:]) + "\n```")
    return got


def deploy_step(name: str) -> Callable:
    """The step of the main_deploy.py runs `DEPLOY_RUNS[name]`, one after the other within its budget."""
    def step(args, cfg, timeout: float) -> dict:
        runs, cuda = DEPLOY_RUNS[name], torch.device(args.device).type == "cuda"
        visible = torch.cuda.device_count() if cuda else 0
        if cuda and visible < max(r.nproc for r in runs):  # only two_ranks has more than one rank
            return {"status": f"skipped: {visible} GPU visible (two ranks need two)", "summary": ""}
        deadline, got = time.perf_counter() + timeout, []
        for k, run in enumerate(runs):
            got.append(deploy_run(args, cfg, (deadline - time.perf_counter()) / (len(runs) - k), run))
        problems = [p for r in got for p in r["problems"]]
        return {"status": "failed: " + "; ".join(problems) if problems else "passed",
                "summary": " / ".join(r["summary"] for r in got), "details": [d for r in got for d in r["details"]]}
    return step


def worker_deploy_speed(args, cfg) -> dict:
    """Inference img/s of the unpruned and the pruned deploy model, by bench_deploy_speed.py's timing."""
    from benchmarks.bench_deploy_speed import torch_infer_rate
    from models import build_deploy_model
    from pruning.flops import mask_macs

    device, (mask, arch, mask_name) = torch.device(args.device), load_mask(cfg)
    flops_ratio = mask_macs(arch)["total"] / mask_macs(arch, mask)["total"]
    torch.manual_seed(0)
    nets = {"unpruned": build_deploy_model(arch).eval().to(device),
            "pruned": build_deploy_model(arch, mask).eval().to(device)}
    cuda = device.type == "cuda"
    where, rows = torch.cuda.get_device_name(device) if cuda else "CPU", []
    for precision, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        for batch in cfg["speed_batches"]:
            images = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
            ips = {k: torch_infer_rate(net, images, cfg["warmup"], cfg["iters"], precision) for k, net in nets.items()}
            rows.append((where, label, batch, f"{ips['unpruned']:.1f}", f"{ips['pruned']:.1f}",
                         f"{ips['pruned'] / ips['unpruned']:.2f}x", f"{flops_ratio:.2f}x"))
    best = next(r for r in rows if r[1] == "bf16 autocast" and r[2] == max(cfg["speed_batches"]))
    summary = (f"{where}: speedup {', '.join(f'{r[5]} ({r[1]}, b{r[2]})' for r in rows)}; "
               f"FLOPs ratio {flops_ratio:.2f}x; pruned {best[4]} img/s at bf16, batch {best[2]}")
    details = [f"- `{cfg['model']}_deploy` unpruned vs pruned by `{mask_name}`, random weights, on {where}"
               + (f" (TF32 matmuls: {torch.backends.cuda.matmul.allow_tf32})" if cuda else "") + ": "
               f"`bench_deploy_speed.torch_infer_rate`, median of {cfg['iters']} calls after {cfg['warmup']} "
               f"({'CUDA events' if cuda else 'wall clock'}); bf16 = "
               f"`torch.autocast({device.type!r}, dtype=torch.bfloat16)`", ""]
    details += markdown_table(["device", "precision", "batch", "unpruned img/s", "pruned img/s", "speedup",
                               "FLOPs ratio"], rows)
    ok = all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    return {"status": "passed" if ok else "failed: a throughput was not positive", "summary": summary,
            "details": details}


def step_deploy_speed(args, cfg, timeout: float) -> dict:
    """`worker_deploy_speed` in this script's `--worker` process."""
    rc, lines, result = run_worker(__file__, ["--worker", "deploy_speed", "--device", args.device]
                                   + (["--tiny"] if args.tiny else []), timeout)
    return worker_failure(rc, lines, timeout) if result is None else result


def make_steps() -> Dict[str, Callable]:
    """The steps, in order: name -> `step(args, cfg, timeout) -> result`."""
    return {"cuda_tests": step_cuda_tests, "pruning_pass": step_pruning_pass,
            **{name: deploy_step(name) for name in DEPLOY_RUNS}, "deploy_speed": step_deploy_speed}


def render(args, cfg, results: Dict[str, dict], command: str, started: str, took: float) -> List[str]:
    """The markdown lines of the check: its environment, one table row per step, then each step's details."""
    rows = [[k, TITLES[name], "pending", "", ""] if name not in results else
            [k, TITLES[name], results[name]["status"], f"{results[name]['seconds']:.1f}",
             results[name].get("summary", "").replace("|", "\\|")] for k, name in enumerate(STEPS, 1)]
    lines = ["# GPU check", "", "Command:", "", f"    {command}", "",
             f"- date: {started}; took {took:.0f} s", f"- environment: {environment(args.device)}",
             f"- check: {'tiny (`' + cfg['model'] + '`, automatic on CPU)' if args.tiny else 'full (DeiT-B)'}; "
             "each step in its own process with its own time budget"
             + ("; the tiny check's timings only show that each path runs (tiny models, few calls: noisy)"
                if args.tiny else ""), ""]
    lines += markdown_table(["#", "step", "status", "seconds", "result"], rows)
    for k, name in enumerate(STEPS, 1):
        if results.get(name, {}).get("details"):
            lines += ["", f"## {k}. {TITLES[name]}", ""] + results[name]["details"]
    return lines


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = settings(args.tiny)
    if args.worker:
        atomic_write_json(worker_deploy_speed(args, cfg), args.result)
        return
    command = command_line(__file__, argv, os.environ.get("GPU_CHECK_LAUNCHER"))
    started, start = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    print(f"GPU check ({'tiny' if args.tiny else 'full'}) on {args.device}; table: {args.out}", flush=True)

    def lines(results):
        return render(args, cfg, results, command, started, time.monotonic() - start)

    steps = {name: functools.partial(step, args, cfg) for name, step in make_steps().items()}
    results = run_steps(steps, cfg["budgets"], TITLES, args.budget,
                        lambda got: write_report(lines(got), args.out, say=False))
    print("\n" + "\n".join(lines(results)) + f"\n\nwrote {args.out}")
    failed = [n for n, r in results.items() if r["status"].startswith("failed")]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
