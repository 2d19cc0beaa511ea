"""What the benchmarks share: timing, reports, flag checks, subprocesses (streamed, under a time budget)
and the demo's runs (data flags, pretraining) that the ablation and the interactions benchmark start from.

Timing is not torch.utils.benchmark's `Timer`: that adds warm-up calls of its own (2 per `timeit`, more
per autorange) to calls that take seconds here and whose `--warmup`/`--iters` the tables report, and it
times a statement, not the phases inside one. Kept here: a fixed number of calls, timed by wall clock
(after an accelerator sync, as `Timer`'s clock), by this thread's CPU time, or by CUDA events; and two
models timed in alternating order (`paired`).
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils import UserError, atomic_write_text, environment_line  # noqa: E402

DEMO_MODEL = "deit_demo_patch8_32"


# --------------------------------------------------------------------------------------- timing

def synced_clock() -> float:
    """perf_counter seconds once CUDA's queued work is done (torch.utils.benchmark's clock; importing that
    module logs a cpp_extension warning on stderr where CUDA is installed without a GPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


CLOCKS = {"wall": synced_clock, "cpu": time.thread_time}


def call_seconds(fn: Callable[[], Any], iters: int, warmup: int = 0, clock: str = "wall",
                 device: Optional[torch.device] = None) -> List[float]:
    """Seconds of each of `iters` calls of `fn()` after `warmup` untimed ones.

    On a CUDA `device`: CUDA events on the current stream. Otherwise `clock`: 'wall' (synchronised
    wall time) or 'cpu' (this thread's CPU time, which other processes do not disturb).
    """
    for _ in range(warmup):
        fn()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        stream = torch.cuda.current_stream(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record(stream)
            fn()
            end.record(stream)
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    now = CLOCKS[clock]
    seconds = []
    for _ in range(iters):
        start = now()
        fn()
        seconds.append(now() - start)
    return seconds


def timed(fn: Callable[[], Any]) -> Tuple[Any, float, float]:
    """`fn()`, and the synchronised wall seconds and this process's CPU seconds it took."""
    wall, cpu = synced_clock(), time.process_time()
    out = fn()
    return out, synced_clock() - wall, time.process_time() - cpu


def paired(rate: Dict[str, Callable[[int], float]], rounds: int, warmup: int,
           warm_every_round: bool = False) -> Dict[str, List[float]]:
    """Rates of two models, `rate` = {'unpruned': f, 'pruned': f} with f(warmup) -> the rate of one round,
    measured alternately for `rounds` rounds (A B, then B A: a drifting machine slows both alike), `warmup`
    untimed calls before a model's first round (every round with `warm_every_round`). Returns
    {'unpruned': [rate per round], 'pruned': [...], 'ratio': [pruned / unpruned per round]}."""
    out: Dict[str, List[float]] = {"unpruned": [], "pruned": []}
    for r in range(rounds):
        for name in (("unpruned", "pruned") if r % 2 == 0 else ("pruned", "unpruned")):
            out[name].append(rate[name](warmup if (r == 0 or warm_every_round) else 0))
    out["ratio"] = [p / u for p, u in zip(out["pruned"], out["unpruned"])]
    return out


# --------------------------------------------------------------------------------------- reports

def command_line(script: str, argv: Optional[Sequence[str]] = None, launcher: Optional[str] = None) -> str:
    """The command that ran: `launcher` (default: python and `script` relative to the repository root),
    then `argv` (default: sys.argv[1:]), quoted for a shell."""
    path = os.path.abspath(script)
    launcher = launcher or "python " + (os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else script)
    return " ".join([launcher] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])


def environment(device: Any = "cpu") -> str:
    """`utils.environment_line()`, the CUDA torch was built for and the GPU of `device` (or none)."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (no CUDA)"
    return f"{environment_line()}; torch built for CUDA {torch.version.cuda}; GPU: {gpu}"


def markdown_row(cells: Sequence[Any]) -> str:
    """One line of a markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """The lines of a markdown table: the header, its rule, the rows."""
    return [markdown_row(header), "|" + "---|" * len(header)] + [markdown_row(r) for r in rows]


def write_report(lines: Sequence[str], path: str, say: bool = True) -> None:
    """Write the markdown `lines` to `path` atomically (temporary file, then rename)."""
    atomic_write_text("\n".join(lines) + "\n", path)
    if say:
        print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------------------- flags

