"""One failing rank ends the whole job, quickly, with one line (utils/job_guard.py).

Two CPU processes (gloo), started by torchrun or by hand with RANK/WORLD_SIZE/MASTER_* or
SLURM_* set, as `srun` does (no launcher agent: nothing but the guard stops the survivor). A
wrapper injects a fault on rank 1 (an exception at batch k of the pruning pass, an exception
or SIGKILL in epoch 1 of training) and shortens the guard's intervals. Each test checks that
every process has exited within the bound, with a non-zero code, that rank 0's log names
rank 1 and its error in one line, and (training) that epoch 0's checkpoint.pth is intact and
resumes.

The fast tests check the pieces in one process: SLURM's variables, node lists and ports;
the guard's heartbeat verdict and its first-failure-wins record on a real TCPStore.
"""
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from conftest import free_port
from utils import UserError
from utils.distributed import detect_launch, first_host, guard_intervals, slurm_port
from utils.job_guard import JobGuard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND_S = 60.0  # fault -> last process gone
# the jobs' guard beats every BEAT_S, declares a rank silent for LOST_AFTER_S lost (utils/job_guard.py: 1 s, 20 s)
BEAT_S, LOST_AFTER_S = 0.5, 4.0
DATA = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu", "--num_workers", "0"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_JOB_ID")

# runs main.py or main_deploy.py, with a fault on FAULT_RANK: "raise" or "kill" when the pruning pass
# reaches batch FAULT_BATCH (main.py) or at the FAULT_AT_CALL-th training step (main_deploy.py, in epoch
# FAULT_EPOCH)
WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import torch.distributed as dist

kind, script = os.environ["FAULT"], sys.argv.pop(1)


def fault(where):
    if dist.get_rank() != int(os.environ["FAULT_RANK"]):
        return
    with open(os.environ["FAULT_STAMP"], "w") as f:
        f.write(str(time.time()))
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError("injected fault " + where)


if script == "main.py":
    import main as entry
    import pruning.scoring as scoring
    real_score = scoring.PruningScorer.score_batch

    def score_batch(self, images, targets, batch_index):
        if batch_index == int(os.environ["FAULT_BATCH"]):
            fault("at batch " + str(batch_index))
        return real_score(self, images, targets, batch_index)

    scoring.PruningScorer.score_batch = score_batch
else:
    import main_deploy as entry
    import losses
    real_forward, calls = losses.DistillationLoss.forward, [0]

    def forward(self, *args):
        calls[0] += 1
        if calls[0] == int(os.environ["FAULT_AT_CALL"]):
            fault("in epoch " + os.environ["FAULT_EPOCH"])
        return real_forward(self, *args)

    losses.DistillationLoss.forward = forward
entry.main(entry.get_args_parser().parse_args())
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SAVIT_GUARD_BEAT_S=str(BEAT_S),
               SAVIT_GUARD_LOST_AFTER_S=str(LOST_AFTER_S), **extra)
    return env


def _start(cmd, env, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _launch(tmp_path, how, script, flags, fault_env):
    """Start the job: one torchrun, or two processes by hand ("env": RANK/..., "slurm": SLURM_*)."""
    wrapper = tmp_path / "faulty.py"
    wrapper.write_text(WRAPPER.format(repo=REPO))
    port = free_port()
    if how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(wrapper), script, *flags]
        return [_start(cmd, _env(**fault_env), tmp_path / "launcher.log")]
    procs = []
    for rank in range(2):
        if how == "env":
            launch = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        else:  # what srun sets: no RANK, no MASTER_ADDR (the first node of the list is the host)
            launch = dict(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                          SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(port), MASTER_PORT=str(port))
        procs.append(_start([sys.executable, str(wrapper), script, *flags], _env(**launch, **fault_env),
                            tmp_path / f"rank{rank}.log"))
    return procs


