"""One GPU check in six steps, each with its own time budget, written as a markdown table: a driver
over the tests, the benchmarks and main_deploy.py.

  1. cuda_tests      -- the tests that skip without CUDA (found in tests/ by their skipif), by node id;
  2. pruning_pass    -- benchmarks/bench_pruning_pass.py's pass ('ours': `PruningScorer`, method 2
                        with interactions, fp32, no scaler) of DeiT-B at batch 32 on random data:
                        s/batch and peak memory, next to the reference's 4.2 s/it and 18.7 GB on one GPU;
  3. deploy_training -- main_deploy.py under `torchrun --nproc_per_node 1` (nccl; gloo on CPU): DeiT-B
                        deploy from logs/masks' 50% mask (random weights), hard distillation from a
                        random DeiT-T, AMP, one epoch of a few batches of a random ImageFolder;
  4. distilled_student -- the same with the distilled DeiT-B (class and dist heads): no teacher (both
                        heads learn the labels), then hard distillation;
  5. two_ranks       -- step 3 under `torchrun --nproc_per_node 2` (nccl), when two GPUs are visible
                        (skipped otherwise; gloo on CPU);
  6. deploy_speed    -- inference images/s of the 50% deploy DeiT-B and of the unpruned one, batch 256
                        and 1, fp32 and bf16 autocast (benchmarks/bench_deploy_speed.py's timing:
                        CUDA events after warm-up).

Steps 2 and 6 run in a subprocess of this script (`--worker STEP`; step 1 is pytest, steps 3-5
torchrun), stopped when its budget is spent: a failing or hanging step still leaves the others' results. The table is
rewritten after every step. Exit status 1 when a step failed.

On CPU (or with --tiny) the same steps run on `deit_test_patch8_32` at batch 4, so that the
check can run in the test suite (tests/test_gpu_check.py).

    bash scripts/gpu_check.sh                 # GPU: logs/gpu_check.md
    python benchmarks/gpu_check.py --tiny     # any machine: output/gpu_check/gpu_check.md
"""
import argparse
import ast
import datetime
import glob
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks.common import command_line, environment, markdown_table, write_report  # noqa: E402
from utils import Parser, UserError, cli_entry  # noqa: E402

STEPS = ("cuda_tests", "pruning_pass", "deploy_training", "distilled_student", "two_ranks", "deploy_speed")
TITLES = {"cuda_tests": "CUDA-only tests", "pruning_pass": "pruning pass",
          "deploy_training": "deploy fine-tuning (torchrun, AMP, hard distillation)",
          "distilled_student": "distilled student (no teacher; hard distillation)",
          "two_ranks": "two ranks (torchrun --nproc_per_node 2)",
          "deploy_speed": "deploy speed, pruned vs unpruned"}
REFERENCE_PASS = (4.2, 18.7)  # the reference's pruning pass of DeiT-B at batch 32: s/it, GB, one GPU
TOTAL_BUDGET_S = 450  # GPU: under the shell script's `timeout 480`


