"""Mask + gated weights -> the physically smaller DeiT (SAVIT_METHOD.md sections 1 and 6).

`deploy_state_dict` is a pure function: it slices tensors and touches no model.
"""
from typing import Dict

import torch

from models.deit_base import DeiTArch
from models.deit_deploy import DeployDeiT
from pruning.mask import PruneMask

Tensor = torch.Tensor


def _qkv_rows(heads, head_dim: int, num_heads: int) -> Tensor:
    """Rows of the fused qkv projection that belong to `heads` (q block, k block, v block)."""
    per_head = torch.arange(head_dim)
    one = torch.cat([h * head_dim + per_head for h in heads]) if heads else torch.zeros(0, dtype=torch.long)
    width = num_heads * head_dim
    return torch.cat([one + s * width for s in range(3)])


def _proj_cols(heads, head_dim: int) -> Tensor:
    per_head = torch.arange(head_dim)
    return torch.cat([h * head_dim + per_head for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def deploy_structure(mask: PruneMask) -> dict:
    return {"width": len(mask.embed), "heads": [len(h) for h in mask.heads], "hidden": [len(m) for m in mask.mlp]}


def deploy_state_dict(mask: PruneMask, gated: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Slice a gated (or plain DeiT) state dict down to the kept heads, neurons and channels.

    Gate entries are dropped; every other tensor keeps its key. A block branch whose
    units are all pruned loses all its tensors (its norm included).
    """
    e = torch.tensor(mask.embed, dtype=torch.long)
    hd, H = mask.head_dim, mask.num_heads
    out: Dict[str, Tensor] = {}

    def take(key: str, dim_index: Dict[int, Tensor]) -> None:
        t = gated[key]
        for dim, idx in dim_index.items():
            t = t.index_select(dim, idx)
        out[key] = t.clone()

    take("patch_embed.proj.weight", {0: e})
    take("patch_embed.proj.bias", {0: e})
    take("cls_token", {2: e})
    if "dist_token" in gated:
        take("dist_token", {2: e})
    take("pos_embed", {2: e})
    for i in range(mask.depth):
        p = f"blocks.{i}."
        if mask.heads[i]:
            rows = _qkv_rows(mask.heads[i], hd, H)
            take(p + "norm1.weight", {0: e})
            take(p + "norm1.bias", {0: e})
            take(p + "attn.qkv.weight", {0: rows, 1: e})
            take(p + "attn.qkv.bias", {0: rows})
            take(p + "attn.proj.weight", {0: e, 1: _proj_cols(mask.heads[i], hd)})
            take(p + "attn.proj.bias", {0: e})
        if mask.mlp[i]:
            n = torch.tensor(mask.mlp[i], dtype=torch.long)
            take(p + "norm2.weight", {0: e})
            take(p + "norm2.bias", {0: e})
            take(p + "mlp.fc1.weight", {0: n, 1: e})
            take(p + "mlp.fc1.bias", {0: n})
            take(p + "mlp.fc2.weight", {0: e, 1: n})
            take(p + "mlp.fc2.bias", {0: e})
    take("norm.weight", {0: e})
    take("norm.bias", {0: e})
    for head in ("head", "head_dist"):
        if head + ".weight" in gated:
            take(head + ".weight", {1: e})
            take(head + ".bias", {})
    return out


def build_deploy_model(arch: DeiTArch, mask: PruneMask, gated_state_dict: Dict[str, Tensor]) -> DeployDeiT:
    """The smaller DeiT holding the kept weights of `gated_state_dict` (strict load)."""
    mask.check_fits(arch)
    model = DeployDeiT(arch, **deploy_structure(mask))
    model.load_state_dict(deploy_state_dict(mask, gated_state_dict), strict=True)
    return model
