"""`--masked_model` (+ `--finetune`) -> the physically smaller ViT (docs/METHOD.md sections 1 and 5).

The model itself comes from `models.build_deploy_model`, the one way from (architecture,
mask, weights) to a deploy model; this module finds the mask, the architecture and the
weights in the files a user passes.
"""
from dataclasses import replace
from typing import Optional, Tuple

import torch

from models.build import build_deploy_model
from models.loading import _is_gate_key, adapt_state_dict, check_keys
from models.slicing import deploy_structure
from models.vit_arch import ViTArch
from models.vit_deploy import DeployViT
from models.vit_gated import GatedViT
from pruning.mask import PruneMask
from utils import UserError, load_torch_file, state_dict_of

__all__ = ["deploy_structure", "load_masked_model", "recorded_arch"]


def recorded_arch(checkpoint, source: str = "") -> Optional[ViTArch]:
    """The `arch` a checkpoint of this project records (None when it records none)."""
    d = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if not isinstance(d, dict):
        return None
    try:
        return ViTArch.from_dict(d, f"checkpoint {source!r}")
    except TypeError as err:
        raise UserError(f"checkpoint {source!r}: its 'arch' entry is not a ViT architecture ({err})") from None


def _adapted(state_dict, arch: ViTArch, source: str):
    """(`adapt_state_dict` of `state_dict`, the gated reference it was adapted to).

    The reference is built on the meta device (key names and shapes only: no memory, no RNG
    draws); absent gates are filled with ones, as the real model's. Only a classifier of another
    size needs the real model's initial weights: then it is built for real, as before.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        reference = GatedViT(arch)
    sd = adapt_state_dict(state_dict, reference, source)
    sd = {k: torch.ones(v.shape, dtype=v.dtype) if v.is_meta and _is_gate_key(k) else v for k, v in sd.items()}
    if any(v.is_meta for v in sd.values()):
        reference = GatedViT(arch)
        sd = adapt_state_dict(state_dict, reference, source)
    return sd, reference


def load_masked_model(arch: Optional[ViTArch], masked_model: str, weights: str = "",
                      trust: bool = False, classes_from_checkpoint: bool = False) -> Tuple[PruneMask, DeployViT]:
    """The deploy model of `--masked_model`, with its weights.

    Args:
        arch: architecture of the unpruned model the mask was made for; None: the `arch`
            the checkpoint records. A checkpoint's classifier must have `arch.num_classes`
            outputs (a mismatch is an error, never a silently new classifier).
        masked_model: a gated checkpoint (ours or the reference's `checkpoint_pruned_00.pth`:
            mask and weights in one file) or a mask JSON file.
        weights: with a mask JSON, the file holding the gated or plain ViT weights to slice
            (starting weights: a classifier of another size is replaced, as with --finetune).
        trust: allow files that need full unpickling (`--trust_checkpoint`).
        classes_from_checkpoint: a checkpoint's class count replaces `arch.num_classes` instead of
            being checked against it (`--throughput` reads no data set to count classes from).

    Returns:
        (mask, model); `model.arch` is the architecture it was built with.
    """
    if masked_model.endswith(".json"):
        if not weights:
            raise UserError(f"{masked_model!r} is a mask JSON: pass the weights to slice with <finetune>",
                            field="masked_model")
        if arch is None:
            raise UserError(f"{masked_model!r} is a mask JSON: the model's architecture must be given",
                            field="masked_model")
        mask = PruneMask.load(masked_model)
        source = weights
        checkpoint = load_torch_file(source, "weights", trust=trust, field="finetune")
    else:
        source = masked_model
        checkpoint = load_torch_file(source, "checkpoint", trust=trust, field="masked_model")
        mask = PruneMask.from_checkpoint(checkpoint, source)
        recorded = recorded_arch(checkpoint, source)
        if arch is None:
            if recorded is None:
                raise UserError(f"{source!r} records no architecture ('arch'): pass the model's", field="masked_model")
            arch = recorded
        head = state_dict_of(checkpoint, source).get("head.weight")
        classes = head.shape[0] if head is not None else (recorded.num_classes if recorded is not None else None)
        if classes is not None and classes != arch.num_classes and classes_from_checkpoint:
            arch = replace(arch, num_classes=classes)
        elif classes is not None and classes != arch.num_classes:
            raise UserError(f"{source!r} was trained for {classes} classes but {arch.num_classes} are requested "
                            f"(num_classes / the data set's class count)", field="masked_model")
    mask.check_fits(arch)
    # the weights go through the same checks and pos_embed adaptation as any ViT checkpoint
    sd, reference = _adapted(state_dict_of(checkpoint, source), arch, source)
    check_keys(sd, reference, source)
    return mask, build_deploy_model(arch, mask, weights=sd)
