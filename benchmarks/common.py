"""What the benchmarks share: the timing helper, the report writer, and the demo's runs (data flags,
the subprocess runner, pretraining) that the ablation and the interactions benchmark both start from.

Timing is not torch.utils.benchmark's `Timer`: it adds warm-up calls of its own (2 per `timeit`,
one or more per autorange) to calls that take seconds here and whose `--warmup`/`--iters` the
tables report, and it times a statement, not the phases inside one or a new batch per call. Kept
here: a fixed number of calls, timed by wall clock (after an accelerator sync, as `Timer`'s own
clock), by this thread's CPU time, or by CUDA events (calls back to back, no host sync between
them); and two models timed in alternating order (`paired`).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
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
    """Rates of two models measured alternately, A B then B A, so that a drifting machine slows both alike.

    Args:
        rate: {'unpruned': f, 'pruned': f}, f(warmup) -> rate of one round.
        rounds: alternating rounds.
        warmup: untimed calls before a model's first round (every round with `warm_every_round`).

    Returns:
        {'unpruned': [rate per round], 'pruned': [...], 'ratio': [pruned / unpruned per round]}.
    """
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


# --------------------------------------------------------------------------------------- the demo's runs

def data_flags(data_set: str = "DIGITS", data_path: str = "", input_size: int = 32,
               batch_size: int = 64) -> List[str]:
    """The demo's data and training flags (scripts/demo.sh), on the given data (default: the demo's)."""
    where = ["--data-path", os.path.abspath(data_path)] if data_set == "IMNET" else []
    return ["--data-set", data_set, *where, "--input-size", str(input_size), "--num_workers", "1",
            "--batch-size", str(batch_size), "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
            "--hflip", "0", "--drop-path", "0.05", "--log_period", "100"]


class Runner:
    """Runs the project's entry points as subprocesses, output to `{dir}/run.out`; skips finished steps."""

    def __init__(self, python: str):
        self.python = python
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
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
            rc = subprocess.call(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            with open(os.path.join(out_dir, "run.out")) as log:
                tail = log.read()[-3000:]
            raise UserError(f"{what} failed (exit {rc}); end of {out_dir}/run.out:\n{tail}")
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
