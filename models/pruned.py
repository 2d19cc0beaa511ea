"""`load_pruned`: the ready physically pruned ViT from one self-describing file, no flags.

The file is main.py's `checkpoint_pruned_00.pth` (gated weights with 0/1 gates: sliced here),
main_deploy.py's `checkpoint.pth` / `best_checkpoint.pth` (deploy weights) or its
`best_checkpoint.safetensors` (deploy weights; architecture, structure and normalisation in the
metadata). Torch files are read with `weights_only=True`: nothing in them can run code.
Checkpoints written before `structure` was recorded rebuild it from their `mask`.
"""
import json
import os
import pickle
from types import SimpleNamespace
from typing import Optional

import torch

from models.build import build_deploy_model
from models.slicing import deploy_structure
from models.vit_arch import ViTArch
from models.vit_deploy import DeployViT
from models.vit_gated import GatedViT
from utils import CHECKPOINT_FORMAT_VERSION, SAFETENSORS_FORMAT, UserError, check_keys

GATE_KEY = "res_gate.weight"  # present in gated weights only (the shared embedding gate)
EXPECTED = "main.py's checkpoint_pruned_00.pth or main_deploy.py's checkpoint.pth / best_checkpoint.(pth|safetensors)"


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


def _read_torch(path: str) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object
        raise UserError(f"checkpoint {path!r} holds Python objects beyond tensors and plain containers "
                        f"({_first_line(err)}): it is not a checkpoint this project wrote") from None
    except Exception as err:  # zip, pickle and torch errors all mean "not a torch file"
        raise UserError(f"checkpoint {path!r} is not a readable torch file ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise UserError(f"checkpoint {path!r} has no 'model' entry: expected {EXPECTED}")
    return checkpoint


def _read_safetensors(path: str) -> dict:
    """{'model': weights, and the metadata's entries decoded from JSON}."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own errors, OS errors
        raise UserError(f"{path!r} is not a readable safetensors file ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise UserError(f"{path!r}: its metadata has no \"format\": \"{SAFETENSORS_FORMAT}\": not a pruned model "
                        f"this project wrote (main_deploy.py --save_safetensors)")
    checkpoint = {"model": weights}
    for key in ("format_version", "arch", "structure", "normalization"):
        if key in metadata:
            try:
                checkpoint[key] = json.loads(metadata[key])
            except json.JSONDecodeError as err:
                raise UserError(f"{path!r}: metadata {key!r} is not valid JSON ({err})") from None
    return checkpoint


def _int_list(value, length: int, high: int, what: str) -> list:
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= high for v in value):
        raise UserError(f"{what}: expected {length} integers in [0, {high}]")
    return value


def _mask_lists(d, arch: ViTArch, path: str) -> SimpleNamespace:
    """The kept-unit lists of a recorded mask, checked against `arch` (what the slicing reads)."""
    where = f"checkpoint {path!r}: 'mask' entry"
    if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("heads", "mlp", "embed")):
        raise UserError(f"{where} is malformed (expected lists 'heads', 'mlp', 'embed')")
    if len(d["heads"]) != arch.depth or len(d["mlp"]) != arch.depth:
        raise UserError(f"{where} does not have {arch.depth} blocks")
    for name, lists, n in (("heads", d["heads"], arch.num_heads), ("mlp", d["mlp"], arch.mlp_hidden),
                           ("embed", [d["embed"]], arch.embed_dim)):
        for idx in lists:
            ok = isinstance(idx, list) and all(isinstance(i, int) and 0 <= i < n for i in idx)
            if not ok or idx != sorted(set(idx)):
                raise UserError(f"{where}: '{name}' must hold sorted distinct indices in [0, {n})")
    if not d["embed"]:
        raise UserError(f"{where}: every embedding channel is pruned")
    return SimpleNamespace(heads=d["heads"], mlp=d["mlp"], embed=d["embed"], depth=arch.depth,
                           num_heads=arch.num_heads, head_dim=arch.head_dim)


def _structure(checkpoint: dict, arch: ViTArch, mask: Optional[SimpleNamespace], path: str) -> dict:
    """The recorded structure (checked), or the mask's for files written before it was recorded."""
    s = checkpoint.get("structure")
    if s is None:  # written before the structure was recorded (the mask is there: checked by the caller)
        return deploy_structure(mask)
    where = f"checkpoint {path!r}: 'structure' entry"
    if not isinstance(s, dict) or not isinstance(s.get("width"), int) or not 1 <= s["width"] <= arch.embed_dim:
        raise UserError(f"{where} is malformed (expected 'width' in [1, {arch.embed_dim}], 'heads', 'hidden')")
    structure = {"width": s["width"],
                 "heads": _int_list(s.get("heads"), arch.depth, arch.num_heads, f"{where} 'heads'"),
                 "hidden": _int_list(s.get("hidden"), arch.depth, arch.mlp_hidden, f"{where} 'hidden'")}
    if mask is not None and deploy_structure(mask) != structure:
        raise UserError(f"{where} differs from its 'mask' entry")
    return structure


def load_pruned(path: str) -> DeployViT:
    """The physically pruned ViT (eval mode, on CPU) that a pruned file describes.

    Args:
        path: main.py's checkpoint_pruned_00.pth, main_deploy.py's checkpoint.pth /
            best_checkpoint.pth, or a .safetensors file from main_deploy.py --save_safetensors.

    Returns:
        the `DeployViT`; `model.arch` is the unpruned architecture (class count, image size),
        `model.normalization` the recorded {'mean', 'std'} of its inputs (None when not recorded).

    Raises:
        UserError: missing, unreadable or foreign file, or weights that do not fit the recorded model.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f"pruned model file not found: {path!r}")
    checkpoint = _read_safetensors(path) if str(path).endswith(".safetensors") else _read_torch(path)
    version = checkpoint.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if isinstance(version, int) and version > CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"checkpoint {path!r} has format version {version}; this code reads up to "
                        f"{CHECKPOINT_FORMAT_VERSION} (update the code)")
    state_dict = checkpoint["model"]
    gated = GATE_KEY in state_dict
    # gated weights are sliced by the mask; deploy weights need the structure, or the mask it comes from
    needed = ("arch",) if "structure" in checkpoint and not gated else ("mask", "arch")
    missing = [k for k in needed if not isinstance(checkpoint.get(k), dict)]
    if missing:
        raise UserError(f"checkpoint {path!r} has no {'/'.join(repr(k) for k in missing)} entry: expected {EXPECTED}")
    try:
        arch = ViTArch.from_dict(checkpoint["arch"], f"checkpoint {path!r}")
    except TypeError as err:
        raise UserError(f"checkpoint {path!r}: malformed 'arch' entry ({err})") from None
    mask = _mask_lists(checkpoint["mask"], arch, path) if "mask" in checkpoint else None
    structure = _structure(checkpoint, arch, mask, path)
    if gated:  # main.py's gated model: slice the kept heads, neurons and channels
        check_keys(state_dict, GatedViT(arch), path)
        model = build_deploy_model(arch, mask, weights=state_dict)
    else:
        model = build_deploy_model(arch, structure=structure)
        check_keys(state_dict, model, path)
        model.load_state_dict(state_dict, strict=True)
    norm = checkpoint.get("normalization")
    model.normalization = norm if isinstance(norm, dict) else None
    return model.eval()