def parse_device(text: str, available: bool = True) -> torch.device:
    """`--device` as cpu or cuda[:N]; with `available`, CUDA must be there."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: expected cpu or cuda[:N], got {text!r}")
    if available and device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
    return device


def int_list(text: str, flag: str, least: int = 1, empty: bool = False) -> List[int]:
    """Comma-separated integers, each >= `least` (none at all only with `empty`)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = None
    if values is None or (not values and not empty) or any(v < least for v in values):
        raise UserError(f"{flag}: expected comma-separated integers >= {least}, got {text!r}")
    return values


def check_minimums(args: Any, minimums: Dict[str, float]) -> None:
    """A UserError naming the first flag ({'--flag': least value}) whose value in `args` is smaller."""
    for flag, low in minimums.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value < low:
            raise UserError(f"{flag} must be >= {low:g}, got {value}")


# ------------------------------------------------------------------------- subprocesses and the demo's runs

def data_flags(data_set: str = "DIGITS", data_path: str = "", input_size: int = 32,
               batch_size: int = 64) -> List[str]:
    """The demo's data and training flags (scripts/demo.sh), on the given data (default: the demo's)."""
    where = ["--data-path", os.path.abspath(data_path)] if data_set == "IMNET" else []
    return ["--data-set", data_set, *where, "--input-size", str(input_size), "--num_workers", "1",
            "--batch-size", str(batch_size), "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
            "--hflip", "0", "--drop-path", "0.05", "--log_period", "100"]


class Stopped(BaseException):
    """SIGTERM reached this process (e.g. a shell's `timeout`): stop, report what ran."""


def raise_stopped(signum, frame) -> None:
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


