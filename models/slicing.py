"""Gated (or plain ViT) weights -> the weights of the physically smaller ViT (docs/METHOD.md
sections 1 and 5): pure functions that slice tensors and touch no model.

A mask here is anything with the lists `heads` (kept heads per block), `mlp` (kept neurons per
block) and `embed` (kept channels) and the ints `depth`, `num_heads`, `head_dim`: a
`pruning.mask.PruneMask`, or the lists a checkpoint records (`models.pruned`). Kept in `models`
so that loading a pruned file needs nothing from `pruning`.
"""
from typing import Dict, Tuple

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
    """Kept width, heads per block and MLP neurons per block: `DeployViT`'s keyword arguments."""
    return {"width": len(mask.embed), "heads": [len(h) for h in mask.heads], "hidden": [len(m) for m in mask.mlp]}


def deploy_state_dict(mask, gated: Dict[str, Tensor], arch) -> Dict[str, Tensor]:
    """Slice a gated (or plain timm/DeiT) ViT state dict down to the kept heads, neurons and channels.

    Gate entries are dropped; every other tensor keeps its key. A block branch whose
    units are all pruned loses all its tensors (its norm and LayerScale included), but not
    its effect: the gated model still adds that branch's output bias times its LayerScale
    (`proj(0) = proj.bias`, and `fc2(GELU(0)) = fc2.bias`). Nothing reads the residual
    stream between the previous writer and that branch, so the constant is folded into the
    previous writer: the previous kept branch's output bias (divided by its LayerScale), or
    the embedding (`norm_pre.bias`; else `pos_embed`, and the prefix tokens when they get no
    position embedding). Exact in eval mode, no extra layer.

    `arch` is the unpruned `ViTArch` (where the embedding ends: `pre_norm`, `no_embed_class`).
    """
    e = torch.tensor(mask.embed, dtype=torch.long)
    hd, H = mask.head_dim, mask.num_heads
    out: Dict[str, Tensor] = {}

    def take(key: str, dim_index: Dict[int, Tensor]) -> None:
        t = gated[key]
        for dim, idx in dim_index.items():
            t = t.index_select(dim, idx)
        out[key] = t.clone()

    def take_if_present(key: str, dim_index: Dict[int, Tensor]) -> None:
        if key in gated:
            take(key, dim_index)

    take("patch_embed.proj.weight", {0: e})
    take_if_present("patch_embed.proj.bias", {0: e})
    for token in ("cls_token", "dist_token", "reg_token"):
        take_if_present(token, {2: e})
    take("pos_embed", {2: e})
    if arch.pre_norm:
        take("norm_pre.weight", {0: e})
        take("norm_pre.bias", {0: e})
        embedding_writers = ["norm_pre.bias"]
    elif arch.no_embed_class:  # the prefix tokens are not covered by pos_embed
        embedding_writers = ["pos_embed"] + [t for t in ("cls_token", "dist_token", "reg_token") if t in gated]
    else:
        embedding_writers = ["pos_embed"]
    writer: Tuple[str, ...] = ("embedding",)  # (bias key, LayerScale key or absent) of the last writer

    def fold_constant(bias_key: str, scale_key: str) -> None:
        constant = gated[bias_key].index_select(0, e)
        if scale_key in gated:
            constant = constant * gated[scale_key].index_select(0, e)
        if writer == ("embedding",):
            for key in embedding_writers:
                out[key] = out[key] + constant.to(out[key].dtype).view(*([1] * (out[key].dim() - 1)), -1)
            return
        target, scale = writer
        if scale in out:  # the writer adds gamma * (W h + b): add constant / gamma to b
            gamma = out[scale].to(torch.float64)
            if bool(((gamma == 0) & (constant != 0)).any()):
                raise ValueError(f"cannot fold the constant of an emptied branch into {target}: "
                                 f"its LayerScale {scale} is zero where the constant is not")
            safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)  # 0 / 0: nothing to add there
            constant = torch.where(gamma == 0, torch.zeros_like(gamma), constant.to(torch.float64) / safe)
        out[target] = out[target] + constant.to(out[target].dtype)

    for i in range(mask.depth):
        p = f"blocks.{i}."
        # in stream order: attention branch, then MLP branch
        if not mask.heads[i]:
            fold_constant(p + "attn.proj.bias", p + "ls1.gamma")
        else:
            rows = _qkv_rows(mask.heads[i], hd, H)
            take(p + "norm1.weight", {0: e})
            take(p + "norm1.bias", {0: e})
            take(p + "attn.qkv.weight", {0: rows, 1: e})
            take_if_present(p + "attn.qkv.bias", {0: rows})
            for norm in ("q_norm", "k_norm"):  # over the head dim: unchanged
                take_if_present(p + f"attn.{norm}.weight", {})
                take_if_present(p + f"attn.{norm}.bias", {})
            take(p + "attn.proj.weight", {0: e, 1: _proj_cols(mask.heads[i], hd)})
            take(p + "attn.proj.bias", {0: e})
            take_if_present(p + "ls1.gamma", {0: e})
            writer = (p + "attn.proj.bias", p + "ls1.gamma")
        if not mask.mlp[i]:
            fold_constant(p + "mlp.fc2.bias", p + "ls2.gamma")
        else:
            n = torch.tensor(mask.mlp[i], dtype=torch.long)
            take(p + "norm2.weight", {0: e})
            take(p + "norm2.bias", {0: e})
            take(p + "mlp.fc1.weight", {0: n, 1: e})
            take(p + "mlp.fc1.bias", {0: n})
            take(p + "mlp.fc2.weight", {0: e, 1: n})
            take(p + "mlp.fc2.bias", {0: e})
            take_if_present(p + "ls2.gamma", {0: e})
            writer = (p + "mlp.fc2.bias", p + "ls2.gamma")
    for norm in ("norm", "fc_norm"):
        take_if_present(norm + ".weight", {0: e})
        take_if_present(norm + ".bias", {0: e})
    for head in ("head", "head_dist"):
        if head + ".weight" in gated:
            take(head + ".weight", {1: e})
            take(head + ".bias", {})
    return out

