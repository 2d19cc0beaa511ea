"""torch.distributed plumbing: joining the launcher's process group (torchrun, launch, srun), rank
helpers, barrier, a sum all-reduce that also takes CPU tensors under nccl, the job's failure
watcher, and leaving the group."""
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from utils.errors import FAILURE_HOOKS, UserError
from utils.job_guard import BEAT_S, LOST_AFTER_S, JobGuard


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_dist_avail_and_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@dataclass(frozen=True)
class DistributedConfig:
    """The process group this process joined (or a single process)."""

    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: str = "cpu"  # pinned to cuda:{local_rank} on CUDA
    launcher: str = "none"  # what set the ranks: "env" (torchrun, launch --use_env, by hand), "slurm", "none"


DEFAULT_TIMEOUT_S = 1800  # torch's own default for gloo and nccl collectives


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as its launcher's environment says."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "env" or "slurm"
    master_addr: Optional[str] = None  # the rendezvous host and port, when the launcher implies them
    master_port: Optional[int] = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07"."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise UserError(f"SLURM node list {nodelist!r} is not of the form host[01-04,07],host2")
    name, ranges = head.group(1), head.group(2)
    return name + ranges.split(",")[0].split("-")[0] if ranges else name


def slurm_port(job_id: str) -> int:
    """The rendezvous port every task of SLURM job `job_id` derives alike (in 20000..39999)."""
    digits = re.sub(r"\D", "", job_id or "")
    return 20000 + int(digits) % 20000 if digits else 29500


def detect_launch(env: Mapping[str, str], local_rank_flag: Optional[int] = None) -> Optional[Launch]:
    """The launch this process belongs to, or None for a single process.

    torchrun and `torch.distributed.launch --use_env` set RANK, WORLD_SIZE and LOCAL_RANK
    (the old launcher without `--use_env` passes `--local-rank` instead of LOCAL_RANK). A task
    of `srun` has SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS) and SLURM_LOCALID and
    no RANK: it rendezvouses at MASTER_ADDR (default: the step's first node) and MASTER_PORT
    (default: a port derived from SLURM_JOB_ID, the same for every task).

    Raises:
        UserError: a SLURM task count > 1 without a node list or MASTER_ADDR to rendezvous at.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        local = env.get("LOCAL_RANK", local_rank_flag)
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(local) if local is not None else 0, "env")
    if "SLURM_PROCID" not in env:
        return None
    tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else None)
    if not addr:
        raise UserError(f"SLURM started {tasks} tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST says where "
                        f"they rendezvous; set MASTER_ADDR (and MASTER_PORT) or launch with torchrun")
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_port(env.get("SLURM_JOB_ID", ""))
    return Launch(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)), "slurm", addr, port)


def init_distributed_mode(device: str, dist_url: str = "env://", local_rank: Optional[int] = None,
                          timeout_s: float = DEFAULT_TIMEOUT_S, guard: bool = True) -> DistributedConfig:
    """Join the process group described by the launcher's environment (see `detect_launch`).

    Without a launcher the run is single-process (on `cuda:N` the process is pinned to GPU N).
    On CUDA each rank is pinned to `cuda:{local_rank}` and uses nccl; on CPU, gloo. With more
    than one process a `JobGuard` watches the job: one failing rank ends every rank.

    Args:
        device: `--device` (cuda, cuda:N or cpu).
        dist_url: `--dist_url`.
        local_rank: `--local-rank` of the old launcher (LOCAL_RANK wins when set).
        timeout_s: `--dist_timeout`, the collectives' timeout in seconds.
        guard: start the failure watcher (tests of the process group alone turn it off).

    Raises:
        UserError: CUDA requested but absent, too few GPUs for the local rank,
            or the rendezvous variables missing.
    """
    env = os.environ
    launch = detect_launch(env, local_rank)
    if launch is None:
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(device))  # cuda:1 alone: its kernels and memory readouts on GPU 1
        return DistributedConfig(device=str(device))
    dist_url = dist_url or "env://"
    if launch.launcher == "slurm" and dist_url.startswith("env://"):  # what torchrun would have set
        env.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size), LOCAL_RANK=str(launch.local_rank),
                   MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port))
    local, no_gpu = launch.local_rank, None
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{device!r}: CUDA is not available on this machine (use --device cpu)", field="device")
        if local >= torch.cuda.device_count():  # raised once the guard can tell the other ranks
            no_gpu = UserError(f"local rank {local} has no GPU: only {torch.cuda.device_count()} visible")
            no_gpu.rank_specific = True
        else:
            torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if dist_url.startswith("env://"):
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise UserError(f"env:// needs {' and '.join(missing)} in the environment (torchrun sets them)",
                            field="dist_url")
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=launch.world_size, rank=launch.rank,
                            timeout=timedelta(seconds=timeout_s))
    if guard:
        start_guard(dist_url, launch.rank, launch.world_size)
    if no_gpu is not None:
        raise no_gpu
    barrier()
    return DistributedConfig(distributed=True, rank=launch.rank, world_size=launch.world_size, local_rank=local,
                             backend=backend, device=str(device), launcher=launch.launcher)


def cleanup_distributed() -> None:
    """Leave the process group, if any (call at the end of a run that went well)."""
    global _guard
    if not is_dist_avail_and_initialized():
        return
    if _guard is not None:
        _guard.finishing()
        barrier()  # every rank is done: none needs the guard any more
        _guard.stop()
        FAILURE_HOOKS.remove(report_failure)
        _guard = None
    dist.destroy_process_group()


# -- one failing rank ends the job ---------------------------------------------------------------

_guard: Optional[JobGuard] = None


def _store_address(dist_url: str) -> Optional[Tuple[str, int]]:
    """(host, port) of the TCPStore behind `dist_url`, None for a file:// rendezvous."""
    if dist_url.startswith("env://"):
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    parsed = urlparse(dist_url)
    if parsed.scheme == "tcp" and parsed.hostname and parsed.port:
        return parsed.hostname, parsed.port
    return None


