"""torch.distributed plumbing: joining the launcher's process group, rank helpers, barrier,
a sum all-reduce that also takes CPU tensors under nccl, and leaving the group."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from utils.errors import UserError


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


def init_distributed_mode(device: str, dist_url: str = "env://", local_rank: Optional[int] = None
                          ) -> DistributedConfig:
    """Join the process group described by the launcher's environment.

    torchrun and `torch.distributed.launch --use_env` set RANK, WORLD_SIZE and
    LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT for `--dist_url env://`); the old
    launcher without `--use_env` passes `--local-rank` instead of LOCAL_RANK.
    Without RANK/WORLD_SIZE the run is single-process. On CUDA the process is pinned to
    `cuda:{local_rank}` and uses nccl; on CPU, gloo.

    Args:
        device: `--device` (cuda, cuda:N or cpu).
        dist_url: `--dist_url`.
        local_rank: `--local-rank` of the old launcher (LOCAL_RANK wins when set).

    Raises:
        UserError: CUDA requested but absent, too few GPUs for the local rank,
            or the rendezvous variables missing.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return DistributedConfig(device=str(device))
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = env.get("LOCAL_RANK", local_rank)
    local = int(local) if local is not None else 0
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{device!r}: CUDA is not available on this machine (use <device> cpu)", field="device")
        if local >= torch.cuda.device_count():
            err = UserError(f"local rank {local} has no GPU: only {torch.cuda.device_count()} visible")
            err.rank_specific = True
            raise err
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    dist_url = dist_url or "env://"
    if dist_url.startswith("env://"):
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise UserError(f"env:// needs {' and '.join(missing)} in the environment (torchrun sets them)",
                            field="dist_url")
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank)
    barrier()
    return DistributedConfig(distributed=True, rank=rank, world_size=world_size, local_rank=local, backend=backend,
                             device=str(device))


def cleanup_distributed() -> None:
    """Leave the process group, if any (call at the end of a run)."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


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
