"""What the gated and the deploy Swin share: windows, the relative position bias, the shift mask,
the patch embedding and merging, the stages' layout, the head and the initialisation.

Parameter names follow timm's `SwinTransformer` (`patch_embed.proj`, `patch_embed.norm`,
`layers.S.downsample.norm` / `.reduction`, `layers.S.blocks.B.*` with
`attn.relative_position_bias_table`, `norm`, `head.fc`), so that timm's Swin weights load unchanged.
Tokens travel as (B, H, W, C), as in timm.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from models.swin_arch import SwinArch
from models.vit_base import AttentionProjections, explicit_attention, init_linears_and_norms, layer_norm


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window^2, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * windows, window^2, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) row of the bias table for each pair of tokens of a window (N = window^2):
    (dy + window - 1) * (2 window - 1) + (dx + window - 1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def shift_mask(resolution: int, window: int, shift: int) -> Optional[torch.Tensor]:
    """(windows, N, N) additive mask of the shifted windows: -100 between tokens that the cyclic
    shift brought together from different image regions, 0 elsewhere (timm's values). None without shift."""
    if not shift:
        return None
    region = torch.zeros(1, resolution, resolution, 1)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    labels = window_partition(region, window).squeeze(-1)  # windows, N
    return (labels[:, None, :] != labels[:, :, None]).float() * -100.0


class WindowAttentionProjections(AttentionProjections):
    """qkv, proj and the relative position bias table ((2w-1)^2 rows, one column per head) of a
    window attention; subclasses compute attention over (B * windows, N, C) inputs."""

    def __init__(self, arch: SwinArch, dim: int, num_heads: int, window: int):
        super().__init__(arch, dim, num_heads)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1)

    def logits_bias(self, batch_windows: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Position bias plus the shift mask, broadcast to (B * windows, heads, N, N) (or (1, heads, N, N))."""
        bias = self.position_bias().unsqueeze(0)
        if mask is None:
            return bias
        windows, n = mask.shape[0], mask.shape[-1]
        bias = bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)  # 1, windows, heads, N, N
        return bias.expand(batch_windows // windows, -1, -1, -1, -1).reshape(batch_windows, -1, n, n)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> (B, H, W, C), then `norm` when `patch_norm` (timm's names)."""

    def __init__(self, arch: SwinArch, width: int, norm: bool):
        super().__init__()
        self.img_size = arch.img_size
        self.proj = nn.Conv2d(arch.in_chans, width, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.norm = layer_norm(arch, width) if norm else None

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, model expects {self.img_size}x{self.img_size}")
        return self.proj(x).permute(0, 2, 3, 1)


def merge_neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 neighbourhood's channels concatenated in timm's
    order (top-left, bottom-left, top-right, bottom-right): channel j*C + c is copy j of channel c."""
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PatchMerging(nn.Module):
    """timm's patch merging: 4 C_in channels, LayerNorm, Linear to C_out (bias only where the deploy
    model folds an emptied branch's constant into it)."""

    def __init__(self, arch: SwinArch, in_width: int, out_width: int, bias: bool = False):
        super().__init__()
        self.norm = layer_norm(arch, 4 * in_width)
        self.reduction = nn.Linear(4 * in_width, out_width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(merge_neighbours(x)))


class SwinStage(nn.Module):
    """`downsample` (a patch merging, or None in stage 0) and the stage's blocks."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


class ClassifierHead(nn.Module):
    """Average over the grid, then `fc` (timm's `head.fc`)."""

    def __init__(self, width: int, num_classes: int, drop: float):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=(1, 2))))


class SwinBase(nn.Module):
    """Stem, stages, final norm and classifier of a Swin of stage widths `widths`; subclasses
    build the stages and implement `forward_features`."""

    normalization: Optional[dict] = None  # {'mean', 'std'} of its inputs, when known

    def __init__(self, arch: SwinArch, widths: List[int]):
        super().__init__()
        self.arch = arch
        self.num_classes = arch.num_classes
        self.widths = list(widths)
        self.patch_embed = PatchEmbed(arch, widths[0], arch.patch_norm)
        self.norm = layer_norm(arch, widths[-1])
        self.head = ClassifierHead(widths[-1], arch.num_classes, arch.drop_rate)

    def init_weights(self) -> None:
        """timm's initialisation: truncated normal 0.02 for linears and the bias tables."""
        init_linears_and_norms(self)
        for m in self.modules():
            if isinstance(m, WindowAttentionProjections):
                trunc_normal_(m.relative_position_bias_table, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def windowed(attn: nn.Module, x: torch.Tensor, window: int, shift: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of (B, H, W, C) tokens within (shifted) windows; returns (B, H, W, C_out)."""
    B, H, W, _ = x.shape
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    out = window_reverse(attn(window_partition(x, window), mask), window, H, W)
    return torch.roll(out, shifts=(shift, shift), dims=(1, 2)) if shift else out


def block_layout(arch: SwinArch):
    """(stage, window, shift) of every block, in block order (odd blocks of a stage are shifted)."""
    out = []
    for s, depth in enumerate(arch.depths):
        for b in range(depth):
            out.append((s, arch.stage_window(s), arch.stage_shift(s) if b % 2 else 0))
    return out


def scaled_dot_attention(q, k, v, bias: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v: fused, except while torch.export traces it (its ONNX
    decomposition of SDPA with an additive mask fails on the window batch), where it is written out."""
    if _is_compiling():
        return explicit_attention(q, k, v, q.shape[-1] ** -0.5, lambda a: F.dropout(a, dropout), bias.to(q.dtype))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout)


def _is_compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check and check())
