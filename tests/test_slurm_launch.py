"""SLURM launch: run_with_submitit.py (submitit) and the sbatch templates in scripts/slurm/, on the CPU.

* The launcher's bad flags: one line, exit 2, nothing submitted (in-process, fast).
* `Job.checkpoint()`: an unfinished job is requeued as a fresh copy, a finished one never (fast).
* `--local` (submitit's LocalExecutor, 2 tasks, gloo): a tiny fine-tune preempted mid-epoch (the
  signal SLURM would send, to both tasks) requeues, resumes from checkpoint.pth and ends bit for bit
  like an uninterrupted run of the same flags.
* The sbatch templates run as written under a stand-in `srun` that starts SLURM_NTASKS copies of the
  command with SLURM_PROCID / SLURM_LOCALID (the scripts detect the srun launch themselves), and a
  stand-in `scontrol` that records its arguments. The variables at the top of a template come from the
  environment and the tiny flags are appended (argparse keeps the last value): both listed below.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import run_with_submitit
from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FINETUNE = ["--model", "deit_test_patch8_32_deploy", "--data-set", "DIGITS", "--input-size", "32",
                 "--batch-size", "32", "--num_workers", "0", "--device", "cpu", "--warmup-epochs", "0",
                 "--cooldown-epochs", "0", "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
                 "--no-model-ema"]
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------
# Bad flags: one line, exit 2, before anything is submitted
# ---------------------------------------------------------------------------

BAD_FLAGS = {
    "no job dir": ([], "error: --job_dir is required"),
    "unknown flag": (["--job_dir", "{tmp}", "--bogus"], "error: unrecognized arguments: --bogus"),
    "script flag": (["--job_dir", "{tmp}", "--epochs", "0"], "error: --epochs must be >= 1"),
    "launcher flag": (["--job_dir", "{tmp}", "--ngpus", "0"], "error: --ngpus must be > 0"),
    "script": (["--job_dir", "{tmp}", "--script", "train"], "error: --script: expected finetune"),
    "prune flag": (["--job_dir", "{tmp}", "--script", "prune", "--pruning_method", "x"],
                   "error: --pruning_method"),
    "resume": (["--job_dir", "{tmp}", "--resume", "a.pth"], "error: --resume 'a.pth': run_with_submitit.py"),
    "local nodes": (["--job_dir", "{tmp}", "--local", "--nodes", "2"], "error: --nodes 2: --local runs"),
    "job dir is a file": (["--job_dir", "{tmp}/file"], "error: --job_dir"),
    "finished pruning": (["--job_dir", "{tmp}/done", "--script", "prune"], "error: --output_dir"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_fail_at_once_in_one_line(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint_pruned_00.pth").write_bytes(b"")

    def no_submission(*args, **kwargs):
        raise AssertionError("submitted despite a bad flag")

    monkeypatch.setattr(run_with_submitit, "make_executor", no_submission)
    argv, expected = BAD_FLAGS[case]
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expected), err
    assert sorted(os.listdir(tmp_path)) == ["done", "file"]  # nothing written


def test_without_submitit_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.main(["--job_dir", str(tmp_path / "job"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: run_with_submitit.py needs submitit: pip install submitit\n"
    assert not (tmp_path / "job").exists()


@pytest.mark.skipif(shutil.which("srun") is not None, reason="SLURM is installed here")
def test_no_slurm_here_one_line(tmp_path, capsys):
    pytest.importorskip("submitit")
    with pytest.raises(SystemExit) as exit_info:
        run_with_submitit.main(["--job_dir", str(tmp_path / "job"), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot submit to SLURM here") and "--local" in err


# ---------------------------------------------------------------------------
# Rendezvous variables and checkpoint(): requeue the unfinished, never the finished
# ---------------------------------------------------------------------------

def _job(tmp_path, argv=(), script="finetune", **kwargs):
    largs, ns, script_argv = run_with_submitit.parse(["--job_dir", str(tmp_path), "--script", script, *argv])
    return run_with_submitit.Job(largs.script, script_argv, ns, **kwargs)


def test_rendezvous_from_the_job_environment(tmp_path):
    env = types.SimpleNamespace(global_rank=9, num_tasks=16, local_rank=1, hostnames=["gpu07", "gpu08"],
                                job_id="123456")
    job = _job(tmp_path)
    assert job.argv[-3:] == ["--output_dir", str(tmp_path), "--auto_resume"] and job.ns.auto_resume
    assert job.rendezvous(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    local = _job(tmp_path, local=True, port=4321)
    assert local.rendezvous(env)["MASTER_ADDR"] == "127.0.0.1" and local.rendezvous(env)["MASTER_PORT"] == "4321"


def test_checkpoint_requeues_an_unfinished_job_only(tmp_path):
    submitit = pytest.importorskip("submitit")
    job = _job(tmp_path, ["--epochs", "3"])
    with open(tmp_path / "log.txt", "w") as f:
        f.write(json.dumps({"train_loss": 1.0, "epoch": 0}) + "\n" + json.dumps({"train_loss": 0.9, "epoch": 1}) + "\n")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    fresh = again.function
    assert fresh is not job and fresh.argv == job.argv and vars(fresh.ns) == vars(job.ns) and not fresh.returned
    with open(tmp_path / "log.txt", "a") as f:
        f.write(json.dumps({"train_loss": 0.8, "epoch": 2}) + "\n")
    assert job.checkpoint() is None  # the last epoch is in log.txt
    evaluation = _job(tmp_path, ["--eval"])
    assert evaluation.checkpoint() is not None  # nothing tells an evaluation is done until main returned
    evaluation.returned = True
    assert evaluation.checkpoint() is None

    out = tmp_path / "prune"
    out.mkdir()
    pruning = _job(out, script="prune")
    assert pruning.checkpoint() is not None  # no checkpoint yet: rerun from the start
    (out / "checkpoint_pruned_00.pth").write_bytes(b"")
    assert pruning.checkpoint() is None  # written by this job
    earlier = _job(out, ["--overwrite"], script="prune",
                   checkpoint_mtime=os.path.getmtime(out / "checkpoint_pruned_00.pth"))
    assert earlier.checkpoint() is not None  # --overwrite: the checkpoint there is an earlier run's


# ---------------------------------------------------------------------------
# --local: preempted mid-training, requeued, resumed == uninterrupted
# ---------------------------------------------------------------------------

def _children(pid: int) -> list:
    """Process ids whose parent is `pid` (the tasks of a local submitit job's controller)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(name))
    return found


def _wait(job, deadline: float) -> None:
    while not job.done():
        if time.time() > deadline:
            job.cancel()
            pytest.fail(f"job {job.job_id} still running; its log:\n{(job.stdout() or '')[-3000:]}")
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the tasks through /proc")
def test_local_job_preempted_requeues_and_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # the launcher extends it
    for name in RENDEZVOUS:
        monkeypatch.delenv(name, raising=False)
    flags = ["--local", "--ngpus", "2", "--timeout", "60", *TINY_FINETUNE, "--epochs", "3", "--log_period", "1"]
    full = run_with_submitit.main(["--job_dir", str(tmp_path / "full"), *flags])
    cut = run_with_submitit.main(["--job_dir", str(tmp_path / "cut"), *flags])
    printed = capsys.readouterr().out
    assert f"submitted job {cut.job_id} (main_deploy.py, 2 tasks on this machine); logs: " in printed
    deadline = time.time() + 240
    try:
        while "Epoch: [1]" not in (cut.paths.stdout.read_text() if cut.paths.stdout.exists() else ""):
            assert not cut.done() and time.time() < deadline, (cut.stdout() or "")[-3000:]
            time.sleep(0.02)
        tasks = _children(int(cut.job_id))
        assert len(tasks) == 2, tasks
        preempt = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]  # what SLURM sends every task
        for pid in tasks:
            os.kill(pid, preempt)
        _wait(cut, deadline)
        _wait(full, deadline)
    finally:
        for job in (full, cut):
            if not job.done():
                job.cancel()
    log = cut.stdout()
    assert "requeued: the next attempt resumes from" in log and "next epoch 1" in log, log[-3000:]
    assert full.results() == [None, None] and cut.results() == [None, None]
    a, b = _load(tmp_path / "full" / "checkpoint.pth"), _load(tmp_path / "cut" / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "optimizer", "lr_scheduler"):
        assert a[key].keys() == b[key].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert (tmp_path / "full" / "log.txt").read_text() == (tmp_path / "cut" / "log.txt").read_text()
    # the finished job, as submitit stored it for the requeue: never restarted
    stored = submitit.helpers.DelayedSubmission.load(cut.paths.submitted_pickle).function
    assert stored.checkpoint() is None


