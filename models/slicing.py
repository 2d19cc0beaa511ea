"""Gated (or plain timm) weights -> the weights of the physically smaller ViT or Swin
(docs/METHOD.md sections 1 and 5): pure functions that slice tensors by a mask and touch no model."""
from typing import Dict, List, Optional, Tuple

import torch

from models.mask import PruneMask, SwinMask
from models.swin_arch import SwinArch
from models.vit_arch import ViTArch

Tensor = torch.Tensor
PREFIX_TOKENS = ("cls_token", "dist_token", "reg_token")


def _head_columns(heads: List[int], head_dim: int) -> Tensor:
    """Indices of the head-dim slices of `heads` in a (heads x head_dim) axis."""
    per_head = torch.arange(head_dim)
    return torch.cat([h * head_dim + per_head for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def _qkv_rows(heads: List[int], head_dim: int, num_heads: int) -> Tensor:
    """Rows of the fused qkv projection that belong to `heads` (q block, k block, v block)."""
    one = _head_columns(heads, head_dim)
    return torch.cat([one + s * num_heads * head_dim for s in range(3)])


class _Slicer:
    """The sliced state dict, filled key by key from the unpruned one."""

    def __init__(self, unpruned: Dict[str, Tensor]):
        self.unpruned = unpruned
        self.out: Dict[str, Tensor] = {}

    def take(self, key: str, dim_index: Dict[int, Tensor], optional: bool = False) -> None:
        if optional and key not in self.unpruned:
            return
        t = self.unpruned[key]
        for dim, idx in dim_index.items():
            t = t.index_select(dim, idx)
        self.out[key] = t.clone()


def _embedding(s: _Slicer, arch: ViTArch, e: Tensor) -> List[str]:
    """Slice the patch embedding, prefix tokens, pos_embed and norm_pre; returns the keys that
    write the embedding into the residual stream (where an emptied branch's constant can go)."""
    s.take("patch_embed.proj.weight", {0: e})
    s.take("patch_embed.proj.bias", {0: e}, optional=True)
    for token in PREFIX_TOKENS:
        s.take(token, {2: e}, optional=True)
    s.take("pos_embed", {2: e})
    if arch.pre_norm:
        s.take("norm_pre.weight", {0: e})
        s.take("norm_pre.bias", {0: e})
        return ["norm_pre.bias"]
    if arch.no_embed_class:  # the prefix tokens are not covered by pos_embed
        return ["pos_embed"] + [t for t in PREFIX_TOKENS if t in s.unpruned]
    return ["pos_embed"]


def _attention(s: _Slicer, p: str, heads: List[int], head_dim: int, num_heads: int, e: Tensor) -> None:
    rows = _qkv_rows(heads, head_dim, num_heads)
    s.take(p + "norm1.weight", {0: e})
    s.take(p + "norm1.bias", {0: e})
    s.take(p + "attn.qkv.weight", {0: rows, 1: e})
    s.take(p + "attn.qkv.bias", {0: rows}, optional=True)
    for norm in ("q_norm", "k_norm"):  # over the head dim: unchanged
        s.take(p + f"attn.{norm}.weight", {}, optional=True)
        s.take(p + f"attn.{norm}.bias", {}, optional=True)
    s.take(p + "attn.proj.weight", {0: e, 1: _head_columns(heads, head_dim)})
    s.take(p + "attn.proj.bias", {0: e})
    s.take(p + "ls1.gamma", {0: e}, optional=True)


def _mlp(s: _Slicer, p: str, neurons: List[int], e: Tensor) -> None:
    n = torch.tensor(neurons, dtype=torch.long)
    s.take(p + "norm2.weight", {0: e})
    s.take(p + "norm2.bias", {0: e})
    s.take(p + "mlp.fc1.weight", {0: n, 1: e})
    s.take(p + "mlp.fc1.bias", {0: n})
    s.take(p + "mlp.fc2.weight", {0: e, 1: n})
    s.take(p + "mlp.fc2.bias", {0: e})
    s.take(p + "ls2.gamma", {0: e}, optional=True)


def _branch_constant(unpruned: Dict[str, Tensor], bias_key: str, scale_key: str, e: Tensor) -> Tensor:
    """What an emptied branch adds to the kept channels: its output bias, times its LayerScale."""
    constant = unpruned[bias_key].index_select(0, e)
    if scale_key in unpruned:
        constant = constant * unpruned[scale_key].index_select(0, e)
    return constant


def _fold(out: Dict[str, Tensor], constant: Tensor, writer: Optional[Tuple[str, str]],
          embedding_writers: List[str]) -> None:
    """Add `constant` to the last writer of the residual stream: the embedding (`writer` None) or
    the (bias key, LayerScale key) of the last kept branch (the bias gets constant / gamma)."""
    if writer is None:
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


def deploy_state_dict(mask: PruneMask, gated: Dict[str, Tensor], arch: ViTArch) -> Dict[str, Tensor]:
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
    A classifier absent from `gated` is absent from the result.
    """
    e = torch.tensor(mask.embed, dtype=torch.long)
    s = _Slicer(gated)
    embedding_writers = _embedding(s, arch, e)
    writer: Optional[Tuple[str, str]] = None  # (bias key, LayerScale key) of the last kept branch
    for i in range(mask.depth):
        p = f"blocks.{i}."
        # in stream order: attention branch, then MLP branch
        if mask.heads[i]:
            _attention(s, p, mask.heads[i], mask.head_dim, mask.num_heads, e)
            writer = (p + "attn.proj.bias", p + "ls1.gamma")
        else:
            _fold(s.out, _branch_constant(gated, p + "attn.proj.bias", p + "ls1.gamma", e), writer, embedding_writers)
        if mask.mlp[i]:
            _mlp(s, p, mask.mlp[i], e)
            writer = (p + "mlp.fc2.bias", p + "ls2.gamma")
        else:
            _fold(s.out, _branch_constant(gated, p + "mlp.fc2.bias", p + "ls2.gamma", e), writer, embedding_writers)
    for norm in ("norm", "fc_norm"):
        s.take(norm + ".weight", {0: e}, optional=True)
        s.take(norm + ".bias", {0: e}, optional=True)
    for head in ("head", "head_dist"):
        if head + ".weight" in gated:
            s.take(head + ".weight", {1: e})
            s.take(head + ".bias", {})
    return s.out


def _merging(s: _Slicer, p: str, e_in: Tensor, width_in: int, e: Tensor) -> None:
    """A patch merging: its input channel j * C + c is copy j of channel c of the previous stage."""
    copies = torch.cat([j * width_in + e_in for j in range(4)])
    s.take(p + "downsample.norm.weight", {0: copies})
    s.take(p + "downsample.norm.bias", {0: copies})
    s.take(p + "downsample.reduction.weight", {0: e, 1: copies})


def deploy_swin_state_dict(mask: SwinMask, gated: Dict[str, Tensor], arch: SwinArch) -> Dict[str, Tensor]:
    """Slice a gated (or plain timm) Swin state dict down to the kept heads, neurons and channels of
    every stage, as `deploy_state_dict` does for a ViT (an emptied branch's constant goes to the
    previous writer of its stage's stream: the last kept branch, else the patch embedding's norm
    (or conv) bias in stage 0, or a patch merging bias created for it in a later stage)."""
    e = [torch.tensor(kept, dtype=torch.long) for kept in mask.embed]
    s = _Slicer(gated)
    s.take("patch_embed.proj.weight", {0: e[0]})
    s.take("patch_embed.proj.bias", {0: e[0]})
    s.take("patch_embed.norm.weight", {0: e[0]}, optional=True)
    s.take("patch_embed.norm.bias", {0: e[0]}, optional=True)
    block = 0
    for st, depth in enumerate(mask.depths):
        p = f"layers.{st}."
        if st == 0:
            stage_writers = ["patch_embed.norm.bias" if arch.patch_norm else "patch_embed.proj.bias"]
        else:
            _merging(s, p, e[st - 1], mask.widths[st - 1], e[st])
            stage_writers = [p + "downsample.reduction.bias"]
        writer: Optional[Tuple[str, str]] = None
        for b in range(depth):
            q = f"{p}blocks.{b}."
            heads = mask.heads[block]
            if heads:
                _attention(s, q, heads, mask.head_dim, mask.num_heads[st], e[st])
                s.take(q + "attn.relative_position_bias_table", {1: torch.tensor(heads, dtype=torch.long)})
                writer = (q + "attn.proj.bias", q + "ls1.gamma")
            else:
                _fold_in_stage(s, _branch_constant(gated, q + "attn.proj.bias", q + "ls1.gamma", e[st]), writer,
                               stage_writers)
            if mask.mlp[block]:
                _mlp(s, q, mask.mlp[block], e[st])
                writer = (q + "mlp.fc2.bias", q + "ls2.gamma")
            else:
                _fold_in_stage(s, _branch_constant(gated, q + "mlp.fc2.bias", q + "ls2.gamma", e[st]), writer,
                               stage_writers)
            block += 1
    s.take("norm.weight", {0: e[-1]})
    s.take("norm.bias", {0: e[-1]})
    if "head.fc.weight" in gated:
        s.take("head.fc.weight", {1: e[-1]})
        s.take("head.fc.bias", {})
    return s.out


def _fold_in_stage(s: _Slicer, constant: Tensor, writer: Optional[Tuple[str, str]], stage_writers: List[str]) -> None:
    """`_fold`, creating the patch merging's bias (zeros) the first time a constant needs it."""
    for key in stage_writers:
        if writer is None and key not in s.out:
            s.out[key] = torch.zeros_like(constant)
    _fold(s.out, constant, writer, stage_writers)