def _wait_all(procs, stamp, timeout=240.0):
    """(exit codes, seconds from the fault to the last exit); kills what is left after `timeout`."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    ended = time.time()
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert os.path.exists(stamp), "the fault was never injected"
    with open(stamp) as f:
        return [p.returncode for p in procs], ended - float(f.read())


def _rank0_log_file(out) -> str:
    (name,) = [n for n in os.listdir(out) if re.fullmatch(r"\d{8}_\d{6}\.log", n)]
    with open(os.path.join(out, name)) as f:
        return f.read()


def _check_ended(tmp_path, procs, out, expected_line):
    codes, seconds = _wait_all(procs, tmp_path / "stamp")
    print(f"fault -> last exit: {seconds:.1f} s, exit codes {codes}")
    assert seconds < BOUND_S, seconds
    assert all(code != 0 for code in codes), codes
    lines = [line for line in _rank0_log_file(out).splitlines() if "error: rank 1" in line]
    assert len(lines) == 1 and re.search(expected_line, lines[0]), lines
    return seconds


# ---------------------------------------------------------------------------
# the pruning pass
# ---------------------------------------------------------------------------

# no launcher agent: the guard alone ends the job (under torchrun, the agent's stop and rank 1's wait
# for rank 0's line are the same as in test_exception_in_training_...[torchrun])
@pytest.mark.e2e
def test_exception_in_the_pruning_pass_ends_every_rank(tmp_path):
    out = tmp_path / "prune"
    flags = ["--model", "deit_test_patch8_32", *DATA, "--batch-size", "16", "--pruning_feed_percent", "0.2",
             "--need_hessian", "--pruning_flops_percentage", "0.5", "--log_period", "1", "--output_dir", str(out)]
    # rank 1 scores the odd global batches: it fails at its third
    procs = _launch(tmp_path, "env", "main.py", flags,
                    dict(FAULT="raise", FAULT_RANK="1", FAULT_BATCH="5", FAULT_STAMP=str(tmp_path / "stamp")))
    _check_ended(tmp_path, procs, out, r"error: rank 1 failed: RuntimeError: injected fault at batch 5")
    assert not os.path.exists(out / "checkpoint_pruned_00.pth")  # nothing written


# ---------------------------------------------------------------------------
# training: an exception, and a rank killed, in epoch 1
# ---------------------------------------------------------------------------

def _train_flags(out, epochs=2):
    return ["--model", "deit_test_patch8_32_deploy", *DATA, "--batch-size", "64", "--epochs", str(epochs),
            "--warmup-epochs", "0", "--cooldown-epochs", "0", "--aa", "", "--reprob", "0", "--mixup", "0",
            "--cutmix", "0", "--no-model-ema", "--log_period", "2", "--output_dir", str(out)]


def _train_fault(tmp_path, kind):
    # 1280 training images an epoch (RASampler) in batches of 64 over 2 ranks: 10 steps; fail at step 3 of epoch 1
    return dict(FAULT=kind, FAULT_RANK="1", FAULT_EPOCH="1", FAULT_AT_CALL="13", FAULT_STAMP=str(tmp_path / "stamp"))


def _check_checkpoint_resumes(out, monkeypatch, capsys):
    """Epoch 0's checkpoint.pth is whole, and a one-process --auto_resume run (in this process) finishes from it."""
    import main_deploy

    checkpoint = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0
    assert not [n for n in os.listdir(out) if n.startswith(".") or n.endswith(".tmp")], os.listdir(out)
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    main_deploy.main(main_deploy.get_args_parser().parse_args([*_train_flags(out), "--auto_resume"]))
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 1


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["torchrun", "slurm"])
def test_exception_in_training_ends_every_rank_and_the_checkpoint_resumes(tmp_path, how, monkeypatch, capsys):
    out = tmp_path / "train"
    procs = _launch(tmp_path, how, "main_deploy.py", _train_flags(out), _train_fault(tmp_path, "raise"))
    _check_ended(tmp_path, procs, out, r"error: rank 1 failed: RuntimeError: injected fault in epoch 1")
    _check_checkpoint_resumes(out, monkeypatch, capsys)


# no launcher agent: the guard names the silent rank (torchrun's agent stops a job whose worker died, as
# when the worker exits with an error: test_exception_in_training_...[torchrun])
@pytest.mark.e2e
def test_a_rank_killed_in_training_ends_the_job(tmp_path, monkeypatch, capsys):
    out = tmp_path / "train"
    procs = _launch(tmp_path, "env", "main_deploy.py", _train_flags(out), _train_fault(tmp_path, "kill"))
    _check_ended(tmp_path, procs, out, rf"rank 1 has not answered for {LOST_AFTER_S:.0f} s")
    _check_checkpoint_resumes(out, monkeypatch, capsys)


# ---------------------------------------------------------------------------
# the pieces, in one process
# ---------------------------------------------------------------------------

def test_slurm_node_lists_and_ports():
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("node12,node13") == "node12"
    assert first_host("a-b[3]") == "a-b3"
    assert slurm_port("123456") == slurm_port("123456") == 20000 + 123456 % 20000
    assert 20000 <= slurm_port("987654321") < 40000


