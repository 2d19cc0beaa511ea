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
    head_dim channels of a head). Heads and MLP gates are reduced at once (t is not kept); the
    shared embedding gate sums t over its 2 * depth + 1 applications first.
    """

    def __init__(self, model: nn.Module, reduce: Callable[[Tensor], Tensor]):
        self.depth = len(model.blocks)
        self.reduce = reduce
        self.embed_t: Optional[Tensor] = None  # (B, N, D): summed over the gate's applications
        self.stats: Dict[Tuple[str, int], Tensor] = {}  # (component, block) -> [units]
        self._tensor_hooks = []
        gates = [("heads", b, g) for b, g in enumerate(model.head_gates())]
        gates += [("mlp", b, g) for b, g in enumerate(model.mlp_gates())] + [("embed", 0, model.res_gate)]
        self._module_hooks = [g.register_forward_hook(self._forward_hook(c, b)) for c, b, g in gates]

    def _forward_hook(self, component: str, block: int) -> Callable:
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            if output.requires_grad:
                self._tensor_hooks.append(output.register_hook(self._grad_hook(component, block, output)))

        return hook

    def _grad_hook(self, component: str, block: int, output: Tensor) -> Callable:
        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                t = grad.detach() * output.detach()  # grad_output * output
                if component == "heads":  # (B, heads, N, head_dim) -> (B, N, heads): sum a head's channels
                    self.stats[(component, block)] = self.reduce(t.sum(-1).transpose(1, 2))
                elif component == "mlp":
                    self.stats[(component, block)] = self.reduce(t)
                else:
                    self.embed_t = t if self.embed_t is None else self.embed_t + t

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
        """The statistics of a component: [depth, units] for heads/mlp, [D] for embed."""
        if component == "embed":
            return self.reduce(self.embed_t)
        return torch.stack([self.stats[(component, b)] for b in range(self.depth)])


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
                   grads: Sequence[Tensor]) -> Dict[str, Tensor]:
        """One chunk's per-unit sums per component; a batch's sums are those of its chunks added."""
        return {c: capture.result(c) for c in COMPONENTS}

    def batch_score(self, sums: Tensor, batch: int, tokens: int) -> Tensor:
        """One batch's per-unit score from its sums."""
        return sums

    def batch_weight(self, batch: int, tokens: int) -> int:
        """What one batch adds to the divisor of the summed scores."""
        return 1


class MeanAbsTaylor(Criterion):
    """Method 1: mean_{b,n} |t| per batch."""

    def batch_score(self, sums: Tensor, batch: int, tokens: int) -> Tensor:
        return sums / (batch * tokens)


class SquaredGateGradient(Criterion):
    """Method 2 ("method 22" of Molchanov et al. 2019): (g * dL/dg)^2, the squared minibatch gate gradient."""

    uses_taylor = False

    def chunk_sums(self, capture: Optional[TaylorCapture], gates: Sequence[Tensor],
                   grads: Sequence[Tensor]) -> Dict[str, Tensor]:
        depth = len(gates) // 2  # gates: heads per block, MLP per block, the embedding gate
        gg = [(g.detach() * d.detach()).double() for g, d in zip(gates, grads)]
        return {"heads": torch.stack(gg[:depth]), "mlp": torch.stack(gg[depth:2 * depth]), "embed": gg[-1]}

    def batch_score(self, sums: Tensor, batch: int, tokens: int) -> Tensor:
        return sums.pow(2)  # squared once the whole batch is in


class SquaredTokenSum(Criterion):
    """Method 3: sum_b (sum_n t)^2 per batch."""

    def reduce(self, t: Tensor) -> Tensor:
        return t.double().sum(1).pow(2).sum(0)


class SumAbsTaylor(Criterion):
    """Method 4 (Michel et al. 2019): sum_{b,n} |t|, normalised by all (sample, token) positions seen."""

    def batch_weight(self, batch: int, tokens: int) -> int:
        return batch * tokens


CRITERIA: Dict[int, Criterion] = {1: MeanAbsTaylor(), 2: SquaredGateGradient(), 3: SquaredTokenSum(),
                                  4: SumAbsTaylor()}
