"""What the gated and the deploy ViT share: stem, prefix tokens, pooling, heads, init.

Parameter names follow timm's `VisionTransformer` / `VisionTransformerDistilled`
(`patch_embed.proj`, `cls_token`, `dist_token`, `reg_token`, `pos_embed`, `norm_pre`,
`blocks.N.*`, `norm`, `fc_norm`, `head`, `head_dist`) so that timm and official DeiT
checkpoints load unchanged.
"""
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_

from models.vit_arch import ViTArch


def init_linears_and_norms(root: nn.Module) -> None:
    """timm's initialisation of every Linear (truncated normal 0.02, zero bias) and LayerNorm (1, 0) in `root`."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       dropout: Callable[[torch.Tensor], torch.Tensor], bias: Optional[torch.Tensor] = None):
    """softmax(q k^T * scale (+ bias)) v written out: twice differentiable (the gate Hessian needs
    it; SDPA's backward is not), and exportable where SDPA with an additive mask is not."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return dropout(attn.softmax(dim=-1)) @ v


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as timm's PatchEmbed (`proj` is the conv)."""

    def __init__(self, arch: ViTArch, embed_dim: int):
        super().__init__()
        self.img_size = arch.img_size
        self.proj = nn.Conv2d(arch.in_chans, embed_dim, kernel_size=arch.patch_size, stride=arch.patch_size,
                              bias=arch.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, model expects {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (timm's `ls1` / `ls2`, parameter `gamma`)."""

    def __init__(self, width: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((width,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TokenPool(nn.Module):
    """The class token (`token`) or the mean of the patch tokens (`avg`). A module of its own so
    that FLOP counters can count the average."""

    def __init__(self, kind: str, num_prefix_tokens: int):
        super().__init__()
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]


def optional_layer_scale(arch: ViTArch, width: int) -> Optional[nn.Module]:
    return LayerScale(width, arch.init_values) if arch.init_values is not None else None


def layer_norm(arch: ViTArch, width: int) -> nn.LayerNorm:
    return nn.LayerNorm(width, eps=arch.norm_eps)


class AttentionProjections(nn.Module):
    """What every attention here shares: the fused qkv projection, the optional per-head q/k
    norms, and the output projection. Subclasses add what runs between (`forward`)."""

    def __init__(self, arch: ViTArch, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = arch.head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim, bias=arch.qkv_bias)
        # qk_norm: LayerNorm over each head's dim, untouched by pruning whole heads
        self.q_norm = layer_norm(arch, self.head_dim) if arch.qk_norm else None
        self.k_norm = layer_norm(arch, self.head_dim) if arch.qk_norm else None
        self.proj = nn.Linear(num_heads * self.head_dim, dim)
        self.proj_drop = nn.Dropout(arch.drop_rate)

    def heads_qkv(self, x: torch.Tensor):
        """q, k, v of shape (B, heads, N, head_dim), q and k normalised when `qk_norm`."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def project(self, heads_out: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> merged heads -> output projection (B, N, dim)."""
        B, _, N, _ = heads_out.shape
        return self.proj_drop(self.proj(heads_out.transpose(1, 2).reshape(B, N, -1)))


class ViTBase(nn.Module):
    """Stem, prefix tokens, final norm(s) and classifier(s) of a ViT of width `width`.

    Subclasses build `self.blocks` and implement `forward_blocks`.
    """

    normalization: Optional[dict] = None  # {'mean', 'std'} of its inputs, when known (stored in checkpoints)

    def __init__(self, arch: ViTArch, width: int):
        super().__init__()
        self.arch = arch
        self.num_classes = arch.num_classes
        self.num_prefix_tokens = arch.num_prefix_tokens
        self.patch_embed = PatchEmbed(arch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if arch.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width)) if arch.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, arch.reg_tokens, width)) if arch.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_pos_tokens, width))
        self.pos_drop = nn.Dropout(arch.drop_rate)
        self.norm_pre = layer_norm(arch, width) if arch.pre_norm else None
        self.norm = layer_norm(arch, width) if not arch.fc_norm else None
        self.pool = TokenPool(arch.global_pool, arch.num_prefix_tokens)
        self.fc_norm = layer_norm(arch, width) if arch.fc_norm else None
        self.head = nn.Linear(width, arch.num_classes) if arch.num_classes > 0 else nn.Identity()
        if arch.distilled:
            self.head_dist = nn.Linear(width, arch.num_classes) if arch.num_classes > 0 else nn.Identity()
        else:
            self.head_dist = None

    def init_weights(self) -> None:
        """DeiT/timm initialisation: truncated normal 0.02 for tokens and linears."""
        trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token, self.reg_token):
            if token is not None:
                trunc_normal_(token, std=0.02)
        init_linears_and_norms(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus position embedding, prefix tokens in front (class, distillation,
        registers); with `no_embed_class` the prefix tokens get no position embedding."""
        x = self.patch_embed(images)
        b = x.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.arch.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.pos_drop(x)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the blocks and the final norm (when the norm is not after the pooling)."""
        return self.forward_blocks(self.embed_tokens(images))

    def pooled_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(x) if self.fc_norm is not None else x

    def forward_head(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        logits = self.head(self.pooled_norm(self.pool(x)))
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            # DeiT: during training the distillation loss needs both heads
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, images: torch.Tensor):
        return self.forward_head(self.forward_features(images))


def stochastic_depth_rates(arch: ViTArch):
    return [r.item() for r in torch.linspace(0, arch.drop_path_rate, arch.depth, device="cpu")]


def optional_drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()