def test_detect_launch_reads_torchrun_then_slurm():
    assert detect_launch({}) is None
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 8, 1, "env")
    assert detect_launch({"RANK": "0", "WORLD_SIZE": "2"}, local_rank_flag=1).local_rank == 1  # launch, no --use_env
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "n[4-5]",
            "SLURM_JOB_ID": "777"}
    launch = detect_launch(srun)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (5, 16, 5, "slurm")
    assert (launch.master_addr, launch.master_port) == ("n4", slurm_port("777"))
    # the step's own task count and node list win over the job's; MASTER_* win over both
    step = detect_launch({**srun, "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "m1"})
    assert (step.world_size, step.master_addr) == (2, "m1")
    given = detect_launch({**srun, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (given.master_addr, given.master_port) == ("10.0.0.1", 1234)
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None  # one task: a single process


def test_slurm_tasks_without_a_rendezvous_are_an_error_not_silent_copies():
    with pytest.raises(UserError, match="SLURM started 4 tasks but neither MASTER_ADDR"):
        detect_launch({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"})


@pytest.fixture
def store():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    yield server, port


def test_guard_first_failure_wins_and_ends_the_others(store):
    server, port = store
    exits = {}
    guards = [JobGuard.connect("127.0.0.1", port, rank, 3, beat_s=0.05, lost_after_s=5.0,
                               exit_fn=lambda code, rank=rank: exits.setdefault(rank, code)) for rank in range(3)]
    for guard in guards[1:]:
        guard.start()
    assert guards[2].fail("ValueError: first", 1)
    assert guards[0].fail("ValueError: second", 7)  # published too late to count
    assert guards[0].first_failure() == (2, 1, "ValueError: first")
    assert not guards[0].fail("ValueError: third", 7)  # one report per process
    deadline = time.time() + 5
    while 1 not in exits and time.time() < deadline:
        time.sleep(0.02)
    assert exits.get(1) == 1  # rank 1's watcher saw rank 2's failure: it leaves with rank 2's code
    assert 2 not in exits  # the failing rank leaves through its own exception
    for guard in guards:
        guard.stop()


def test_guard_rank0_declares_a_silent_rank_lost(store):
    server, port = store
    exits = {}
    rank0 = JobGuard.connect("127.0.0.1", port, 0, 2, beat_s=0.05, lost_after_s=0.5,
                             exit_fn=lambda code: exits.setdefault(0, code))
    server.add("savit_job_guard/beat/1", 1)  # rank 1 beat once, then went silent
    start = time.time()
    rank0.start()
    while 0 not in exits and time.time() - start < 5:
        time.sleep(0.02)
    assert exits.get(0) == 1 and 0.5 <= time.time() - start < 2.0
    assert rank0.first_failure()[2].startswith("rank 1 has not answered")
    rank0.stop()


def test_guard_leaves_when_the_store_is_gone_unless_finishing():
    for finishing, expected in ((False, {1: 1}), (True, {})):
        port = free_port()
        server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10),
                               wait_for_workers=False)
        exits = {}
        guard = JobGuard.connect("127.0.0.1", port, 1, 2, beat_s=0.05,
                                 exit_fn=lambda code: exits.setdefault(1, code)).start()
        if finishing:
            guard.finishing()
        del server  # rank 0 (the store's host) is gone
        deadline = time.time() + 1.0
        while not exits and time.time() < deadline:  # finishing: a whole second without leaving
            time.sleep(0.02)
        assert exits == expected
        guard.stop()


def test_guard_intervals_come_from_the_environment():
    assert guard_intervals({}) == {}
    assert guard_intervals({"SAVIT_GUARD_BEAT_S": "2", "SAVIT_GUARD_LOST_AFTER_S": "60"}) == dict(
        beat_s=2.0, lost_after_s=60.0)
    for env, named in (({"SAVIT_GUARD_BEAT_S": "soon"}, "SAVIT_GUARD_BEAT_S='soon'"),
                       ({"SAVIT_GUARD_LOST_AFTER_S": "0"}, "SAVIT_GUARD_LOST_AFTER_S='0'"),
                       ({"SAVIT_GUARD_BEAT_S": "15"}, "SAVIT_GUARD_LOST_AFTER_S=20 must be more than twice")):
        with pytest.raises(UserError, match=re.escape(named)):
            guard_intervals(env)
