"""Loading files from elsewhere without running their code: torch files (`weights_only`
unless `trust`, the `trust_checkpoint` field), numpy-only pickles, and the state dict inside a checkpoint."""
import os
import pickle
import pickletools
import warnings
import zipfile
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from utils.errors import UserError


def _pickle_globals(path: str) -> list:
    """The globals a pickle file names (read with pickletools: nothing in it is run).

    For raw pickles: torch's `get_unsafe_globals_in_checkpoint` reads zip checkpoints only, and its
    scanner stops at protocol-4 opcodes (FRAME, STACK_GLOBAL)."""
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
    try:
        if zipfile.is_zipfile(path):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        names = _pickle_globals(path)
    except Exception:  # not a pickle, or torch < 2.5 (no get_unsafe_globals_in_checkpoint): nothing to name
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except ImportError:  # private helper gone: name every global
        allowed = set()
    return [n for n in names if n not in allowed]


def load_torch_file(path: str, what: str = "checkpoint", trust: bool = False, field: Optional[str] = None) -> Any:
    """Load a torch file on CPU, turning a missing, unreadable or unsafe file into a `UserError`
    (about `field`, the configuration field that named the file, when given).

    A `.safetensors` file (timm's download format) gives its tensors as a state dict.
    Other files are read with `torch.load(weights_only=True)`: tensors and plain Python values
    only, so a file from elsewhere cannot run code. A file that needs full unpickling (it
    names other globals, e.g. `argparse.Namespace`) is refused unless `trust` is set
    (`--trust_checkpoint`), which loads it with `weights_only=False`.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path!r}", field)
    if str(path).endswith(".safetensors"):
        return _load_safetensors(path, what, field)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        unsafe = [] if trust else _unsafe_globals(path)
        if unsafe:
            raise UserError(f"{what} file {path!r} is refused: it needs the global {', '.join(unsafe[:3])}, and "
                            f"unpickling it could run code from the file; pass --trust_checkpoint to load it anyway "
                            f"if you trust its source", field) from None
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{what} file {path!r} is not a readable torch file (UnpicklingError: {reason})",
                        field) from None
    except Exception as err:  # zip and torch errors all mean "not a checkpoint"
        raise UserError(f"{what} file {path!r} is not a readable torch file ({type(err).__name__}: {err})",
                        field) from None


def _load_safetensors(path: str, what: str, field: Optional[str]) -> dict:
    """A safetensors file's tensors (the format holds nothing that could run)."""
    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors' own errors, OS errors
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{what} file {path!r} is not a readable safetensors file ({type(err).__name__}: "
                        f"{reason})", field) from None


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