# ---------------------------------------------------------------------------
# The sbatch templates under stand-ins for srun and scontrol
# ---------------------------------------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: SLURM_NTASKS copies of the command (srun's own options dropped), one per task
echo "srun $*" >> "$FAKE_CALLS"
while [[ "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_CALLS"
"""
# the template variables for a tiny run, then the flags appended to its command line
# (the unpruned tiny model, random initial weights, no teacher: no files to make)
FINETUNE_VARS = {"MODEL": "deit_test_patch8_32_deploy", "EPOCHS": "1", "BATCH": "32", "WORKERS": "0"}
FINETUNE_FLAGS = ["--masked_model", "", "--distillation-type", "none", "--data-set", "DIGITS", "--input-size", "32",
                  "--device", "cpu", "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--no-model-ema"]
PRUNE_VARS = {"MODEL": "deit_test_patch8_32", "TARGET": "0.5", "BATCH": "16", "WORKERS": "0"}
PRUNE_FLAGS = ["--finetune", "", "--data-set", "DIGITS", "--input-size", "32", "--device", "cpu",
               "--pruning_feed_percent", "0.06"]


@pytest.fixture
def slurm(tmp_path):
    """The environment of a 2-task SLURM job on this machine, with srun and scontrol stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS and not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", PYTHON=sys.executable, FAKE_CALLS=str(tmp_path / "calls"),
               SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_SUBMIT_DIR=REPO, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


def _calls(env) -> list:
    path = env["FAKE_CALLS"]
    return open(path).read().splitlines() if os.path.exists(path) else []


def _sbatch(name: str, env: dict, flags, wait_for: str = "", timeout: float = 240):
    """Run scripts/slurm/{name} as sbatch would (bash, from the submit dir); with `wait_for`, send the
    script USR1 (SLURM's --signal=B:USR1) once that file exists. Returns (exit code, output)."""
    proc = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "slurm", name), *flags], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if wait_for:
            deadline = time.time() + timeout
            while not os.path.exists(wait_for) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, output


