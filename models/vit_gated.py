"""A timm-style ViT with SAViT's multiplicative 0/1 gates (docs/METHOD.md section 1).

Three kinds of gate, each a `Gate` whose `weight` holds one scalar per unit:
  * `blocks.N.attn.attn_gate`   -- per head, on softmax(qk^T)v before the heads are merged;
  * `blocks.N.mlp.hidden_gate1` -- per MLP neuron, on the output of fc1 (before GELU);
  * `res_gate`                  -- ONE vector over the embedding channels shared by the
    whole model, applied to the residual stream where it starts (after the token embedding,
    prefix tokens included, and after `norm_pre` when there is one) and after both
    residual additions of every block (after LayerScale and drop path). Each block holds
    the same module, so the state dict also carries the reference's alias
    `blocks.N.res_gate.weight`.
Gates are parameters with `requires_grad=False`: no optimizer ever updates them; the
pruning pass switches their gradients on (and the weights' off) itself.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vit_arch import ViTArch
from models.vit_base import (AttentionProjections, ViTBase, explicit_attention, layer_norm, optional_drop_path,
                             optional_layer_scale, stochastic_depth_rates)


class Gate(nn.Module):
    """Multiplies its input by `weight`, one value per unit along dimension `dim`."""

    def __init__(self, num_units: int, dim: int = -1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_units), requires_grad=False)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.weight.view(shape)

    def extra_repr(self) -> str:
        return f"units={self.weight.numel()}"


def layer_norm_over_kept(x: torch.Tensor, norm: nn.LayerNorm, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """LayerNorm whose statistics use only the channels where `keep` is 1; pruned channels output 0.

    With `keep=None` it is the plain LayerNorm (the reference's behaviour: statistics over
    all D channels, zeroed ones included). The masked form equals the deploy model's
    LayerNorm over the kept channels.
    """
    if keep is None:
        return norm(x)
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    centred = (x - mean) * keep
    var = (centred * centred).sum(-1, keepdim=True) / count
    y = centred * torch.rsqrt(var + norm.eps)
    return (y * norm.weight + norm.bias) * keep


class GatedAttention(AttentionProjections):
    def __init__(self, arch: ViTArch, dim: int, num_heads: int):
        super().__init__(arch, dim, num_heads)
        self.scale = self.head_dim ** -0.5
        self.attn_drop = nn.Dropout(arch.attn_drop_rate)
        self.attn_gate = Gate(num_heads, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_qkv(x)
        if torch.is_grad_enabled():
            out = explicit_attention(q, k, v, self.scale, self.attn_drop)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.project(self.attn_gate(out))  # (B, heads, N, head_dim): one gate per head


class GatedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.hidden_gate1 = Gate(hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.hidden_gate1(self.fc1(x))))
        return self.drop2(self.fc2(x))


def scaled(ls: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return ls(x) if ls is not None else x


class GatedBlock(nn.Module):
    def __init__(self, arch: ViTArch, res_gate: Gate, drop_path: float):
        super().__init__()
        dim = arch.embed_dim
        self.norm1 = layer_norm(arch, dim)
        self.attn = GatedAttention(arch, dim, arch.num_heads)
        self.ls1 = optional_layer_scale(arch, dim)
        self.drop_path1 = optional_drop_path(drop_path)
        self.norm2 = layer_norm(arch, dim)
        self.mlp = GatedMlp(dim, arch.mlp_hidden, arch.drop_rate)
        self.ls2 = optional_layer_scale(arch, dim)
        self.drop_path2 = optional_drop_path(drop_path)
        self.res_gate = res_gate  # shared with the model: the reference's per-block alias

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.res_gate(x + self.drop_path1(scaled(self.ls1, self.attn(layer_norm_over_kept(x, self.norm1, keep)))))
        x = self.res_gate(x + self.drop_path2(scaled(self.ls2, self.mlp(layer_norm_over_kept(x, self.norm2, keep)))))
        return x


class GatedViT(ViTBase):
    """A ViT with SAViT gates. Set `mask_aware_norm = True` for the exact pruned network."""

    def __init__(self, arch: ViTArch, mask_aware_norm: bool = False):
        super().__init__(arch, arch.embed_dim)
        self.res_gate = Gate(arch.embed_dim)
        rates = stochastic_depth_rates(arch)
        self.blocks = nn.ModuleList([GatedBlock(arch, self.res_gate, rates[i]) for i in range(arch.depth)])
        self.mask_aware_norm = mask_aware_norm
        self.init_weights()

    def _keep(self) -> Optional[torch.Tensor]:
        return self.res_gate.weight if self.mask_aware_norm else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._keep()
        x = self.res_gate(x)
        if self.norm_pre is not None:
            x = self.res_gate(layer_norm_over_kept(x, self.norm_pre, keep))
        for block in self.blocks:
            x = block(x, keep)
        return layer_norm_over_kept(x, self.norm, keep) if self.norm is not None else x

    def pooled_norm(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_over_kept(x, self.fc_norm, self._keep()) if self.fc_norm is not None else x

    # -- gate access -------------------------------------------------------------
    def head_gates(self):
        return [b.attn.attn_gate for b in self.blocks]

    def mlp_gates(self):
        return [b.mlp.hidden_gate1 for b in self.blocks]

    def embed_gates(self):
        return [self.res_gate]

    def gate_parameters(self):
        """All distinct gate weights: heads per block, MLP per block, then the embedding gate."""
        return [g.weight for g in self.head_gates()] + [g.weight for g in self.mlp_gates()] + [self.res_gate.weight]
