"""Run logs: the text logger (stdout + a timestamped file on rank 0), JSON-lines records, TensorBoard scalars."""
import json
import logging
import os
import sys
import time
from typing import Optional

import torch

from utils.distributed import get_rank, is_main_process, job_guard
from utils.errors import UserError


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
    guard = job_guard()
    if guard is not None:  # rank 0 logs which rank failed, and why
        guard.logger = logger
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