def child_env(**extra: str) -> dict:
    """This environment, unbuffered, without a surrounding torchrun's rendezvous variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, PYTHONUNBUFFERED="1", **extra)


def run_streaming(cmd: List[str], timeout: Optional[float] = None, echo: Optional[Callable[[str], None]] = None,
                  new_session: bool = True, env: Optional[dict] = None) -> Tuple[Optional[int], List[str]]:
    """Run `cmd` from the repository root, each output line to `echo` as it comes (default: printed,
    indented); stop it (with `new_session`, its process group) after `timeout` s or when this
    process is interrupted. Returns (exit status, or None on timeout; its output lines)."""
    echo = echo or (lambda line: print("    | " + line, flush=True))
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env() if env is None else env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
    lines: List[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            echo(lines[-1])

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rc: Optional[int] = None
    try:
        rc = proc.wait(timeout=None if timeout is None else max(timeout, 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            stop_process(proc, new_session)
        reader.join(timeout=5)
    return rc, lines


def run_worker(script: str, argv: Sequence[str], timeout: Optional[float] = None,
               echo: Optional[Callable[[str], None]] = None) -> Tuple[Optional[int], List[str], Optional[Any]]:
    """`python script argv --result FILE` (`run_streaming`); returns (exit status, output lines, the JSON
    the worker wrote to FILE, or None)."""
    with tempfile.TemporaryDirectory(prefix="bench_worker_") as tmp:
        result = os.path.join(tmp, "result.json")
        rc, lines = run_streaming([sys.executable, os.path.abspath(script), *argv, "--result", result], timeout, echo)
        if rc != 0 or not os.path.isfile(result):
            return rc, lines, None
        with open(result) as f:
            return rc, lines, json.load(f)


def run_steps(steps: Dict[str, Callable[[float], dict]], budgets: Dict[str, float], titles: Dict[str, str],
              total: float, on_result: Callable[[Dict[str, dict]], None]) -> Dict[str, dict]:
    """Run each `step(timeout) -> {'status', 'summary', ...}` in turn within its budget and the check's
    `total` seconds (0: none), adding its 'seconds'; an exception or SIGTERM is recorded as a failure (after
    SIGTERM no further step runs) and `on_result` sees the results so far after each step."""
    signal.signal(signal.SIGTERM, raise_stopped)
    deadline = time.monotonic() + total if total else float("inf")
    results: Dict[str, dict] = {}
    stopped = ""
    for k, (name, step) in enumerate(steps.items(), 1):
        timeout = min(budgets[name], deadline - time.monotonic())
        print(f"\n== step {k}/{len(steps)}: {titles[name]} (budget {timeout:.0f} s) ==", flush=True)
        start = time.monotonic()
        if stopped:
            result = {"status": f"failed: not run, {stopped}", "summary": ""}
        elif timeout < 10:
            result = {"status": f"failed: not run, the check's {total:.0f} s budget was spent", "summary": ""}
        else:
            try:
                result = step(timeout)
            except Stopped:
                stopped = "the check was stopped (SIGTERM)"
                result = {"status": f"failed: {stopped}", "summary": ""}
            except Exception as err:  # noqa: BLE001 -- a step's failure must not stop the others
                result = {"status": f"failed: {type(err).__name__}: {err}", "summary": ""}
        results[name] = dict(result, seconds=time.monotonic() - start)
        summary = f": {result['summary']}" if result.get("summary") else ""
        print(f"-> {result['status']} ({results[name]['seconds']:.1f} s){summary}", flush=True)
        on_result(results)
    return results


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


class Runner:
    """Runs the project's entry points as subprocesses, output to `{dir}/run.out`; skips finished steps."""

    def __init__(self, python: str):
        self.python = python
        self.env = child_env(OMP_NUM_THREADS="1")
        self.start = time.time()
        self.reused = 0  # steps found finished and skipped
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        elapsed = int(time.time() - self.start)
        print(f"[ablation {elapsed // 60:3d}:{elapsed % 60:02d}] {message}", flush=True)

    def run(self, script: str, flags: List[str], out_dir: str, done: bool, what: str) -> None:
        """Run `python script flags --output_dir out_dir` unless `done`; an unfinished folder is emptied first."""
        if done:
            self.say(f"{what}: done already ({out_dir})")
            with self._lock:
                self.reused += 1
            return
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # a partial run of ours (log.txt would be appended to)
        os.makedirs(out_dir)
        cmd = [self.python, script, *flags, "--output_dir", out_dir]
        self.say(f"{what}: {' '.join(shlex.quote(c) for c in cmd[1:])}")
        t0 = time.time()
        with open(os.path.join(out_dir, "run.out"), "w") as log:
            # the same process group: an interrupt of the benchmark reaches the run too
            rc, lines = run_streaming(cmd, echo=lambda line: log.write(line + "\n"), new_session=False, env=self.env)
        if rc != 0:
            print("\n".join(lines[-20:]), flush=True)
            raise UserError(f"{what} failed (exit {rc}); the end of its output is above, all of it in {out_dir}/run.out")
        self.say(f"{what}: finished in {time.time() - t0:.0f} s")


def epochs_logged(out_dir: str) -> List[dict]:
    """The epochs main_deploy.py logged in `{out_dir}/log.txt` (none when it has not run)."""
    path = os.path.join(out_dir, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain(runner: Runner, pretrained: str, epochs: int, output_dir: str, model: str = DEMO_MODEL,
             flags: Sequence[str] = ()) -> str:
    """The demo's step 1 (main_deploy.py, no mask) unless `pretrained` exists; returns the checkpoint path.

    `pretrained`: the file (trained into its folder when missing and named best_checkpoint.pth), or ""
    for {output_dir}/pretrain; `flags`: the data flags (default: the demo's)."""
    if pretrained and os.path.isfile(pretrained):
        return os.path.abspath(pretrained)
    if pretrained and os.path.basename(pretrained) != "best_checkpoint.pth":
        raise UserError(f"--pretrained: file not found: {pretrained!r} (a missing file is trained only when it "
                        f"is a main_deploy.py best_checkpoint.pth)")
    out = os.path.dirname(os.path.abspath(pretrained)) if pretrained else os.path.join(output_dir, "pretrain")
    ckpt = os.path.join(out, "best_checkpoint.pth")
    if pretrained:
        runner.say(f"--pretrained {pretrained} does not exist yet: training it (the demo's step 1)")
    train = ["--model", f"{model}_deploy", *(flags or data_flags()), "--epochs", str(epochs),
             "--lr", "1.6e-2", "--warmup-epochs", "3", "--cooldown-epochs", "0"]
    done = os.path.isfile(ckpt) and len(epochs_logged(out)) == epochs
    runner.run("main_deploy.py", train, out, done, f"pretrain {model} ({epochs} epochs)")
    return ckpt