def settings(tiny: bool) -> dict:
    """Models, batches and budgets (seconds) of the full (DeiT-B) or the tiny check."""
    if tiny:
        return dict(model="deit_test_patch8_32", distilled="deit_test_distilled_patch8_32",
                    teacher="deit_test_patch8_32_deploy", img=32, mask=None,
                    prune_batch=4, prune_batches=2, train_batch=4, train_steps=3, workers=0,
                    speed_batches=(4, 1), warmup=1, iters=3,
                    budgets=dict(cuda_tests=120, pruning_pass=120, deploy_training=150, distilled_student=240,
                                 two_ranks=150, deploy_speed=120))
    # the distilled student's two runs and the two-rank run take 3 steps each, the rest as before
    return dict(model="deit_base_patch16_224", distilled="deit_base_distilled_patch16_224",
                teacher="deit_tiny_patch16_224_deploy", img=224,
                mask=os.path.join(REPO, "logs", "masks", "deit_base_patch16_224_0.5.json"),
                prune_batch=32, prune_batches=3, train_batch=32, train_steps=5, extra_steps=3, workers=4,
                speed_batches=(256, 1), warmup=5, iters=20,
                budgets=dict(cuda_tests=60, pruning_pass=60, deploy_training=90, distilled_student=120,
                             two_ranks=60, deploy_speed=60))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description="GPU check: CUDA tests, pruning pass, deploy training and speed.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda[:N] or cpu (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="deit_test_patch8_32 at batch 4 (automatic on CPU)")
    p.add_argument("--out", default="", help="markdown file (default: logs/gpu_check.md for the full check on "
                                             "CUDA, else output/gpu_check/gpu_check.md)")
    p.add_argument("--budget", type=float, default=0,
                   help=f"seconds for the whole check (default: {TOTAL_BUDGET_S} for the full check, else none)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        raise UserError(f"--device: expected cuda[:N] or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    args.tiny = args.tiny or device.type == "cpu"
    if args.budget < 0:
        raise UserError(f"--budget must be >= 0 seconds, got {args.budget}")
    if not args.budget and not args.tiny:
        args.budget = TOTAL_BUDGET_S
    if not args.out:
        full_gpu = device.type == "cuda" and not args.tiny
        args.out = os.path.join(REPO, "logs", "gpu_check.md") if full_gpu else \
            os.path.join(REPO, "output", "gpu_check", "gpu_check.md")
    return args


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

class Stopped(BaseException):
    """SIGTERM reached the check (e.g. the shell script's `timeout`): stop, report what ran."""


def _raise_stopped(signum, frame) -> None:
    raise Stopped()


def stop_process(proc: subprocess.Popen, group: bool, grace: float = 10.0) -> None:
    """SIGTERM (to its process group with `group`; torchrun passes it on to its workers), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_streaming(cmd: List[str], timeout: float, prefix: str = "    | ", new_session: bool = True,
                  env: Optional[dict] = None) -> Tuple[Optional[int], List[str]]:
    """Run `cmd` from the repository root, echoing its output as it comes; stop it (and, with
    `new_session`, its process group) after `timeout` s or when this process is stopped.
    Returns (exit status, or None on timeout; its output lines)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)
    lines: List[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(prefix + lines[-1], flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc: Optional[int] = None
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            stop_process(proc, new_session)
        reader.join(timeout=5)
    return rc, lines


def child_env() -> dict:
    """This environment, unbuffered and without a surrounding torchrun's rendezvous variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


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


def half_mask(arch):
    """The tiny check's mask: one head fewer and every other MLP neuron kept in each block."""
    from models.mask import PruneMask

    mask = PruneMask.full(arch)
    mask.heads = [list(range(arch.num_heads - 1)) for _ in range(arch.depth)]
    mask.mlp = [list(range(0, arch.mlp_hidden, 2)) for _ in range(arch.depth)]
    return mask


def load_mask(cfg: dict):
    """The check's 50% mask (logs/masks for DeiT-B; `half_mask` for the tiny model) and its arch."""
    from models import arch_of
    from models.mask import PruneMask

    arch = arch_of(cfg["model"])
    if cfg["mask"] is None:
        return half_mask(arch), arch
    mask = PruneMask.load(cfg["mask"])
    mask.check_fits(arch)
    return mask, arch


# ---------------------------------------------------------------------------------------------
# steps; each returns {"status": "passed" | "failed: why" | "skipped: why", "summary": str, "details": [lines]}
# ---------------------------------------------------------------------------------------------

def step_cuda_tests(args, cfg, timeout: float) -> dict:
    if torch.device(args.device).type != "cuda":
        return {"status": "skipped: no CUDA", "summary": "the CUDA-only tests need a GPU"}
    ids = cuda_test_ids()
    if not ids:
        return {"status": "failed: no CUDA-only test found in tests/", "summary": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids]
    rc, lines = run_streaming(cmd, timeout, env=child_env())
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", "\n".join(lines[-5:]))}
    summary = f"`python -m pytest -q {' '.join(ids)}`: " + (", ".join(f"{n} {k}" for k, n in counts.items())
                                                            or "no summary line")
    if rc is None:
        return {"status": f"failed: timed out after {timeout:.0f} s", "summary": summary}
    ok = rc == 0 and counts.get("passed", 0) > 0 and set(counts) == {"passed"}
    return {"status": "passed" if ok else f"failed: pytest exit status {rc}", "summary": summary}


def worker_pruning_pass(args, cfg) -> dict:
    """bench_pruning_pass.py's 'ours' variant on the check's model, batch and device."""
    from benchmarks import bench_pruning_pass

    batch, warmup = cfg["prune_batch"], 1
    got = bench_pruning_pass.measure(bench_pruning_pass.parse_args(
        ["--model", cfg["model"], "--input-size", str(cfg["img"]), "--batch-size", str(batch),
         "--batches", str(cfg["prune_batches"]), "--warmup", str(warmup), "--device", args.device,
         "--worker", "ours"]))
    finite = all(bool(torch.isfinite(torch.tensor(v)).all()) for v in [*got["criteria"].values(), got["C"]])
    s_per_batch = statistics.median(got["times"])
    if "peak_cuda_mb" in got:
        peak_gb = got["peak_cuda_mb"] / 2 ** 10
        memory = (f"peak {peak_gb:.2f} GB allocated (torch.cuda.max_memory_allocated), "
                  f"{got['reserved_cuda_mb'] / 2 ** 10:.2f} GB reserved")
    else:
        peak_gb = got["peak_rss_mb"] / 2 ** 10
        memory = f"peak RSS {peak_gb:.2f} GB (whole process)"
    summary = f"{s_per_batch:.3f} s/batch, {memory}"
    if not args.tiny:
        ref_s, ref_gb = REFERENCE_PASS
        summary += (f"; reference: {ref_s} s/it, {ref_gb} GB (ours: {s_per_batch / ref_s:.2f}x the time, "
                    f"{peak_gb / ref_gb:.2f}x the memory)")
    details = [f"- model `{cfg['model']}` at {cfg['img']}, batch {batch}, random images and labels, "
               f"{len(got['times'])} timed batches after {warmup} warm-up (median)",
               "- `benchmarks/bench_pruning_pass.py` variant 'ours' (`pruning.scoring.PruningScorer`): method 2 "
               "with the interaction matrix C, gates-only gradients, criteria in fp32 (autocast off), no loss scaler",
               f"- {summary}",
               f"- criteria and C finite: {finite}"]
    return {"status": "passed" if finite else "failed: non-finite criteria or C", "summary": summary,
            "details": details}


def make_image_folder(root: str, img: int, train: int, val: int, classes: int = 2) -> None:
    """A random-noise ImageFolder tree: root/{train,val}/class_k/*.jpg."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for i in range(n):
            folder = os.path.join(root, split, f"class_{i % classes}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (img, img, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i}.jpg"), quality=90)


def parse_training_log(lines: List[str], batch: int) -> dict:
    """What main_deploy.py's stdout says: configuration, distillation, per-step times, completion."""
    text = "\n".join(lines)
    config = {}
    m = re.search(r"configuration: (\{.*\})", text)
    if m:
        config = json.loads(m.group(1))
    step_rates = [float(r) for r in re.findall(r"Epoch: \[0\] \[\s*\d+/\d+\].*?samples/s: ([0-9.]+)", text)]
    per_it = re.search(r"Epoch: \[0\] Total time: \S+ \(([0-9.]+) s / it\)", text)
    return {"config": config, "hard_distillation": bool(re.search(r"distillation: teacher .*, hard loss", text)),
            "no_teacher": bool(re.search(r"distillation: none", text)),
            "step_s": [batch / r for r in step_rates if r > 0],
            "s_per_it": float(per_it.group(1)) if per_it else None,
            "finished": bool(re.search(r"done: best top-1", text))}


def deploy_run(args, cfg, timeout: float, *, student: str, distillation: str = "hard", nproc: int = 1,
               steps: int = 0) -> dict:
    """One main_deploy.py run under `torchrun --nproc_per_node nproc`: data, mask and random weights are
    prepared here (seconds). Returns {'problems', 'summary', 'details', 'lines'}."""
    from models import arch_of, create_model

    device = torch.device(args.device)
    batch, steps = cfg["train_batch"], steps or cfg["train_steps"]
    prepared = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        make_image_folder(os.path.join(tmp, "data"), cfg["img"], train=batch * steps * nproc, val=batch)
        mask, _ = load_mask(cfg)
        mask.check_fits(arch_of(student))
        mask_path = os.path.join(tmp, "mask.json")
        mask.save_json(mask_path)
        torch.manual_seed(0)  # random weights: the gated model the mask slices, and the teacher
        torch.save(create_model(student, num_classes=2, img_size=cfg["img"]).state_dict(),
                   os.path.join(tmp, "student.pth"))
        teacher = []
        if distillation != "none":
            torch.save(create_model(cfg["teacher"], num_classes=2, img_size=cfg["img"]).state_dict(),
                       os.path.join(tmp, "teacher.pth"))
            teacher = ["--teacher-model", cfg["teacher"], "--teacher-path", os.path.join(tmp, "teacher.pth")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               os.path.join(REPO, "main_deploy.py"), "--model", student + "_deploy",
               "--input-size", str(cfg["img"]), "--data-set", "IMNET", "--data-path", os.path.join(tmp, "data"),
               "--masked_model", mask_path, "--finetune", os.path.join(tmp, "student.pth"), *teacher,
               "--distillation-type", distillation, "--batch-size", str(batch), "--epochs", "1",
               "--warmup-epochs", "0", "--no-repeated-aug", "--no-model-ema", "--num_workers", str(cfg["workers"]),
               "--log_period", "1", "--device", args.device, "--amp", "--output_dir", ""]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        start = time.perf_counter()
        rc, lines = run_streaming(cmd, timeout - (time.perf_counter() - prepared), env=child_env())
        took = time.perf_counter() - start
    got = parse_training_log(lines, batch)
    config, cuda = got["config"], device.type == "cuda"
    backend = config.get("dist_backend")
    amp_on = bool(config.get("amp")) and cuda
    steady = got["step_s"][1:] or got["step_s"]
    step_line = (f"{statistics.median(steady):.3f} s/step (median after the first), "
                 f"{got['s_per_it']:.3f} s/it over the epoch" if steady and got["s_per_it"] else "no step timings")
    amp_line = ("AMP on (fp16 autocast, GradScaler)" if amp_on else
                "AMP off (main_deploy.py autocasts on CUDA only)" if not cuda else "AMP OFF")
    seen = {"hard": got["hard_distillation"], "none": got["no_teacher"]}.get(distillation, False)
    summary = (f"{len(got['step_s'])} steps at batch {batch} x {nproc} rank{'s' if nproc > 1 else ''}, {step_line}; "
               f"{amp_line}; backend {backend}; distillation {distillation} {'seen' if seen else 'NOT SEEN'}; "
               f"{took:.0f} s in all")
    problems = []
    if rc is None:
        problems.append("timed out")
    elif rc != 0:
        problems.append(f"exit status {rc}")
    if not got["finished"]:
        problems.append("no 'done' line")
    if len(got["step_s"]) != steps:
        problems.append(f"{len(got['step_s'])} of {steps} steps logged")
    if backend != ("nccl" if cuda else "gloo") or not config.get("distributed"):
        problems.append(f"backend {backend!r}, distributed {config.get('distributed')}")
    if config.get("world_size") != nproc:
        problems.append(f"world size {config.get('world_size')}, expected {nproc}")
    if cuda and not amp_on:
        problems.append("AMP was off")
    if not seen:
        problems.append(f"no {distillation!r} distillation line")
    details = [f"- student `{student}_deploy` from the mask "
               f"`{os.path.relpath(cfg['mask'], REPO) if cfg['mask'] else 'half_mask (tiny)'}` "
               f"({mask.kept_counts()} kept), random weights; "
               + (f"teacher `{cfg['teacher']}`, random weights" if teacher else "no teacher"),
               f"- random ImageFolder: {batch * steps * nproc} training and {batch} validation images at "
               f"{cfg['img']} px, 2 classes; one epoch (DeiT augmentation, mixup/cutmix), then evaluation",
               f"- command: `torchrun --nproc_per_node {nproc} --standalone main_deploy.py ...` (above in the run's "
               "output)",
               f"- {summary}"]
    if problems:
        details.append("- output tail:\n\n```\n" + "\n".join(lines[-15:]) + "\n```")
    return {"problems": problems, "summary": summary, "details": details}


def _as_step(runs: List[dict]) -> dict:
    problems = [p for r in runs for p in r["problems"]]
    return {"status": "passed" if not problems else "failed: " + "; ".join(problems),
            "summary": " / ".join(r["summary"] for r in runs), "details": [d for r in runs for d in r["details"]]}


def step_deploy_training(args, cfg, timeout: float) -> dict:
    """The non-distilled student with hard distillation, one rank."""
    return _as_step([deploy_run(args, cfg, timeout, student=cfg["model"])])


def step_distilled_student(args, cfg, timeout: float) -> dict:
    """The distilled student (class and dist heads): without a teacher, then with hard distillation."""
    deadline = time.perf_counter() + timeout
    steps = cfg.get("extra_steps", cfg["train_steps"])
    first = deploy_run(args, cfg, timeout / 2, student=cfg["distilled"], distillation="none", steps=steps)
    second = deploy_run(args, cfg, deadline - time.perf_counter(), student=cfg["distilled"], steps=steps)
    return _as_step([first, second])


def step_two_ranks(args, cfg, timeout: float) -> dict:
    """Two ranks (nccl on CUDA, gloo on CPU) with hard distillation; needs two visible GPUs on CUDA."""
    visible = torch.cuda.device_count() if torch.device(args.device).type == "cuda" else 0
    if torch.device(args.device).type == "cuda" and visible < 2:
        return {"status": f"skipped: {visible} GPU visible (two ranks need two)", "summary": ""}
    return _as_step([deploy_run(args, cfg, timeout, student=cfg["model"], nproc=2,
                                steps=cfg.get("extra_steps", cfg["train_steps"]))])


def worker_deploy_speed(args, cfg) -> dict:
    """Inference img/s of the unpruned and the pruned deploy model, by bench_deploy_speed.py's timing."""
    from benchmarks.bench_deploy_speed import torch_infer_rate
    from models import build_deploy_model
    from pruning.flops import mask_macs

    device = torch.device(args.device)
    mask, arch = load_mask(cfg)
    flops_ratio = mask_macs(arch)["total"] / mask_macs(arch, mask)["total"]
    torch.manual_seed(0)
    nets = {"unpruned": build_deploy_model(arch).eval().to(device),
            "pruned": build_deploy_model(arch, mask).eval().to(device)}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    rows = []
    for precision, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        for batch in cfg["speed_batches"]:
            images = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
            ips = {name: torch_infer_rate(net, images, cfg["warmup"], cfg["iters"], precision)
                   for name, net in nets.items()}
            rows.append((where, label, batch, f"{ips['unpruned']:.1f}", f"{ips['pruned']:.1f}",
                         f"{ips['pruned'] / ips['unpruned']:.2f}x", f"{flops_ratio:.2f}x"))
            print(f"{where}, {label}, batch {batch}: unpruned {rows[-1][3]} img/s, pruned {rows[-1][4]} img/s, "
                  f"speedup {rows[-1][5]} (FLOPs ratio {flops_ratio:.2f}x)", flush=True)
    ok = all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    best = next(r for r in rows if r[1] == "bf16 autocast" and r[2] == max(cfg["speed_batches"]))
    summary = (f"{where}: speedup {', '.join(f'{r[5]} ({r[1]}, b{r[2]})' for r in rows)}; "
               f"FLOPs ratio {flops_ratio:.2f}x; pruned {best[4]} img/s at bf16, batch {best[2]}")
    clock = "CUDA events" if device.type == "cuda" else "wall clock"
    details = [f"- `{cfg['model']}_deploy` unpruned vs pruned by "
               f"`{os.path.relpath(cfg['mask'], REPO) if cfg['mask'] else 'half_mask (tiny)'}`, random weights, "
               f"input {arch.img_size} px; on {where}" + (f" (fp32 matmuls with TF32: {tf32})" if device.type == "cuda"
                                                           else ""),
               f"- inference (`torch.inference_mode`, `bench_deploy_speed.torch_infer_rate`), {cfg['warmup']} warm-up "
               f"calls, median of {cfg['iters']} timed calls ({clock}); bf16 autocast = "
               f"`torch.autocast({device.type!r}, dtype=torch.bfloat16)`", ""]
    details += markdown_table(["device", "precision", "batch", "unpruned img/s", "pruned img/s", "speedup",
                               "FLOPs ratio"], rows)
    return {"status": "passed" if ok else "failed: a throughput was not positive", "summary": summary,
            "details": details}


WORKERS: Dict[str, Callable] = {"pruning_pass": worker_pruning_pass, "deploy_speed": worker_deploy_speed}


def step_in_worker(name: str) -> Callable:
    """A step that runs `--worker name` in a subprocess and reads its JSON result."""
    def run(args, cfg, timeout: float) -> dict:
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            result = os.path.join(tmp, "result.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--result", result,
                   "--device", args.device] + (["--tiny"] if args.tiny else [])
            rc, lines = run_streaming(cmd, timeout, env=child_env())
            if rc is None:
                return {"status": f"failed: timed out after {timeout:.0f} s", "summary": "",
                        "details": ["```", *lines[-10:], "```"]}
            if rc != 0 or not os.path.isfile(result):
                return {"status": f"failed: exit status {rc}", "summary": lines[-1] if lines else "",
                        "details": ["```", *lines[-15:], "```"]}
            with open(result) as f:
                return json.load(f)
    return run


def make_steps() -> Dict[str, Callable]:
    """The steps, in order: name -> `step(args, cfg, timeout) -> result`."""
    return {"cuda_tests": step_cuda_tests, "pruning_pass": step_in_worker("pruning_pass"),
            "deploy_training": step_deploy_training, "distilled_student": step_distilled_student,
            "two_ranks": step_two_ranks, "deploy_speed": step_in_worker("deploy_speed")}


# ---------------------------------------------------------------------------------------------
# the run and its table
# ---------------------------------------------------------------------------------------------

def run_steps(args, cfg, steps: Dict[str, Callable], on_result: Callable[[Dict[str, dict]], None]) -> Dict[str, dict]:
    """Run every step within its budget and the run's (`args.budget`, 0: none); a step's exception,
    timeout or failure is recorded and the next step runs. `on_result` sees the results so far."""
    deadline = time.monotonic() + args.budget if args.budget else float("inf")
    results: Dict[str, dict] = {}
    stopped = ""
    for k, (name, step) in enumerate(steps.items(), 1):
        timeout = min(cfg["budgets"][name], deadline - time.monotonic())
        print(f"\n== step {k}/{len(steps)}: {TITLES[name]} (budget {timeout:.0f} s) ==", flush=True)
        start = time.monotonic()
        if stopped:
            result = {"status": f"failed: not run, {stopped}", "summary": ""}
        elif timeout < 10:
            result = {"status": f"failed: not run, the check's {args.budget:.0f} s budget was spent", "summary": ""}
        else:
            try:
                result = step(args, cfg, timeout)
            except Stopped:
                stopped = "the check was stopped (SIGTERM)"
                result = {"status": f"failed: {stopped}", "summary": ""}
            except Exception as err:  # noqa: BLE001 -- a step's failure must not stop the others
                result = {"status": f"failed: {type(err).__name__}: {err}", "summary": ""}
        result["seconds"] = time.monotonic() - start
        results[name] = result
        summary = f": {result['summary']}" if result.get("summary") else ""
        print(f"-> {result['status']} ({result['seconds']:.1f} s){summary}", flush=True)
        on_result(results)
    return results


def render(args, cfg, results: Dict[str, dict], command: str, started: str, took: float) -> List[str]:
    """The markdown lines of the check: its environment, one table row per step, then each step's details."""
    rows = []
    for k, name in enumerate(STEPS, 1):
        r = results.get(name)
        rows.append([k, TITLES[name], "pending", "", ""] if r is None else
                    [k, TITLES[name], r["status"], f"{r['seconds']:.1f}", r.get("summary", "").replace("|", "\\|")])
    lines = ["# GPU check", "", "Command:", "", f"    {command}", "",
             f"- date: {started}; took {took:.0f} s",
             f"- environment: {environment(args.device)}",
             f"- check: {'tiny (`' + cfg['model'] + '`, automatic on CPU)' if args.tiny else 'full (DeiT-B)'}; "
             "each step in its own process with its own time budget"
             + ("; the tiny check's timings only show that each path runs (tiny models, few calls: noisy)"
                if args.tiny else ""), ""]
    lines += markdown_table(["#", "step", "status", "seconds", "result"], rows)
    for k, name in enumerate(STEPS, 1):
        if results.get(name, {}).get("details"):
            lines += ["", f"## {k}. {TITLES[name]}", ""] + results[name]["details"]
    return lines


def worker_main(args) -> None:
    cfg = settings(args.tiny)
    result = WORKERS[args.worker](args, cfg)
    with open(args.result, "w") as f:
        json.dump(result, f)


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    cfg = settings(args.tiny)
    command = command_line(__file__, argv, os.environ.get("GPU_CHECK_LAUNCHER"))
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    start = time.monotonic()
    print(f"GPU check ({'tiny' if args.tiny else 'full'}) on {args.device}; table: {args.out}", flush=True)

    def write(results):
        write_report(render(args, cfg, results, command, started, time.monotonic() - start), args.out, say=False)

    signal.signal(signal.SIGTERM, _raise_stopped)
    results = run_steps(args, cfg, make_steps(), write)
    print("\n" + "\n".join(render(args, cfg, results, command, started, time.monotonic() - start)) + "\n")
    print(f"wrote {args.out}")
    failed = [n for n, r in results.items() if r["status"].startswith("failed")]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
