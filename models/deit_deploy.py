"""The physically pruned DeiT: per-block head and neuron counts, one reduced width.

Head dim never changes. A block whose heads (or neurons) are all pruned keeps an
identity residual for that branch: the branch module is `None` and is skipped, so no
zero-size layer exists (ptflops, ONNX and torch.compile stay happy). The constant such a
branch adds in the gated model (its output bias) is folded into the previous branch's
output bias by `models.slicing.deploy_state_dict`.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.deit_base import DeiTArch, DeiTBase, optional_drop_path, stochastic_depth_rates


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v on (B, heads, N, head_dim). A module of its own so that
    FLOP counters can hook the two matmuls, which they do not see inside SDPA."""

    def __init__(self, attn_drop: float = 0.0):
        super().__init__()
        self.attn_drop = attn_drop

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)


class DeployAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.core = AttentionCore(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.core(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, -1)))


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
    def __init__(self, arch: DeiTArch, width: int, num_heads: int, hidden: int, drop_path: float):
        super().__init__()
        # an emptied branch has no norm and no layers at all: x + 0
        self.norm1 = nn.LayerNorm(width, eps=1e-6) if num_heads else None
        self.attn = DeployAttention(width, num_heads, arch.head_dim, arch.attn_drop_rate, arch.drop_rate) if num_heads else None
        self.drop_path1 = optional_drop_path(drop_path)
        self.norm2 = nn.LayerNorm(width, eps=1e-6) if hidden else None
        self.mlp = DeployMlp(width, hidden, arch.drop_rate) if hidden else None
        self.drop_path2 = optional_drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class DeployDeiT(DeiTBase):
    """A DeiT with `heads[l]` heads and `hidden[l]` MLP neurons in block l and width `width`."""

    def __init__(self, arch: DeiTArch, width: Optional[int] = None, heads: Optional[List[int]] = None,
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
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def structure(self) -> dict:
        return {
            "width": self.width,
            "heads": [b.attn.num_heads if b.attn is not None else 0 for b in self.blocks],
            "hidden": [b.mlp.fc1.out_features if b.mlp is not None else 0 for b in self.blocks],
        }
