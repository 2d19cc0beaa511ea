"""Progress meters: `SmoothedValue` series, the `MetricLogger` progress iterator (ETA,
samples/s, CUDA memory), and the one ETA/duration formatter `format_seconds`."""
import collections
import math
import time
from typing import Any, Callable, Optional

import torch

from utils.distributed import all_reduce_sum, is_dist_avail_and_initialized, is_main_process


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


def format_seconds(seconds: float) -> str:
    """`H:MM:SS` (hours unbounded) of a duration or ETA, rounded to the second; 0:00:00 when negative or not finite."""
    seconds = int(round(seconds)) if math.isfinite(seconds) and seconds > 0 else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricLogger:
    """Named `SmoothedValue` meters and a progress-printing iterator (DeiT style).

    Args:
        delimiter: separator between fields of a progress line.
        print_fn: where lines go (e.g. `logger.info`); default prints on rank 0 only.
        device: the training device; its peak CUDA memory is shown when it is a CUDA
            device (or, when None, the current device's whenever CUDA is available).
    """

    def __init__(self, delimiter: str = "  ", print_fn: Optional[Callable[[str], None]] = None,
                 device: Optional[torch.device] = None):
        self.meters = collections.defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.print_fn = print_fn or _print_on_main
        self.device = None if device is None else torch.device(device)
        if self.device is None:
            self.show_memory = torch.cuda.is_available()
        else:
            self.show_memory = self.device.type == "cuda"

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
                          f"eta: {format_seconds(iter_time.global_avg * (total - i - 1))}"]
                fields += [f"{name}: {meter}" for name, meter in self.meters.items()]
                fields += [f"samples/s: {rate:.1f}", f"time: {iter_time}", f"data: {data_time}"]
                if self.show_memory:
                    fields.append(f"max mem: {torch.cuda.max_memory_allocated(self.device) / mb:.0f}MB")
                self.print_fn(self.delimiter.join(fields))
                window_start, window_samples = now, 0
        elapsed = time.time() - start
        count = i + 1 if total else 0
        self.print_fn(f"{header} Total time: {format_seconds(elapsed)} ({elapsed / max(count, 1):.4f} s / it)")
