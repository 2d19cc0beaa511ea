"""Loading ViT and Swin weights from files: timm state dicts and `.safetensors` files, official
DeiT, DeiT III and Swin checkpoints, this project's checkpoints and the reference's."""
import logging
import re
from typing import Dict

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

from utils import UserError, check_keys, load_torch_file, state_dict_of

logger = logging.getLogger(__name__)

PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def _is_gate_key(key: str) -> bool:
    return key.endswith(("attn_gate.weight", "hidden_gate1.weight", "res_gate.weight"))


def timm_names(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys as timm names them: no DDP `module.` prefix; the official DeiT III repository's
    `blocks.N.gamma_1` / `gamma_2` are timm's `blocks.N.ls1.gamma` / `ls2.gamma`."""
    out = {}
    for key, value in sd.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", key)
        out[key] = value
    return out


def _prefix_tokens(sd: Dict[str, torch.Tensor]) -> Dict[str, int]:
    return {t: int(sd[t].shape[1]) for t in PREFIX_TOKENS if t in sd and sd[t] is not None}


def _resample_pos_embed(sd: Dict[str, torch.Tensor], model: nn.Module, path: str) -> None:
    pos, own = sd["pos_embed"], model.state_dict()["pos_embed"]
    arch = model.arch
    if pos.shape[-1] != own.shape[-1]:
        raise UserError(f"checkpoint {path!r}: pos_embed width {pos.shape[-1]} does not match the model's "
                        f"{own.shape[-1]} (another model size?)")
    prefix = arch.num_pos_tokens - arch.num_patches  # prefix rows inside pos_embed (0 with no_embed_class)
    side = int(round((pos.shape[1] - prefix) ** 0.5))
    if side * side != pos.shape[1] - prefix:
        raise UserError(f"checkpoint {path!r}: pos_embed has {pos.shape[1] - prefix} patch rows, not a square grid "
                        f"(a model with other prefix tokens, or no_embed_class where the model has none?)")
    grid = arch.img_size // arch.patch_size
    # DeiT's fine-tuning recipe: plain bicubic, align_corners=False, no antialiasing
    # (timm's default antialias=True gives other values, even when upsampling)
    sd["pos_embed"] = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=prefix, antialias=False)
    logger.info("resampled pos_embed %s -> %s (bicubic, prefix tokens kept)", tuple(pos.shape),
                tuple(sd["pos_embed"].shape))


def _swin_names(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's Swin keys: the buffers that official checkpoints save (`relative_position_index`,
    `attn_mask`) dropped; the official layout (patch merging at the END of stage N, `head.weight`)
    renamed to timm's (merging at the start of stage N + 1, `head.fc.weight`), as timm's own filter does."""
    official = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for key, value in sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if official:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
            key = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", key)
        out[key] = value
    return out


def _resize_bias_tables(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Relative position bias tables of another window size, resampled as timm does (bicubic)."""
    for key, value in list(sd.items()):
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            window = model.get_submodule(key.rsplit(".", 1)[0]).window
            sd[key] = resize_rel_pos_bias_table(value, new_window_size=(window, window),
                                                new_bias_shape=tuple(own[key].shape))
            logger.info("resized %s %s -> %s", key, tuple(value.shape), tuple(sd[key].shape))


def _drop_other_classifier(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], head: str) -> None:
    """A classifier of another shape is replaced by the model's own initial one (logged)."""
    w = sd.get(head + ".weight")
    if w is not None and head + ".weight" in own and w.shape != own[head + ".weight"].shape:
        logger.info("dropping classifier %s of shape %s (model has %s)", head, tuple(w.shape),
                    tuple(own[head + ".weight"].shape))
        sd[head + ".weight"] = own[head + ".weight"]
        sd[head + ".bias"] = own[head + ".bias"]


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module, path: str = "") -> Dict[str, torch.Tensor]:
    """Fit a ViT or Swin state dict to `model`: timm's key names, `pos_embed` resampled to its patch
    grid (Swin: relative position bias tables to its windows), a classifier of another shape dropped
    (logged), absent gates filled with the model's own (all ones)."""
    sd = timm_names(state_dict)
    own = model.state_dict()
    if model.arch.family == "swin":
        sd = _swin_names(sd)
        _resize_bias_tables(sd, own, model)
        _drop_other_classifier(sd, own, "head.fc")
        sd.update({k: v for k, v in own.items() if _is_gate_key(k) and k not in sd})
        return sd
    theirs, ours = _prefix_tokens(sd), _prefix_tokens(own)
    if "pos_embed" in sd and theirs != ours:
        def describe(tokens):
            return ", ".join(f"{n} {t}" for t, n in tokens.items()) or "no prefix tokens"

        raise UserError(f"checkpoint {path!r} has {describe(theirs)} but the model has {describe(ours)}: "
                        f"choose the model name that matches the checkpoint")
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        _resample_pos_embed(sd, model, path)
    for head in ("head", "head_dist"):
        _drop_other_classifier(sd, own, head)
    sd.update({k: v for k, v in own.items() if _is_gate_key(k) and k not in sd})
    return sd


def load_pretrained(model: nn.Module, path: str, trust: bool = False) -> Dict[str, torch.Tensor]:
    """Load a ViT checkpoint file into `model`: a state dict, {'model': state_dict}, or a timm
    `.safetensors` file.

    `trust` (`--trust_checkpoint`) allows a torch file that needs full unpickling.
    Returns the adapted state dict that was loaded.
    """
    checkpoint = load_torch_file(path, "checkpoint", trust=trust)
    sd = adapt_state_dict(state_dict_of(checkpoint, path), model, path)
    check_keys(sd, model, path)
    model.load_state_dict(sd, strict=True)
    return sd