@pytest.mark.e2e
def test_finetune_sbatch_runs_two_tasks_and_requeues_on_usr1(tmp_path, slurm):
    out = tmp_path / "ft"
    env = dict(slurm, OUT=str(out), **FINETUNE_VARS)
    # USR1 while training: the template requeues the job (scontrol) and waits for srun to end
    code, output = _sbatch("finetune.sbatch", env, FINETUNE_FLAGS, wait_for=str(out / "tensorboard"))
    assert code == 0, output[-4000:]
    assert "USR1: time limit near: requeueing job 4242" in output, output[-4000:]
    calls = _calls(env)
    assert calls[0].startswith("srun --kill-on-bad-exit=1 ") and "--auto_resume" in calls[0]
    assert calls[1:] == ["scontrol requeue 4242"]
    checkpoint = _load(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["args"]["world_size"] == 2
    # the requeued job finds training finished: srun is not started again
    code, output = _sbatch("finetune.sbatch", dict(env, SLURM_RESTART_COUNT="1"), FINETUNE_FLAGS)
    assert code == 0 and "training has finished, nothing to do" in output, output
    assert len(_calls(env)) == 2


@pytest.mark.e2e
def test_prune_sbatch_runs_two_tasks_and_a_rerun_after_it_finished_does_nothing(tmp_path, slurm):
    out = tmp_path / "pruned"
    env = dict(slurm, OUT=str(out), **PRUNE_VARS)
    code, output = _sbatch("prune.sbatch", env, PRUNE_FLAGS)
    assert code == 0, output[-4000:]
    assert (out / "checkpoint_pruned_00.pth").is_file() and (out / "mask.json").is_file()
    assert _load(out / "checkpoint_pruned_00.pth")["args"]["world_size"] == 2
    assert len(_calls(env)) == 1
    code, output = _sbatch("prune.sbatch", dict(env, SLURM_RESTART_COUNT="1"), PRUNE_FLAGS)
    assert code == 0 and "pruning has finished, nothing to do" in output, output
    assert len(_calls(env)) == 1
