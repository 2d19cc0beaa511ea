"""The physically pruned Swin: per-block head and neuron counts, one width per stage.

Head dim never changes. As in `models.vit_deploy`, an emptied branch has no module at all, and
the constant it adds in the gated model is folded into the previous writer of the stage's
residual stream (`models.slicing.deploy_swin_state_dict`); the first writer of stage s > 0 is the
patch merging's reduction, which gets a bias for it only when the stage's first block has no head.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from models.swin_arch import SwinArch
from models.swin_base import (PatchMerging, SwinBase, SwinStage, WindowAttentionProjections, block_layout,
                              scaled_dot_attention, shift_mask, windowed)
from models.vit_base import layer_norm, optional_drop_path, stochastic_depth_rates
from models.vit_deploy import DeployMlp


class WindowAttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d) + bias) v on (B * windows, heads, N, head_dim); a module of its own
    so that FLOP counters can hook the matmuls, which they do not see inside SDPA."""

    def __init__(self, attn_drop: float = 0.0):
        super().__init__()
        self.attn_drop = attn_drop

    def forward(self, q, k, v, bias: torch.Tensor) -> torch.Tensor:
        return scaled_dot_attention(q, k, v, bias, self.attn_drop if self.training else 0.0)


class DeployWindowAttention(WindowAttentionProjections):
    def __init__(self, arch: SwinArch, dim: int, num_heads: int, window: int):
        super().__init__(arch, dim, num_heads, window)
        self.core = WindowAttentionCore(arch.attn_drop_rate)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.project(self.core(*self.heads_qkv(x), self.logits_bias(x.shape[0], mask)))


class DeploySwinBlock(nn.Module):
    def __init__(self, arch: SwinArch, stage: int, window: int, shift: int, width: int, num_heads: int,
                 hidden: int, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = layer_norm(arch, width) if num_heads else None
        self.attn = DeployWindowAttention(arch, width, num_heads, window) if num_heads else None
        self.drop_path1 = optional_drop_path(drop_path)
        self.norm2 = layer_norm(arch, width) if hidden else None
        self.mlp = DeployMlp(width, hidden, arch.drop_rate) if hidden else None
        self.drop_path2 = optional_drop_path(drop_path)
        mask = shift_mask(arch.resolutions[stage], window, shift) if num_heads else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path1(windowed(self.attn, self.norm1(x), self.window, self.shift, self.attn_mask))
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


def merge_bias_stages(arch: SwinArch, heads: List[int]) -> List[bool]:
    """Whether stage s's patch merging needs a bias: s > 0 and its first block has no head (the
    emptied branch's constant has no earlier writer in the stage to go to)."""
    first = [sum(arch.depths[:s]) for s in range(len(arch.depths))]
    return [s > 0 and heads[b] == 0 for s, b in enumerate(first)]


class DeploySwin(SwinBase):
    """A Swin with `heads[l]` heads and `hidden[l]` MLP neurons in block l and width `width[s]` in
    stage s (the unpruned structure of `arch` for what is not given)."""

    mask = None  # the mask it was cut by, when `models.load_pruned` read one

    def __init__(self, arch: SwinArch, width: Optional[List[int]] = None, heads: Optional[List[int]] = None,
                 hidden: Optional[List[int]] = None):
        width = list(arch.widths) if width is None else [int(w) for w in width]
        heads = arch.block_heads() if heads is None else list(heads)
        hidden = arch.block_hidden() if hidden is None else list(hidden)
        if len(width) != len(arch.depths) or len(heads) != arch.depth or len(hidden) != arch.depth:
            raise ValueError(f"need {len(arch.depths)} stage widths and {arch.depth} per-block head and hidden counts, "
                             f"got {len(width)}, {len(heads)} and {len(hidden)}")
        if min(width) < 1:
            raise ValueError("every stage of a deploy Swin needs at least one embedding channel")
        super().__init__(arch, width)
        rates = stochastic_depth_rates(arch)
        blocks = [DeploySwinBlock(arch, s, w, shift, width[s], heads[i], hidden[i], rates[i])
                  for i, (s, w, shift) in enumerate(block_layout(arch))]
        stage_of = arch.stage_of_block()
        merge_bias = merge_bias_stages(arch, heads)
        self.layers = nn.ModuleList([
            SwinStage(PatchMerging(arch, width[s - 1], width[s], bias=merge_bias[s]) if s else None,
                      [b for b, t in zip(blocks, stage_of) if t == s]) for s in range(len(arch.depths))])
        self.init_weights()

    def forward_stages(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Every stage's output (B, H, W, C_s), before the final norm."""
        x = self.patch_embed.conv(images)
        if self.patch_embed.norm is not None:
            x = self.patch_embed.norm(x)
        outputs = []
        for stage in self.layers:
            if stage.downsample is not None:
                x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)
            outputs.append(x)
        return outputs

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_stages(images)[-1])

    def all_blocks(self) -> List[DeploySwinBlock]:
        return [b for stage in self.layers for b in stage.blocks]

    def structure(self) -> dict:
        blocks = self.all_blocks()
        return {
            "width": list(self.widths),
            "heads": [b.attn.num_heads if b.attn is not None else 0 for b in blocks],
            "hidden": [b.mlp.fc1.out_features if b.mlp is not None else 0 for b in blocks],
        }
