"""Gated (or plain DeiT) weights -> the weights of the physically smaller DeiT (docs/METHOD.md
sections 1 and 5): pure functions that slice tensors and touch no model.

A mask here is anything with the lists `heads` (kept heads per block), `mlp` (kept neurons per
block) and `embed` (kept channels) and the ints `depth`, `num_heads`, `head_dim`: a
`pruning.mask.PruneMask`, or the lists a checkpoint records (`models.pruned`). Kept in `models`
so that loading a pruned file needs nothing from `pruning`.
"""
from typing import Dict

import torch

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


def deploy_structure(mask) -> dict:
    """Kept width, heads per block and MLP neurons per block: `DeployDeiT`'s keyword arguments."""
    return {"width": len(mask.embed), "heads": [len(h) for h in mask.heads], "hidden": [len(m) for m in mask.mlp]}


def deploy_state_dict(mask, gated: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Slice a gated (or plain DeiT) state dict down to the kept heads, neurons and channels.

    Gate entries are dropped; every other tensor keeps its key. A block branch whose
    units are all pruned loses all its tensors (its norm included), but not its effect:
    the gated model still adds that branch's output bias (`proj(0) = proj.bias`, and
    `fc2(GELU(0)) = fc2.bias`). Nothing reads the residual stream between the previous
    writer and that branch, so the bias is folded into the previous kept branch's output
    bias (or into `pos_embed` before block 0): exact in eval mode, no extra layer.
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
    writer = "pos_embed"  # last tensor that adds a constant to the residual stream

    def fold_bias(key: str) -> None:
        bias = gated[key].index_select(0, e).to(out[writer].dtype)
        out[writer] = out[writer] + (bias if writer != "pos_embed" else bias.view(1, 1, -1))

    for i in range(mask.depth):
        p = f"blocks.{i}."
        # in stream order: attention branch, then MLP branch
        if not mask.heads[i]:
            fold_bias(p + "attn.proj.bias")
        else:
            rows = _qkv_rows(mask.heads[i], hd, H)
            take(p + "norm1.weight", {0: e})
            take(p + "norm1.bias", {0: e})
            take(p + "attn.qkv.weight", {0: rows, 1: e})
            take(p + "attn.qkv.bias", {0: rows})
            take(p + "attn.proj.weight", {0: e, 1: _proj_cols(mask.heads[i], hd)})
            take(p + "attn.proj.bias", {0: e})
            writer = p + "attn.proj.bias"
        if not mask.mlp[i]:
            fold_bias(p + "mlp.fc2.bias")
        else:
            n = torch.tensor(mask.mlp[i], dtype=torch.long)
            take(p + "norm2.weight", {0: e})
            take(p + "norm2.bias", {0: e})
            take(p + "mlp.fc1.weight", {0: n, 1: e})
            take(p + "mlp.fc1.bias", {0: n})
            take(p + "mlp.fc2.weight", {0: e, 1: n})
            take(p + "mlp.fc2.bias", {0: e})
            writer = p + "mlp.fc2.bias"
    take("norm.weight", {0: e})
    take("norm.bias", {0: e})
    for head in ("head", "head_dist"):
        if head + ".weight" in gated:
            take(head + ".weight", {1: e})
            take(head + ".bias", {})
    return out