def start_guard(dist_url: str, rank: int, world_size: int) -> JobGuard:
    """Start this rank's `JobGuard` on the job's rendezvous store (see utils/job_guard.py)."""
    global _guard
    intervals = guard_intervals(os.environ)
    address = _store_address(dist_url)
    if address is not None:
        _guard = JobGuard.connect(*address, rank=rank, world_size=world_size, **intervals)
    else:  # file://: every process opens the same file
        _guard = JobGuard(dist.FileStore(urlparse(dist_url).path, world_size), rank, world_size, **intervals)
    _guard.start()
    FAILURE_HOOKS.append(report_failure)
    return _guard


GUARD_VARS = {"SAVIT_GUARD_BEAT_S": "beat_s", "SAVIT_GUARD_LOST_AFTER_S": "lost_after_s"}


def guard_intervals(environ: Mapping[str, str]) -> dict:
    """The guard's heartbeat period and lost-rank timeout from SAVIT_GUARD_BEAT_S / SAVIT_GUARD_LOST_AFTER_S,
    where set (the defaults are utils/job_guard.py's BEAT_S, LOST_AFTER_S)."""
    intervals = {}
    for var, name in GUARD_VARS.items():
        if environ.get(var, "") == "":
            continue
        try:
            intervals[name] = float(environ[var])
        except ValueError:
            intervals[name] = -1.0
        if not intervals[name] > 0:
            raise UserError(f"{var}={environ[var]!r}: expected a number of seconds > 0")
    beat, lost = intervals.get("beat_s", BEAT_S), intervals.get("lost_after_s", LOST_AFTER_S)
    if lost <= 2 * beat:
        raise UserError(f"SAVIT_GUARD_LOST_AFTER_S={lost:g} must be more than twice SAVIT_GUARD_BEAT_S={beat:g}")
    return intervals


def job_guard() -> Optional[JobGuard]:
    """This process's `JobGuard`, None in a single-process run."""
    return _guard


def _is_communication_error(err: BaseException) -> bool:
    """A collective that failed because a peer went away (its cause lies on another rank)."""
    dist_errors = tuple(getattr(dist, name) for name in ("DistError", "DistBackendError") if hasattr(dist, name))
    text = str(err)
    return isinstance(err, dist_errors) or (isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe")))


def report_failure(line: str, code: int, err: BaseException) -> None:
    """Publish this rank's failure to the job (a `utils.errors` failure hook).

    A collective that failed because a peer died is no cause of its own: wait until the guard
    has named the rank that went first (its own report, or a silent rank declared lost), and
    report this one only if none was named."""
    guard = _guard
    if guard is None:
        return
    if _is_communication_error(err):
        time.sleep(guard.lost_after_s + 3 * guard.beat_s)  # the watcher ends this process meanwhile
    if not guard.fail(line, code):
        time.sleep(guard.lost_after_s)  # the watcher is ending this process
    elif guard.rank != 0:
        guard.wait_until_logged(5 * guard.beat_s + 2)
    elif guard.logger is not None and code != 2:  # the scripts log their UserErrors themselves
        guard.logger.error(f"error: rank 0 failed: {line}")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks and return it (unchanged when single-process).

    With the nccl backend a CPU tensor is reduced through the current GPU.
    """
    if not is_dist_avail_and_initialized():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
