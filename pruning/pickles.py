"""The criteria and interaction pickles (docs/METHOD.md sections 2-3): the reference's file names,
one float64 numpy array a file, written atomically and read back with numpy-only unpickling.
"""
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from models.vit_arch import ViTArch
from pruning.mask import COMPONENTS, criteria_shapes
from utils import UserError, atomic_write_pickle, load_numpy_pickle

HESSIAN_FILE = "hessian.pickle"


def criteria_filename(method: int, layer: int) -> str:
    """The reference's file name for the criteria of component `layer` (0 heads, 1 mlp, 2 embed)."""
    return f"criteria_m{method}l{layer}_final.pickle"


def save_pickles(output_dir: str, method: int, criteria: Dict[str, torch.Tensor],
                 interactions: Optional[torch.Tensor] = None) -> List[str]:
    """Write `criteria_m{method}l{0,1,2}_final.pickle` and, given C, `hessian.pickle` atomically.

    Each file holds one float64 numpy array: heads [depth, heads], mlp [depth, hidden],
    embed [D]; hessian [3, 3].

    Args:
        output_dir: the directory (created when missing).
        method: the pruning method the criteria were computed with.
        criteria: as returned by `PruningScorer.finalize`.
        interactions: C, or None to write no hessian.pickle (and to remove an earlier run's, which
            `--pruning_pickle_from` would otherwise pair with these criteria).

    Returns:
        the paths written.
    """
    arrays = {criteria_filename(method, layer): criteria[c] for layer, c in enumerate(COMPONENTS)}
    if interactions is not None:
        arrays[HESSIAN_FILE] = interactions
    elif os.path.isfile(os.path.join(output_dir, HESSIAN_FILE)):
        os.remove(os.path.join(output_dir, HESSIAN_FILE))
    paths = []
    for name, value in arrays.items():
        paths.append(os.path.join(output_dir, name))
        atomic_write_pickle(value.detach().cpu().double().numpy(), paths[-1])
    return paths


def _load_array(path: str, shape: Tuple[int, ...], what: str, field: Optional[str]) -> torch.Tensor:
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}", field)
    try:
        array = np.asarray(load_numpy_pickle(path), dtype=np.float64)  # numpy arrays only: no code runs
    except UserError as err:  # a refused global: the message names the file and the global
        err.field = err.field or field
        raise
    except Exception as err:  # unpickling errors of any kind, ragged lists
        raise UserError(f"{path} is not a readable {what} pickle ({type(err).__name__}: {err})", field)
    if array.shape == (1, *shape):  # the reference's list of per-layer arrays, one layer
        array = array[0]
    if array.shape != tuple(shape):
        raise UserError(f"{path} holds shape {list(array.shape)}, this model expects {list(shape)} "
                        f"(pickles of another model?)", field)
    if not np.isfinite(array).all():
        raise UserError(f"{path} holds non-finite values", field)
    return torch.from_numpy(array)


def load_pickles(directory: str, method: int, arch: ViTArch, need_hessian: bool = True,
                 field: Optional[str] = "pruning_pickle_from"
                 ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Read the criteria (and C) written by `save_pickles`, validated against `arch`.

    Args:
        directory: the folder holding the pickles.
        method: the pruning method (part of the file names).
        arch: the model's architecture; shapes must match it.
        need_hessian: also read `hessian.pickle` (required then).
        field: the configuration field the errors are about (None: the messages name the files only).

    Returns:
        (criteria dict, C or None), float64 CPU tensors.
    """
    if not os.path.isdir(directory):
        raise UserError(f"not a directory: {directory!r}", field)
    shapes = criteria_shapes(arch)
    criteria = {c: _load_array(os.path.join(directory, criteria_filename(method, layer)), shapes[c],
                               f"criteria (method {method}, {c})", field)
                for layer, c in enumerate(COMPONENTS)}
    interactions = None
    if need_hessian:
        interactions = _load_array(os.path.join(directory, HESSIAN_FILE), (3, 3), "interaction (hessian)", field)
    return criteria, interactions
