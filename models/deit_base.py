"""What the gated and the deploy DeiT share: architecture record, stem, tokens, heads, init.

Parameter names follow timm's `VisionTransformer` / `VisionTransformerDistilled`
(`patch_embed.proj`, `cls_token`, `dist_token`, `pos_embed`, `blocks.N.*`, `norm`,
`head`, `head_dist`) so that official DeiT checkpoints load unchanged.
"""
from dataclasses import asdict, dataclass, replace
from typing import Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_

from utils import UserError


@dataclass(frozen=True)
class DeiTArch:
    """The unpruned architecture of a DeiT (head dim = embed_dim / num_heads)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    distilled: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if self.distilled else 1

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    def with_options(self, **kwargs) -> "DeiTArch":
        """Copy with the usual `create_model` keyword arguments applied.

        Accepts timm/DeiT-style kwargs (`num_classes`, `img_size`, `drop_rate`,
        `drop_path_rate`, ...); `None` values and `pretrained=False` are ignored.
        """
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if kwargs.pop("pretrained", False):
            raise UserError("pretrained=True is not supported offline; pass weights with --finetune")
        kwargs.pop("drop_block_rate", None)
        if "input_size" in kwargs:
            kwargs["img_size"] = kwargs.pop("input_size")
        known = set(self.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unexpected model arguments: {unknown}")
        arch = replace(self, **kwargs)
        if arch.img_size % arch.patch_size:
            raise UserError(f"input size {arch.img_size} is not a multiple of the patch size {arch.patch_size}")
        return arch


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as timm's PatchEmbed (`proj` is the conv)."""

    def __init__(self, arch: DeiTArch, embed_dim: int):
        super().__init__()
        self.img_size = arch.img_size
        self.proj = nn.Conv2d(arch.in_chans, embed_dim, kernel_size=arch.patch_size, stride=arch.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, model expects {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class DeiTBase(nn.Module):
    """Stem, prefix tokens, final norm and classifier(s) of a DeiT of width `width`.

    Subclasses build `self.blocks` and implement `forward_blocks`.
    """

    def __init__(self, arch: DeiTArch, width: int):
        super().__init__()
        self.arch = arch
        self.num_classes = arch.num_classes
        self.patch_embed = PatchEmbed(arch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, width)) if arch.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, width))
        self.pos_drop = nn.Dropout(arch.drop_rate)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, arch.num_classes) if arch.num_classes > 0 else nn.Identity()
        if arch.distilled:
            self.head_dist = nn.Linear(width, arch.num_classes) if arch.num_classes > 0 else nn.Identity()
        else:
            self.head_dist = None

    def init_weights(self) -> None:
        """DeiT/timm initialisation: truncated normal 0.02 for tokens and linears."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "dist_token"}

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm."""
        return self.forward_blocks(self.embed_tokens(images))

    def forward_head(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        logits = self.head(x[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            # DeiT: during training the distillation loss needs both heads
            return logits, logits_dist
        return (logits + logits_dist) / 2

    def forward(self, images: torch.Tensor):
        return self.forward_head(self.forward_features(images))


def stochastic_depth_rates(arch: DeiTArch):
    return [r.item() for r in torch.linspace(0, arch.drop_path_rate, arch.depth)]


def optional_drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()
