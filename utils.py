"""Small shared helpers: user errors, atomic writes, process-level plumbing.

Kept free of heavy imports so that every module may depend on it.
"""
import functools
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable, List, Optional, Tuple

import torch


class UserError(Exception):
    """A problem with the user's input (flag, file, data): printed as one line, exit code 2.

    `rank_specific`: set on an error that only some ranks of a distributed run meet (all
    ranks print it then, not only rank 0).
    """

    rank_specific = False


def error_line(err: BaseException) -> str:
    """The one-line message of a `UserError`, also when a DataLoader worker raised it.

    A worker's exception reaches the main process re-created from a multi-line text
    ("Caught UserError in DataLoader worker process 0. Original Traceback ...
    utils.UserError: <message>"): the original message is its last line.
    """
    text = str(err).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1].strip()
    return re.sub(r"^(?:[\w.]*\.)?UserError: ", "", last)


def _launcher_rank() -> int:
    """This process's rank as the launcher (torchrun) set it; 0 without a launcher."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def cli_entry(main_fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap an entry point so that `UserError` becomes one clean line on stderr and exit 2.

    Under torchrun every rank usually meets the same error: only rank 0 prints it
    (other ranks exit 2 silently), unless the error is marked `rank_specific`.
    """

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        try:
            return main_fn(*args, **kwargs)
        except UserError as err:
            rank = _launcher_rank()
            if rank == 0:
                print(f"error: {error_line(err)}", file=sys.stderr, flush=True)
            elif getattr(err, "rank_specific", False):
                print(f"error (rank {rank}): {error_line(err)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temporary files of `_atomic_write`: ".tmp_{name}.{pid}.{random}.partial" beside the target,
# so that a later run can recognise (and remove) those left behind by a killed writer.
TEMP_PREFIX, TEMP_SUFFIX = ".tmp_", ".partial"
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]+{re.escape(TEMP_SUFFIX)}$")


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.{os.getpid()}.",
                               suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the data is on disk before the rename makes it the file at `path`
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        _fsync(directory)  # and the rename itself survives a crash
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(directory: str) -> List[Tuple[str, int]]:
    """Delete the temporary files that killed atomic writers left in `directory`.

    Only names of `_atomic_write`'s pattern whose writer process is gone (or is this
    process, which writes nothing yet when a run starts) are removed; anything else,
    and the files of a writer still running, stay. Call it on one rank only.

    Returns:
        (name, size in bytes) of each file removed.
    """
    removed = []
    if not directory or not os.path.isdir(directory):
        return removed
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        size = entry.stat(follow_symlinks=False).st_size
        try:
            os.remove(entry.path)
        except FileNotFoundError:  # gone meanwhile
            continue
        removed.append((entry.name, size))
    return removed


def refuse_to_clobber(output_dir: str, name: str, resuming: bool, overwrite: bool, how: str = "") -> None:
    """Refuse a run that would overwrite an earlier run's `name` in `output_dir` (unless resuming/--overwrite).

    Args:
        how: the script's way of continuing instead, e.g. "resume it with --auto_resume, ".
    """
    if not output_dir or resuming or overwrite:
        return
    if os.path.exists(os.path.join(output_dir, name)):
        raise UserError(f"--output_dir {output_dir!r} already holds {name} of an earlier run: {how}"
                        f"choose another --output_dir, or pass --overwrite to replace it")


