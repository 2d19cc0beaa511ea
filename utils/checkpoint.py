"""The project's checkpoint format (keys, format version), atomic checkpoint saving, the one
key/shape check of a state dict against a model, and `--resume` validation and restoring."""
import json
import numbers
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from utils.atomic_io import atomic_write
from utils.errors import UserError

CHECKPOINT_FORMAT_VERSION = 1
SAFETENSORS_FORMAT = "savit-pruned"  # metadata "format" of the .safetensors files


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` that never leaves a half-written file at `path`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def plain_args(args) -> dict:
    """The run's flags as plain Python values (str/int/float/bool/None, lists and dicts of them),
    so that a checkpoint holding them loads with `torch.load(weights_only=True)`; anything else
    (a device, a NumPy scalar, a Namespace) is stored as its text."""

    def plain(value):
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, numbers.Integral):  # NumPy integers too
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return str(value)

    return plain(dict(vars(args)) if not isinstance(args, dict) else args)


def pruned_description(model: nn.Module, mask) -> dict:
    """What rebuilds the pruned network without flags (`models.load_pruned`): the unpruned
    architecture (`model.arch`: class count and image size included), the kept width, heads and
    MLP neurons per block (`mask.structure()`), and the input normalisation (`model.normalization`,
    set by the caller)."""
    norm = model.normalization
    if norm is not None:
        norm = {"mean": [float(v) for v in norm["mean"]], "std": [float(v) for v in norm["std"]]}
    return {"arch": model.arch.to_dict(), "structure": mask.structure(), "normalization": norm}


def model_checkpoint(model: nn.Module, mask, args) -> dict:
    """What every checkpoint of this project holds: format version, weights, mask, architecture,
    per-block structure, normalisation, flags (plain values: loads with weights_only=True)."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": model.state_dict(),
        "mask": mask.to_dict(),
        **pruned_description(model, mask),
        "args": plain_args(args),
    }


def save_pruned_safetensors(model: nn.Module, mask, path: str) -> None:
    """Write the model's weights to `path` (.safetensors) atomically. The metadata -- JSON strings
    of the format version, architecture, structure and normalisation -- is what `models.load_pruned`
    rebuilds the network from."""
    import safetensors.torch

    metadata = {"format": SAFETENSORS_FORMAT, "format_version": json.dumps(CHECKPOINT_FORMAT_VERSION)}
    metadata.update({k: json.dumps(v) for k, v in pruned_description(model, mask).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def checkpoint_state(model: nn.Module, mask, optimizer, lr_scheduler, loss_scaler, model_ema, epoch: int,
                     max_accuracy: float, args) -> dict:
    """Everything `--resume` needs to continue a fine-tuning run (timm/DeiT keys plus the mask)."""
    return {
        **model_checkpoint(model, mask, args),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "epoch": epoch,
        "max_accuracy": max_accuracy,
    }


def _first(keys: List[str], n: int) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def check_keys(state_dict: Dict[str, torch.Tensor], model: nn.Module, path: str, target: str = "the model",
               field: Optional[str] = None) -> None:
    """Raise a `UserError` "checkpoint {path!r} does not fit {target} (...)" (about `field` when given)
    naming the first missing, unexpected and mismatching-shape keys of `state_dict` against `model`'s own."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    parts = [f"{what}: {_first(keys, n)}" for what, keys, n in
             (("missing keys", missing, 5), ("unexpected keys", unexpected, 5), ("shape mismatch", shapes, 3)) if keys]
    if parts:
        raise UserError(f"checkpoint {path!r} does not fit {target} ({'; '.join(parts)})", field)


def load_resume_weights(checkpoint: dict, path: str, model: nn.Module, mask) -> None:
    """Check that a `--resume` checkpoint belongs to this model and mask (a `PruneMask`), then load its weights.

    Raises:
        UserError: the checkpoint was written for another model or mask (nothing is loaded then).
    """
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"{path!r} is not a training checkpoint (no 'model' entry)", field="resume")
    if isinstance(checkpoint.get("mask"), dict) and type(mask).from_dict(checkpoint["mask"], path) != mask:
        raise UserError(f"{path!r} was written for another pruned model (its mask differs from --masked_model's)",
                        field="resume")
    check_keys(checkpoint["model"], model, path, target="--model", field="resume")
    model.load_state_dict(checkpoint["model"])


def restore_training_state(checkpoint: dict, optimizer, lr_scheduler, loss_scaler=None, model_ema=None, *,
                           path: str = "") -> "tuple[int, float]":
    """Restore optimiser, scheduler, scaler and EMA from a `checkpoint_state` dict.

    The scheduler is then stepped to the next epoch, as the training loop does after
    each epoch, so a resumed run sets the same learning rates as an uninterrupted one.

    Args:
        checkpoint: the loaded `--resume` file (its model weights already loaded).
        optimizer: the freshly built optimiser.
        lr_scheduler: the freshly built timm scheduler.
        loss_scaler: the AMP scaler or None.
        model_ema: the timm ModelEma* or None (a checkpoint without EMA keeps the EMA built from the
            resumed model).
        path: the file, for error messages.

    Returns:
        (the epoch to start from, the best accuracy so far); (0, best) for a weights-only checkpoint.

    Raises:
        UserError: the optimiser, scheduler, scaler or EMA state does not fit this run.
    """
    epoch = checkpoint.get("epoch")
    best = float(checkpoint.get("max_accuracy", 0.0))
    if epoch is None:  # weights only
        return 0, best
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if loss_scaler is not None and checkpoint.get("scaler") is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        if model_ema is not None and checkpoint.get("model_ema") is not None:
            model_ema.module.load_state_dict(checkpoint["model_ema"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"{path!r}: its training state does not fit this run (same --opt, --sched and model "
                        f"flags needed): {type(err).__name__}: {' '.join(str(err).split())[:300]}",
                        field="resume") from None
    lr_scheduler.step(epoch + 1)
    return epoch + 1, best
