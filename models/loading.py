"""Loading DeiT weights from files (official DeiT/timm checkpoints, our own, the reference's)."""
import logging
from typing import Dict

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from utils import UserError, check_keys, load_torch_file, state_dict_of

logger = logging.getLogger(__name__)


def _is_gate_key(key: str) -> bool:
    return key.endswith(("attn_gate.weight", "hidden_gate1.weight", "res_gate.weight"))


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, path: str = "") -> Dict[str, torch.Tensor]:
    """Fit a DeiT state dict to `model`: resample `pos_embed` to its patch grid, drop a
    classifier of another shape, fill absent gates with the model's own (all ones)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    pos = sd.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = model.arch.num_prefix_tokens
        grid = model.arch.img_size // model.arch.patch_size
        if pos.shape[-1] != own["pos_embed"].shape[-1]:
            raise UserError(f"checkpoint {path!r}: pos_embed width {pos.shape[-1]} does not match the model's "
                            f"{own['pos_embed'].shape[-1]} (another DeiT size?)")
        theirs = 2 if "dist_token" in sd else 1
        if theirs != prefix:
            kind = {1: "a plain DeiT (no distillation token)", 2: "a distilled DeiT (with a distillation token)"}
            raise UserError(f"checkpoint {path!r} is {kind[theirs]} but the model is {kind[prefix]}: "
                            f"choose the matching model name")
        side = int(round((pos.shape[1] - prefix) ** 0.5))
        if side * side != pos.shape[1] - prefix:
            raise UserError(f"checkpoint {path!r}: pos_embed has {pos.shape[1] - prefix} patch tokens, "
                            f"not a square grid")
        # DeiT's fine-tuning recipe: plain bicubic, align_corners=False, no antialiasing
        # (timm's default antialias=True gives other values, even when upsampling)
        sd["pos_embed"] = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=prefix, antialias=False)
        logger.info("resampled pos_embed %s -> %s (bicubic, prefix tokens kept)", tuple(pos.shape),
                    tuple(sd["pos_embed"].shape))
    for head in ("head", "head_dist"):
        w = sd.get(head + ".weight")
        if w is not None and head + ".weight" in own and w.shape != own[head + ".weight"].shape:
            logger.info("dropping classifier %s of shape %s (model has %s)", head, tuple(w.shape),
                        tuple(own[head + ".weight"].shape))
            sd.pop(head + ".weight")
            sd.pop(head + ".bias", None)
            sd[head + ".weight"] = own[head + ".weight"]
            sd[head + ".bias"] = own[head + ".bias"]
    for key, value in own.items():
        if _is_gate_key(key) and key not in sd:
            sd[key] = value
    return sd


def load_pretrained(model: nn.Module, path: str, trust: bool = False) -> Dict[str, torch.Tensor]:
    """Load a DeiT checkpoint file (a state dict or {'model': state_dict}) into `model`.

    `trust` (`--trust_checkpoint`) allows a file that needs full unpickling.
    Returns the adapted state dict that was loaded.
    """
    checkpoint = load_torch_file(path, "--finetune checkpoint", trust=trust)
    sd = adapt_state_dict(state_dict_of(checkpoint, path), model, path)
    check_keys(sd, model, path)
    model.load_state_dict(sd, strict=True)
    return sd