def prepare_output_dir(output_dir: str, log: Callable[[str], None]) -> None:
    """Rank 0, at the start of a run: remove the temporary files of interrupted atomic writes, and say so."""
    if not output_dir or not is_main_process():
        return
    removed = remove_stale_temp_files(output_dir)
    if removed:
        log(f"removed {len(removed)} temporary file(s) left in {output_dir} by an interrupted write "
            f"({sum(size for _, size in removed)} bytes): "
            + ", ".join(f"{name} ({size} bytes)" for name, size in removed))


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` that never leaves a half-written file at `path`."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_write_pickle(obj: Any, path: str) -> None:
    import pickle

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)

    _atomic_write(path, write)


def atomic_write_json(obj: Any, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=1) + "\n", path)


def atomic_copy(src: str, dst: str) -> None:
    """Copy the file `src` to `dst` atomically (the bytes only, not the permissions)."""
    import shutil

    _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


TRUST_FLAG = "--trust_checkpoint"


def _pickle_globals(path: str) -> list:
    """The globals a pickle file names (read with pickletools: nothing in it is run)."""
    import pickletools

    found, recent, memo = [], [], {}  # recent: values pushed lately (str or None)
    with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and all(isinstance(v, str) for v in recent[-2:]) and len(recent) >= 2:
                found.append(f"{recent[-2]}.{recent[-1]}")
            if op.name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = recent[-1] if recent else None
            elif op.name not in ("PROTO", "FRAME", "STOP"):
                got = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else arg
                recent = (recent + [got if isinstance(got, str) else None])[-2:]
    return list(dict.fromkeys(found))


def _unsafe_globals(path: str) -> list:
    """Globals of a torch file that `torch.load(weights_only=True)` refuses (empty if none found)."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        names = _pickle_globals(path)
    except Exception:  # not a pickle at all: nothing to name
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # private helper gone: name every global
        allowed = set()
    return [n for n in names if n not in allowed]


def load_torch_file(path: str, what: str = "checkpoint", trust: bool = False) -> Any:
    """Load a torch file on CPU, turning a missing, unreadable or unsafe file into a `UserError`.

    Files are read with `torch.load(weights_only=True)`: tensors and plain Python values
    only, so a file from elsewhere cannot run code. A file that needs full unpickling (it
    names other globals, e.g. `argparse.Namespace`) is refused unless `trust` is set
    (`--trust_checkpoint`), which loads it with `weights_only=False`.
    """
    import pickle

    if not path or not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        unsafe = [] if trust else _unsafe_globals(path)
        if unsafe:
            raise UserError(f"{what} file {path!r} is refused: it needs the global {', '.join(unsafe[:3])}, and "
                            f"unpickling it could run code from the file; pass {TRUST_FLAG} to load it anyway if "
                            f"you trust its source") from None
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{what} file {path!r} is not a readable torch file (UnpicklingError: {reason})") from None
    except Exception as err:  # zip and torch errors all mean "not a checkpoint"
        raise UserError(f"{what} file {path!r} is not a readable torch file ({type(err).__name__}: {err})") from None


# what criteria/hessian pickles may name: numpy arrays, their dtypes and scalars (numpy 1 and 2 paths)
_NUMPY_PICKLE_GLOBALS = {
    (mod, name)
    for core in ("numpy.core", "numpy._core")
    for mod, name in ((f"{core}.multiarray", "_reconstruct"), (f"{core}.multiarray", "scalar"),
                      (f"{core}.numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def load_numpy_pickle(path: str) -> Any:
    """Unpickle a file that may hold numpy arrays (in lists, tuples, dicts) and nothing else.

    Any other global (a function, a class) is refused before it is called: a pickle from
    elsewhere cannot run code. Raises `UserError` naming the file and the refused global.
    """
    import pickle
    import warnings

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _NUMPY_PICKLE_GLOBALS:
                raise UserError(f"{path} is refused: it needs the global {module}.{name}, but this file may hold "
                                f"numpy arrays only (a pickle from elsewhere must not run code)")
            with warnings.catch_warnings():  # numpy 2 reading numpy 1's `numpy.core` names warns
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)

    with open(path, "rb") as f:
        return NumpyOnly(f).load()


def state_dict_of(checkpoint: Any, path: str = "") -> dict:
    """The state dict inside a checkpoint: the object itself or its 'model' / 'state_dict' entry."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                return checkpoint[key]
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise UserError(f"checkpoint {path!r} holds no state dict (expected a dict of tensors or {{'model': state_dict}})")


# ---------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------

def set_seed(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and every CUDA device).

    Args:
        seed: any non-negative integer; reduced modulo 2**32 for NumPy.
    """
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*keys: int) -> int:
    """A well-mixed 31-bit seed from integer keys, e.g. `derive_seed(seed, epoch, rank)`.

    Distinct key tuples give unrelated streams (NumPy's SeedSequence hashing), so
    reseeding per epoch makes an epoch's randomness independent of what ran before it.
    """
    import numpy as np

    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


# ---------------------------------------------------------------------------
# Distributed helpers (torchrun / torch.distributed.launch --use_env)
# ---------------------------------------------------------------------------

def is_dist_avail_and_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if is_dist_avail_and_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def init_distributed_mode(args) -> None:
    """Join the process group described by the launcher's environment.

    torchrun and `torch.distributed.launch --use_env` set RANK, WORLD_SIZE and
    LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT for `--dist_url env://`); the old
    launcher without `--use_env` passes `--local-rank` instead of LOCAL_RANK.
    Without RANK/WORLD_SIZE the run is single-process.

    Sets on `args`: `distributed` (bool), `rank`, `world_size`, `gpu` (local rank),
    `dist_backend` ('nccl' on CUDA, 'gloo' on CPU) and, on CUDA, pins
    `args.device` to `cuda:{local_rank}`.

    Args:
        args: namespace with `device`, `dist_url` and optionally `local_rank`.

    Raises:
        UserError: CUDA requested but absent, too few GPUs for the local rank,
            or the rendezvous variables missing.
    """
    import torch.distributed as dist

    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        args.dist_backend = None
        return
    args.rank = int(env["RANK"])
    args.world_size = int(env["WORLD_SIZE"])
    local_rank = env.get("LOCAL_RANK")
    if local_rank is None:
        local_rank = getattr(args, "local_rank", None)
    args.gpu = int(local_rank) if local_rank is not None else 0
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        if args.gpu >= torch.cuda.device_count():
            err = UserError(f"local rank {args.gpu} has no GPU: only {torch.cuda.device_count()} visible")
            err.rank_specific = True
            raise err
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
        args.dist_backend = "nccl"
    else:
        args.dist_backend = "gloo"
    dist_url = getattr(args, "dist_url", "env://") or "env://"
    if dist_url.startswith("env://"):
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise UserError(f"--dist_url env:// needs {' and '.join(missing)} in the environment (torchrun sets them)")
    dist.init_process_group(backend=args.dist_backend, init_method=dist_url,
                            world_size=args.world_size, rank=args.rank)
    args.distributed = True
    barrier()


def cleanup_distributed() -> None:
    """Leave the process group, if any (call at the end of a run)."""
    import torch.distributed as dist

    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` in place over all ranks and return it (unchanged when single-process).

    With the nccl backend a CPU tensor is reduced through the current GPU.
    """
    import torch.distributed as dist

    if not is_dist_avail_and_initialized():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def save_on_master(obj: Any, path: str) -> None:
    """`atomic_torch_save` on rank 0 only (other ranks do nothing)."""
    if is_main_process():
        atomic_torch_save(obj, path)


