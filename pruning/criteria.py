"""The first-order criteria of `--pruning_method` 1-4 (docs/METHOD.md section 2).

`TaylorCapture` reads the Taylor terms t[b, n, u] at the gates through hooks; each `Criterion`
says how a batch's terms (or gate gradients) become per-unit scores and how their sum is divided.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from pruning.mask import COMPONENTS

Tensor = torch.Tensor


class TaylorCapture:
    """Per-unit statistics `reduce(t)` of the Taylor terms t[b, n, u] of every gate, from hooks.

    A forward hook on each `Gate` puts a tensor hook on its output; the tensor hook gets
    grad_output and forms t = grad_output * output, summed over a unit's own channels (the
    head_dim channels of a head). Heads and MLP gates are reduced at once (t is not kept); an
    embedding gate sums t over its applications first (a ViT's shared gate: 2 * depth + 1; a Swin
    stage's: 2 * its blocks + 1). A Swin's windows and grids are folded back into each image's
    tokens (n runs over the stage's H * W tokens), and its results are flat (groups in order).
    """

    def __init__(self, model: nn.Module, reduce: Callable[[Tensor], Tensor]):
        self.depth = len(model.head_gates())
        self.flat = model.arch.family == "swin"
        self.reduce = reduce
        self.batch = 0
        self.embed_t: Dict[int, Tensor] = {}  # stage -> (B, N, width): summed over the gate's applications
        self.stats: Dict[Tuple[str, int], Tensor] = {}  # (component, block) -> [units]
        self._tensor_hooks = []
        gates = [("heads", b, g) for b, g in enumerate(model.head_gates())]
        gates += [("mlp", b, g) for b, g in enumerate(model.mlp_gates())]
        gates += [("embed", s, g) for s, g in enumerate(model.embed_gates())]
        self._module_hooks = [g.register_forward_hook(self._forward_hook(c, b)) for c, b, g in gates]
        self._module_hooks.append(model.register_forward_pre_hook(self._batch_hook))

    def _batch_hook(self, module: nn.Module, inputs) -> None:
        self.batch = inputs[0].shape[0]

    def _forward_hook(self, component: str, block: int) -> Callable:
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            if output.requires_grad:
                self._tensor_hooks.append(output.register_hook(self._grad_hook(component, block, output)))

        return hook

    def _tokens(self, t: Tensor) -> Tensor:
        """(B, N, units): a Swin's (B * windows, N_w, units) or (B, H, W, units) as each image's tokens."""
        return t.reshape(self.batch, -1, t.shape[-1]) if t.dim() != 3 or t.shape[0] != self.batch else t

    def _grad_hook(self, component: str, block: int, output: Tensor) -> Callable:
        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                t = grad.detach() * output.detach()  # grad_output * output
                if component == "heads":  # (B, heads, N, head_dim) -> (B, N, heads): sum a head's channels
                    self.stats[(component, block)] = self.reduce(self._tokens(t.sum(-1).transpose(1, 2)))
                elif component == "mlp":
                    self.stats[(component, block)] = self.reduce(self._tokens(t))
                else:
                    t = self._tokens(t)
                    self.embed_t[block] = t if block not in self.embed_t else self.embed_t[block] + t

        return hook

    def stop_forward(self) -> None:
        for h in self._module_hooks:
            h.remove()
        self._module_hooks = []

    def stop(self) -> None:
        """Remove every hook: the double-backwards must not fire them again."""
        self.stop_forward()
        for h in self._tensor_hooks:
            h.remove()
        self._tensor_hooks = []

    def result(self, component: str) -> Tensor:
        """The statistics of a component: [depth, units] for heads/mlp, [D] for embed (a Swin: flat)."""
        if component == "embed":
            return torch.cat([self.reduce(self.embed_t[s]) for s in sorted(self.embed_t)])
        rows = [self.stats[(component, b)] for b in range(self.depth)]
        return torch.cat(rows) if self.flat else torch.stack(rows)


class Criterion:
    """Per batch a per-unit score; the criterion is their sum over the sum of the batch weights.

    The defaults: t read through hooks, per batch sum_{b,n} |t|, weight 1 (the mean over batches).
    Each method overrides what differs.
    """

    uses_taylor = True  # reads t through a `TaylorCapture` (else only the gate gradients)

    def reduce(self, t: Tensor) -> Tensor:
        """Per-unit sum over one chunk of t [B, N, units], float64 (additive over samples)."""
        return t.double().abs().sum((0, 1))

    def chunk_sums(self, capture: Optional[TaylorCapture], gates: Sequence[Tensor],
                   grads: Sequence[Tensor], depth: int, flat: bool) -> Dict[str, Tensor]:
        """One chunk's per-unit sums per component; a batch's sums are those of its chunks added.
        `gates`: heads per block, MLP per block (`depth` blocks), the embedding gates; `flat`: a
        Swin's flat criteria."""
        return {c: capture.result(c) for c in COMPONENTS}

    def batch_score(self, sums: Tensor, batch: int, tokens) -> Tensor:
        """One batch's per-unit score from its sums; `tokens`: the token count N (a ViT's), or each
        unit's own (a tensor: a Swin unit's stage's H * W)."""
        return sums

    def batch_weight(self, batch: int, tokens) -> int:
        """What one batch adds to the divisor of the summed scores (`tokens`: a ViT's N, or None
        when each unit has its own)."""
        return 1


class MeanAbsTaylor(Criterion):
    """Method 1: mean_{b,n} |t| per batch."""

    def batch_score(self, sums: Tensor, batch: int, tokens) -> Tensor:
        return sums / (batch * tokens)


class SquaredGateGradient(Criterion):
    """Method 2 ("method 22" of Molchanov et al. 2019): (g * dL/dg)^2, the squared minibatch gate gradient."""

    uses_taylor = False

    def chunk_sums(self, capture: Optional[TaylorCapture], gates: Sequence[Tensor],
                   grads: Sequence[Tensor], depth: int, flat: bool) -> Dict[str, Tensor]:
        gg = [(g.detach() * d.detach()).double() for g, d in zip(gates, grads)]
        join = torch.cat if flat else torch.stack
        return {"heads": join(gg[:depth]), "mlp": join(gg[depth:2 * depth]), "embed": torch.cat(gg[2 * depth:])}

    def batch_score(self, sums: Tensor, batch: int, tokens) -> Tensor:
        return sums.pow(2)  # squared once the whole batch is in


class SquaredTokenSum(Criterion):
    """Method 3: sum_b (sum_n t)^2 per batch."""

    def reduce(self, t: Tensor) -> Tensor:
        return t.double().sum(1).pow(2).sum(0)


class SumAbsTaylor(Criterion):
    """Method 4 (Michel et al. 2019): sum_{b,n} |t|, normalised by all (sample, token) positions seen
    (units with their own token counts: each batch's sums divided by them, the divisor counts samples)."""

    def batch_score(self, sums: Tensor, batch: int, tokens) -> Tensor:
        return sums / tokens if isinstance(tokens, Tensor) else sums

    def batch_weight(self, batch: int, tokens) -> int:
        return batch * tokens if tokens is not None else batch


CRITERIA: Dict[int, Criterion] = {1: MeanAbsTaylor(), 2: SquaredGateGradient(), 3: SquaredTokenSum(),
                                  4: SumAbsTaylor()}
