"""The physically pruned ViT: per-block head and neuron counts, one reduced width.

Head dim never changes. A block whose heads (or neurons) are all pruned keeps an
identity residual for that branch: the branch module is `None` and is skipped, so no
zero-size layer exists (ptflops, ONNX and torch.compile stay happy). The constant such a
branch adds in the gated model (its output bias, times its LayerScale) is folded into the
previous writer of the residual stream by `models.slicing.deploy_state_dict`.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vit_arch import ViTArch
from models.vit_base import AttentionProjections, ViTBase, layer_norm, optional_drop_path, optional_layer_scale, stochastic_depth_rates


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v on (B, heads, N, head_dim). A module of its own so that
    FLOP counters can hook the two matmuls, which they do not see inside SDPA."""

    def __init__(self, attn_drop: float = 0.0):
        super().__init__()
        self.attn_drop = attn_drop

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)


class DeployAttention(AttentionProjections):
    def __init__(self, arch: ViTArch, dim: int, num_heads: int):
        super().__init__(arch, dim, num_heads)
        self.core = AttentionCore(arch.attn_drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.core(*self.heads_qkv(x)))


class DeployMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DeployBlock(nn.Module):
    def __init__(self, arch: ViTArch, width: int, num_heads: int, hidden: int, drop_path: float):
        super().__init__()
        # an emptied branch has no norm, no layers and no scale at all: x + 0
        self.norm1 = layer_norm(arch, width) if num_heads else None
        self.attn = DeployAttention(arch, width, num_heads) if num_heads else None
        self.ls1 = optional_layer_scale(arch, width) if num_heads else None
        self.drop_path1 = optional_drop_path(drop_path)
        self.norm2 = layer_norm(arch, width) if hidden else None
        self.mlp = DeployMlp(width, hidden, arch.drop_rate) if hidden else None
        self.ls2 = optional_layer_scale(arch, width) if hidden else None
        self.drop_path2 = optional_drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            y = self.attn(self.norm1(x))
            x = x + self.drop_path1(self.ls1(y) if self.ls1 is not None else y)
        if self.mlp is not None:
            y = self.mlp(self.norm2(x))
            x = x + self.drop_path2(self.ls2(y) if self.ls2 is not None else y)
        return x


class DeployViT(ViTBase):
    """A ViT with `heads[l]` heads and `hidden[l]` MLP neurons in block l and width `width`
    (the unpruned structure of `arch` for what is not given)."""

    mask = None  # the `PruneMask` it was cut by, when `models.load_pruned` read one

    def __init__(self, arch: ViTArch, width: Optional[int] = None, heads: Optional[List[int]] = None,
                 hidden: Optional[List[int]] = None):
        width = arch.embed_dim if width is None else width
        heads = [arch.num_heads] * arch.depth if heads is None else list(heads)
        hidden = [arch.mlp_hidden] * arch.depth if hidden is None else list(hidden)
        if len(heads) != arch.depth or len(hidden) != arch.depth:
            raise ValueError(f"need {arch.depth} per-block head and hidden counts, got {len(heads)} and {len(hidden)}")
        if width < 1:
            raise ValueError("a deploy model needs at least one embedding channel")
        super().__init__(arch, width)
        self.width = width
        rates = stochastic_depth_rates(arch)
        self.blocks = nn.ModuleList(
            [DeployBlock(arch, width, heads[i], hidden[i], rates[i]) for i in range(arch.depth)]
        )
        self.init_weights()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if self.norm is not None else x

    def structure(self) -> dict:
        return {
            "width": self.width,
            "heads": [b.attn.num_heads if b.attn is not None else 0 for b in self.blocks],
            "hidden": [b.mlp.fc1.out_features if b.mlp is not None else 0 for b in self.blocks],
        }