# ---------------------------------------------------------------------------
# Progress: smoothed meters and a metric logger with ETA, samples/s and memory
# ---------------------------------------------------------------------------

def _print_on_main(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


class SmoothedValue:
    """A series of values: window statistics (median, avg) and global average.

    Args:
        window_size: how many recent values the window statistics cover.
        fmt: format string using any of median, avg, global_avg, max, value.
    """

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        import collections

        self.deque = collections.deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Add `value`, which stands for `n` samples in the global average."""
        self.deque.append(float(value))
        self.count += n
        self.total += float(value) * n

    def synchronize_between_processes(self) -> None:
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        all_reduce_sum(t)
        self.count = int(t[0].item())
        self.total = float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def _batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size_of(next(iter(batch.values())))
    return 1


def _format_seconds(seconds: float) -> str:
    import datetime

    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class MetricLogger:
    """Named `SmoothedValue` meters and a progress-printing iterator (DeiT style).

    Args:
        delimiter: separator between fields of a progress line.
        print_fn: where lines go (e.g. `logger.info`); default prints on rank 0 only.
        device: the training device; peak CUDA memory is shown when it is a CUDA
            device (or, when None, whenever CUDA is available).
    """

    def __init__(self, delimiter: str = "  ", print_fn: Optional[Callable[[str], None]] = None,
                 device: Optional[torch.device] = None):
        import collections

        self.meters = collections.defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.print_fn = print_fn or _print_on_main
        if device is None:
            self.show_memory = torch.cuda.is_available()
        else:
            self.show_memory = torch.device(device).type == "cuda"

    def update(self, n: int = 1, **kwargs) -> None:
        """Record scalar values (floats, ints or 0-d tensors), each standing for `n` samples."""
        for name, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(value, n=n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, attr: str):
        meters = self.__dict__.get("meters")
        if meters is not None and attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__} has no attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable, print_freq: int, header: str = "", print_seconds: float = 30.0):
        """Yield from `iterable`, printing progress every `print_freq` iterations, at the end, and
        after any iteration that ends `print_seconds` or more after the previous line (or the start).

        A progress line shows `[i/N]`, the ETA, the meters, samples/s since the previous
        line, the mean iteration and data-loading times, and the
        peak CUDA memory (MB) when on CUDA. The timings are for display only.
        """
        import time

        print_freq = max(1, int(print_freq))
        total = len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = window_start = time.time()
        window_samples = 0
        mb = 1024.0 * 1024.0
        i = 0
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            window_samples += _batch_size_of(obj)
            now = time.time()
            iter_time.update(now - end)
            end = now
            if i % print_freq == 0 or i == total - 1 or now - window_start >= print_seconds:
                rate = window_samples / max(now - window_start, 1e-9)
                fields = [f"{header} [{i + 1:>{width}}/{total}]" if header else f"[{i + 1:>{width}}/{total}]",
                          f"eta: {_format_seconds(iter_time.global_avg * (total - i - 1))}"]
                fields += [f"{name}: {meter}" for name, meter in self.meters.items()]
                fields += [f"samples/s: {rate:.1f}", f"time: {iter_time}", f"data: {data_time}"]
                if self.show_memory:
                    fields.append(f"max mem: {torch.cuda.max_memory_allocated() / mb:.0f}MB")
                self.print_fn(self.delimiter.join(fields))
                window_start, window_samples = now, 0
        elapsed = time.time() - start
        count = i + 1 if total else 0
        self.print_fn(f"{header} Total time: {_format_seconds(elapsed)} ({elapsed / max(count, 1):.4f} s / it)")


# ---------------------------------------------------------------------------
# Logs: text log, JSON lines, TensorBoard
# ---------------------------------------------------------------------------

def setup_logging(output_dir: Optional[str], name: str = "savit", rank: Optional[int] = None):
    """A `logging.Logger` writing to stdout and, on rank 0, to `{output_dir}/{timestamp}.log`.

    Other ranks log warnings and errors only (to stdout). Calling it again replaces
    the handlers it installed, so tests and repeated runs do not duplicate lines.

    Args:
        output_dir: folder for the log file (created); empty or None for no file.
        name: logger name.
        rank: this process's rank; default `get_rank()`.

    Returns:
        The configured logger; the log file path (or None) is in `logger.log_file`.
    """
    import logging
    import time

    rank = get_rank() if rank is None else rank
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if getattr(handler, "_savit_handler", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter(f"[%(asctime)s {name}{'' if rank == 0 else f' rank{rank}'}] %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    stream._savit_handler = True
    logger.addHandler(stream)
    logger.log_file = None
    if rank == 0 and output_dir:
        try:
            os.makedirs(output_dir, exist_ok=True)
        except OSError as err:  # e.g. a file of that name: the entry points check this earlier
            raise UserError(f"cannot create the log folder {output_dir!r}: {err.strerror or err}") from None
        path = os.path.join(output_dir, time.strftime("%Y%m%d_%H%M%S", time.localtime()) + ".log")
        file_handler = logging.FileHandler(path, mode="a")
        file_handler.setFormatter(fmt)
        file_handler._savit_handler = True
        logger.addHandler(file_handler)
        logger.log_file = path
    return logger


def append_json_line(path: str, record: dict) -> None:
    """Append `record` as one JSON line to `path` (e.g. `{output_dir}/log.txt`), on rank 0 only."""
    if not is_main_process() or not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


class TensorboardLogger:
    """TensorBoard scalars under `{output_dir}/{subdir}`, written by rank 0 only.

    On other ranks, without an output dir, or without the `tensorboard` package,
    every method is a no-op.

    Args:
        output_dir: run folder; empty or None disables the logger.
        subdir: folder inside `output_dir` for the event files.
        enabled: override the rank-0 rule (default: `is_main_process()`).
    """

    def __init__(self, output_dir: Optional[str], subdir: str = "tensorboard", enabled: Optional[bool] = None):
        self.writer = None
        self.log_dir = os.path.join(output_dir, subdir) if output_dir else None
        if enabled is None:
            enabled = is_main_process()
        if enabled and self.log_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: logging is optional
                print("warning: tensorboard is not installed; no TensorBoard scalars", file=sys.stderr)
                return
            self.writer = SummaryWriter(log_dir=self.log_dir)

    def update(self, step: int, head: str = "train", **scalars) -> None:
        """Write `head/name = value` for each scalar at `step` (None values are skipped)."""
        if self.writer is None:
            return
        for name, value in scalars.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.writer.add_scalar(f"{head}/{name}", float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---------------------------------------------------------------------------
# The machine a number was measured on
# ---------------------------------------------------------------------------

def environment_line() -> str:
    """CPU model and vector extensions, cores, torch and timm versions: what the demo's numbers depend on."""
    import platform

    import timm

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{cpu} ({vector}), {os.cpu_count()} cores, torch {torch.__version__}, timm {timm.__version__}, "
            f"Python {platform.python_version()}")
