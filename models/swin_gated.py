"""A timm-style Swin with SAViT's multiplicative 0/1 gates (docs/METHOD.md, "Swin").

  * `layers.S.blocks.B.attn.attn_gate`   -- per head, on each head's window-attention output;
  * `layers.S.blocks.B.mlp.hidden_gate1` -- per MLP neuron, on the output of fc1;
  * `layers.S.res_gate`                  -- per embedding channel of stage S, on the residual
    stream where the stage starts (after the patch embedding and its norm, or after the patch
    merging) and after both residual additions of each of its blocks.

With `mask_aware_norm` every LayerNorm takes its statistics over the kept channels only (the
patch merging's norm over the 4 copies of the previous stage's kept channels), which makes the
gated model equal to its deploy model.
"""
from typing import List, Optional

import torch
import torch.nn as nn

from models.swin_arch import SwinArch
from models.swin_base import (PatchMerging, SwinBase, SwinStage, WindowAttentionProjections, block_layout,
                              merge_neighbours, scaled_dot_attention, shift_mask, windowed)
from models.vit_base import explicit_attention, layer_norm, optional_drop_path, stochastic_depth_rates
from models.vit_gated import Gate, GatedMlp, layer_norm_over_kept


class GatedWindowAttention(WindowAttentionProjections):
    def __init__(self, arch: SwinArch, dim: int, num_heads: int, window: int):
        super().__init__(arch, dim, num_heads, window)
        self.scale = self.head_dim ** -0.5
        self.attn_drop = nn.Dropout(arch.attn_drop_rate)
        self.attn_gate = Gate(num_heads, dim=1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.heads_qkv(x)
        bias = self.logits_bias(x.shape[0], mask)
        if torch.is_grad_enabled():  # explicit form: twice differentiable, for the gate Hessian
            out = explicit_attention(q, k, v, self.scale, self.attn_drop, bias)
        else:
            out = scaled_dot_attention(q, k, v, bias, self.attn_drop.p if self.training else 0.0)
        return self.project(self.attn_gate(out))


class GatedSwinBlock(nn.Module):
    def __init__(self, arch: SwinArch, stage: int, window: int, shift: int, drop_path: float):
        super().__init__()
        dim, heads = arch.widths[stage], arch.num_heads[stage]
        self.window, self.shift = window, shift
        self.norm1 = layer_norm(arch, dim)
        self.attn = GatedWindowAttention(arch, dim, heads, window)
        self.drop_path1 = optional_drop_path(drop_path)
        self.norm2 = layer_norm(arch, dim)
        self.mlp = GatedMlp(dim, arch.stage_hidden(stage), arch.drop_rate)
        self.drop_path2 = optional_drop_path(drop_path)
        self.register_buffer("attn_mask", shift_mask(arch.resolutions[stage], window, shift), persistent=False)

    def forward(self, x: torch.Tensor, gate: Gate, keep: Optional[torch.Tensor]) -> torch.Tensor:
        y = windowed(self.attn, layer_norm_over_kept(x, self.norm1, keep), self.window, self.shift, self.attn_mask)
        x = gate(x + self.drop_path1(y))
        return gate(x + self.drop_path2(self.mlp(layer_norm_over_kept(x, self.norm2, keep))))


class GatedPatchMerging(PatchMerging):
    def forward_kept(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        merged = merge_neighbours(x)
        return self.reduction(layer_norm_over_kept(merged, self.norm, None if keep is None else keep.repeat(4)))


class GatedSwinStage(SwinStage):
    def __init__(self, arch: SwinArch, stage: int, blocks: List[nn.Module]):
        downsample = GatedPatchMerging(arch, arch.widths[stage - 1], arch.widths[stage]) if stage else None
        super().__init__(downsample, blocks)
        self.res_gate = Gate(arch.widths[stage])


class GatedSwin(SwinBase):
    """A Swin with SAViT gates. Set `mask_aware_norm = True` for the exact pruned network."""

    def __init__(self, arch: SwinArch, mask_aware_norm: bool = False):
        super().__init__(arch, list(arch.widths))
        rates = stochastic_depth_rates(arch)
        blocks = [GatedSwinBlock(arch, s, w, shift, rates[i]) for i, (s, w, shift) in enumerate(block_layout(arch))]
        stage_of = arch.stage_of_block()
        self.layers = nn.ModuleList([
            GatedSwinStage(arch, s, [b for b, t in zip(blocks, stage_of) if t == s]) for s in range(len(arch.depths))])
        self.mask_aware_norm = mask_aware_norm
        self.init_weights()

    def _keep(self, stage: int) -> Optional[torch.Tensor]:
        return self.layers[stage].res_gate.weight if self.mask_aware_norm else None

    def forward_stages(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Every stage's output (B, H, W, C_s), before the final norm."""
        x = self.patch_embed.conv(images)
        if self.patch_embed.norm is not None:
            x = layer_norm_over_kept(x, self.patch_embed.norm, self._keep(0))
        outputs = []
        for s, stage in enumerate(self.layers):
            if stage.downsample is not None:
                x = stage.downsample.forward_kept(x, self._keep(s - 1))
            x = stage.res_gate(x)
            for block in stage.blocks:
                x = block(x, stage.res_gate, self._keep(s))
            outputs.append(x)
        return outputs

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return layer_norm_over_kept(self.forward_stages(images)[-1], self.norm, self._keep(len(self.layers) - 1))

    # -- gate access -------------------------------------------------------------
    def all_blocks(self) -> List[GatedSwinBlock]:
        return [b for stage in self.layers for b in stage.blocks]

    def head_gates(self):
        return [b.attn.attn_gate for b in self.all_blocks()]

    def mlp_gates(self):
        return [b.mlp.hidden_gate1 for b in self.all_blocks()]

    def embed_gates(self):
        return [stage.res_gate for stage in self.layers]

    def gate_parameters(self):
        """All gate weights: heads per block, MLP per block, then the embedding gate of each stage."""
        return ([g.weight for g in self.head_gates()] + [g.weight for g in self.mlp_gates()]
                + [g.weight for g in self.embed_gates()])
