"""Small shared helpers: user errors, atomic writes, process-level plumbing.

Kept free of heavy imports so that every module may depend on it.
"""
import functools
import json
import os
import sys
import tempfile
from typing import Any, Callable

import torch


class UserError(Exception):
    """A problem with the user's input (flag, file, data): printed as one line, exit code 2."""


def cli_entry(main_fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap an entry point so that `UserError` becomes one clean line on stderr and exit 2."""

    @functools.wraps(main_fn)
    def wrapper(*args, **kwargs):
        try:
            return main_fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` that never leaves a half-written file at `path`."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic_write(path, write)


def atomic_write_json(obj: Any, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=1) + "\n", path)


def load_torch_file(path: str, what: str = "checkpoint") -> Any:
    """Load a torch file on CPU, turning a missing or unreadable file into a `UserError`."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise UserError(f"{what} file {path!r} is not a readable torch file ({type(err).__name__}: {err})")


def state_dict_of(checkpoint: Any, path: str = "") -> dict:
    """The state dict inside a checkpoint: the object itself or its 'model' / 'state_dict' entry."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                return checkpoint[key]
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise UserError(f"checkpoint {path!r} holds no state dict (expected a dict of tensors or {{'model': state_dict}})")
