"""Closed-form compensation of the kept weights after pruning (docs/METHOD.md section 5.1).

Each block's two output projections (`attn.proj` over the heads' channels, `mlp.fc2` over the
MLP neurons) are refit, block by block in order, so that the pruned branch reproduces the
unpruned branch on the calibration activations of the already-compensated model:

  * `bias`: b' = b + W_P mean(z_P): the removed units' mean contribution moves into the bias;
  * `ls`:   [W'_K, b'] = argmin sum ||W'_K z_K + b' - (W z + b)||^2 + ridge * sum ||W'_K||^2
    (ridge relative to the mean second moment of the kept inputs), in float64 from the
    moments S = sum [z; 1][z; 1]^T of the projection's full input z (every unit's, gate open).

Only the moments are summed over the batches (all-reduced under torch.distributed), so the
result does not depend on the number of processes beyond float rounding. The gates, hence
the mask and the MACs, are never changed.
"""
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

COMPENSATIONS = ("none", "bias", "ls")


class _Reached(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def branch_outputs(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Linear, int]]:
    """(name, gate, output projection, input channels per unit) of every branch, in forward order."""
    blocks = model.all_blocks() if hasattr(model, "all_blocks") else list(model.blocks)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for block in blocks:
        out.append((names[id(block.attn.proj)], block.attn.attn_gate, block.attn.proj, block.attn.head_dim))
        out.append((names[id(block.mlp.fc2)], block.mlp.hidden_gate1, block.mlp.fc2, 1))
    return out


@torch.no_grad()
def input_moments(model: nn.Module, gate: nn.Module, linear: nn.Linear, images: Iterable[torch.Tensor],
                  device: torch.device) -> torch.Tensor:
    """S = sum over calibration tokens of [z; 1][z; 1]^T (float64), z the full input of `linear`:
    `gate` is opened (all ones) for the pass, so the pruned units' activations are seen too."""
    n = linear.in_features
    moments = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=device)

    def capture(_module, inputs):
        z = inputs[0].reshape(-1, n).double()
        z = torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)
        moments.add_(z.T @ z)
        raise _Reached

    saved = gate.weight.detach().clone()
    gate.weight.fill_(1.0)
    handle = linear.register_forward_pre_hook(capture)
    try:
        for batch in images:
            try:
                model(batch.to(device, non_blocking=True))
            except _Reached:
                pass
    finally:
        handle.remove()
        gate.weight.copy_(saved)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    return moments


def refit(weight: torch.Tensor, bias: torch.Tensor, moments: torch.Tensor, kept: torch.Tensor, method: str,
          ridge: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """New (weight, bias) of a Linear y = W z + b whose inputs `kept` (bool, one per column) remain.

    The pruned columns of the weight are left as they are (their inputs are gated to zero).
    """
    S = moments.detach().double().cpu()
    W = torch.cat([weight.detach().double().cpu(), bias.detach().double().cpu()[:, None]], dim=1)
    n = weight.shape[1]
    keep = kept.detach().bool().cpu()
    new_weight, new_bias = weight.detach().clone(), bias.detach().clone()
    if method == "bias":
        mean = S[n, :n] / S[n, n]
        pruned = ~keep
        shift = W[:, :n][:, pruned] @ mean[pruned]
        new_bias += shift.to(bias.dtype).to(bias.device)
        return new_weight, new_bias
    if method != "ls":
        raise ValueError(f"unknown compensation {method!r}; expected one of {COMPENSATIONS}")
    cols = torch.cat([keep.nonzero().flatten(), torch.tensor([n])])  # kept inputs and the constant 1
    gram = S[cols][:, cols].clone()
    k = cols.numel() - 1
    if ridge > 0 and k > 0:
        idx = torch.arange(k)
        gram[idx, idx] += ridge * gram[idx, idx].mean()
    rhs = S[cols] @ W.T  # (k+1, out): sum [z_K; 1] (W z + b)^T
    solution = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution.T  # (out, k+1); min-norm if singular
    new_weight[:, keep] = solution[:, :k].to(weight.dtype).to(weight.device)
    new_bias.copy_(solution[:, k].to(bias.dtype))
    return new_weight, new_bias


def _kept_columns(gate: nn.Module, unit_width: int) -> torch.Tensor:
    return (gate.weight.detach() != 0).repeat_interleave(unit_width)


@torch.no_grad()
def compensate(model: nn.Module, images: List[torch.Tensor], method: str, ridge: float = 0.0,
               device: Optional[torch.device] = None, log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Compensate a gated model (its 0/1 gates set) in place; returns one record per refit layer.

    Args:
        model: GatedViT or GatedSwin with the mask applied to its gates.
        images: the calibration batches (this process's share under torch.distributed).
        method: 'bias' or 'ls' ('none' returns at once).
        ridge: `ls` only: ridge * mean(diag) of the kept inputs' moments is added to their diagonal.
    """
    if method == "none":
        return []
    device = device or next(model.parameters()).device
    was_training, was_aware = model.training, model.mask_aware_norm
    model.eval()
    model.mask_aware_norm = True  # the deploy model's LayerNorms: compensate what will run
    records = []
    try:
        for name, gate, linear, unit_width in branch_outputs(model):
            kept = _kept_columns(gate, unit_width)
            if bool(kept.all()):
                continue
            moments = input_moments(model, gate, linear, images, device)
            before = _branch_error(moments, linear.weight, linear.bias, linear.weight, linear.bias, kept)
            weight, bias = refit(linear.weight, linear.bias, moments, kept, method, ridge)
            after = _branch_error(moments, linear.weight, linear.bias, weight, bias, kept)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
            records.append({"layer": name, "kept_inputs": int(kept.sum()), "inputs": int(kept.numel()),
                            "relative_error_before": before, "relative_error_after": after})
            log(f"compensation {method}: {name}: kept {int(kept.sum())}/{kept.numel()} inputs, relative output "
                f"error {before:.4f} -> {after:.4f}")
    finally:
        model.train(was_training)
        model.mask_aware_norm = was_aware
    return records


def _branch_error(moments: torch.Tensor, weight, bias, new_weight, new_bias, kept: torch.Tensor) -> float:
    """sqrt(E||y' - y||^2 / E||y||^2) over the calibration tokens, from the moments alone:
    y = [W b][z; 1] (unpruned), y' = [W'_K b'][z_K; 1] (pruned)."""
    S = moments.double().cpu()
    full = torch.cat([weight.double().cpu(), bias.double().cpu()[:, None]], dim=1)
    mask = torch.cat([kept.cpu().double(), torch.ones(1, dtype=torch.float64)])
    pruned = torch.cat([new_weight.double().cpu(), new_bias.double().cpu()[:, None]], dim=1) * mask
    diff = pruned - full
    num = torch.einsum("oi,ij,oj->", diff, S, diff)
    den = torch.einsum("oi,ij,oj->", full, S, full)
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())
