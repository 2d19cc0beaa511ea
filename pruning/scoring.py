"""The pruning pass (docs/METHOD.md sections 2-3): one pass over a few training batches that sums
a first-order criterion (`pruning.criteria`) and optionally the interaction matrix C
(`pruning.interactions`); the sums are all-reduced over processes, then divided.
"""
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from pruning.criteria import CRITERIA, TaylorCapture
from pruning.interactions import ESTIMATORS, add_interactions, block_draw, block_scales, interaction_normalisers
from pruning.mask import COMPONENTS, criteria_shapes, group_sizes
from utils import UserError, format_seconds

METHODS = tuple(CRITERIA)
_STATE_KEYS = COMPONENTS + ("interactions", "denominator", "batches")


@contextmanager
def gates_only_grad(model: nn.Module) -> Iterator[List[nn.Parameter]]:
    """Within the block only the gate weights of `model` (a `GatedViT` or `GatedSwin`) require grad, in
    eval mode; both (every module's mode) are restored after. Yields the gates: heads per block, MLP per block, the
    embedding gate(s)."""
    gates = model.gate_parameters()
    gate_ids = {id(g) for g in gates}
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]  # per module: a model in mixed modes comes back as it was
    try:
        for p in params:
            p.requires_grad_(id(p) in gate_ids)
        model.eval()
        yield gates
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


class PruningScorer:
    """Accumulates the first-order criteria and (optionally) the interaction matrix C.

    Model in eval mode, fp32, no optimiser step; only the GATES get gradients (every network
    weight has `requires_grad=False` during the pass). Per batch: 1 backward
    `autograd.grad(loss, gates, create_graph=need_hessian)`, then with `need_hessian` one
    Hessian-vector product per row of C (2K + 1 with K = `hessian_blocks`). C and the criteria average the SAME batches.

    Args:
        model: a `GatedViT` or `GatedSwin` (any device); its flags and mode are restored after each batch.
        criterion: `criterion(outputs, targets) -> scalar loss`; targets may be soft (mixup). A model
            with `takes_targets = True` is called as `model(images, targets)` (e.g. a detector that
            returns its training loss; `models.swin_features.DetectorLoss`).
        method: `--pruning_method`, 1..4 (section 2).
        need_hessian: also estimate the 3x3 interaction matrix (section 3).
        hessian_embed: `--hessian_embed`, scales the embedding normaliser.
        seed: the run's seed, for the block draws.
        estimator: `--hessian_estimator`: 'reference' (one block m per pair) or 'rb' (the exact mean
            over m <= l; same expectation, same cost; `pruning.interactions.add_interactions`).
        hessian_blocks: `--hessian_blocks` K: draws of l per batch, averaged (2 more products each).
        micro_batch: process each batch in chunks of at most this many samples, whose losses are
            weighted by chunk size / batch size: gradients, Taylor terms and Hessian-vector products
            add up to the whole batch's (for a criterion that averages per-sample losses, as DeiT's
            do), with the same draws, at a memory cost proportional to the chunk; None or 0: whole batches.
    """

    def __init__(self, model: nn.Module, criterion: Callable, method: int = 2, need_hessian: bool = False,
                 hessian_embed: float = 6.0, seed: int = 0, micro_batch: Optional[int] = None,
                 estimator: str = "reference", hessian_blocks: int = 1):
        if method not in METHODS:
            raise UserError(f"must be one of {METHODS}, got {method!r}", field="pruning_method")
        if need_hessian and not hessian_embed > 0:
            raise UserError(f"must be > 0, got {hessian_embed!r}", field="hessian_embed")
        if estimator not in ESTIMATORS:
            raise UserError(f"must be one of {'|'.join(ESTIMATORS)}, got {estimator!r}", field="hessian_estimator")
        if isinstance(hessian_blocks, bool) or not isinstance(hessian_blocks, int) or hessian_blocks < 1:
            raise UserError(f"must be an integer >= 1, got {hessian_blocks!r}", field="hessian_blocks")
        if micro_batch is not None and micro_batch < 0:
            raise UserError(f"must be >= 1 (or 0 for whole batches), got {micro_batch}", field="pruning_micro_batch")
        self.model = model
        self.arch = model.arch
        self.criterion = criterion
        self.method = method
        self.first_order = CRITERIA[method]
        self.need_hessian = need_hessian
        self.seed = seed
        self.estimator = estimator
        self.hessian_blocks = hessian_blocks
        self.micro_batch = micro_batch or None
        self.device = model.patch_embed.proj.weight.device
        self.normalisers = interaction_normalisers(self.arch, hessian_embed).to(self.device)
        self.scales = block_scales(self.arch).to(self.device)
        self.embed_gates = len(model.embed_gates())
        self.flat = self.arch.family == "swin"
        self.tokens = self.arch.num_tokens if not self.flat else _unit_tokens(self.arch)
        shapes = dict(criteria_shapes(self.arch), interactions=(3, 3), denominator=(), batches=())
        self._state = {k: torch.zeros(shapes[k], dtype=torch.float64, device=self.device) for k in _STATE_KEYS}
        self.last_loss = float("nan")

    def score_batch(self, images: torch.Tensor, targets, batch_index: int) -> float:
        """Add one batch's criteria (and interactions) to the sums; returns its loss.

        Args:
            images: a batch of images.
            targets: class indices or soft targets, as `criterion` expects.
            batch_index: the GLOBAL index of this batch in the pass (for the block draws).
        """
        dtype = self.model.patch_embed.proj.weight.dtype  # fp32 in practice (no autocast: fp16 gives NaN here)
        images = images.to(self.device, dtype=dtype, non_blocking=True)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(self.device, non_blocking=True)
        batch = images.shape[0]
        step = batch if not self.micro_batch else self.micro_batch
        if step < batch and not isinstance(targets, torch.Tensor):
            raise TypeError("micro-batches need the targets as one tensor")
        draws = self._draws(batch_index) if self.need_hessian else None
        sums: Dict[str, torch.Tensor] = {}  # this batch's per-unit sums
        loss_total = 0.0
        with gates_only_grad(self.model) as gates, torch.enable_grad(), \
                torch.autocast(self.device.type, enabled=False):
            for start in range(0, batch, step):
                chunk = slice(start, min(start + step, batch))
                weight = (chunk.stop - chunk.start) / batch if step < batch else None
                loss, grads, part = self._backward(images[chunk], targets[chunk] if weight is not None else targets,
                                                   weight, gates, batch_index)
                for k, v in part.items():
                    sums[k] = v if k not in sums else sums[k] + v
                if draws is not None:
                    add_interactions(self._state["interactions"], self.normalisers, gates, grads, draws,
                                     self.estimator, self.scales, self.embed_gates)
                del grads
                loss_total += loss.item()
        with torch.no_grad():
            for c in COMPONENTS:
                tokens = self.tokens[c].to(self.device) if self.flat else self.tokens
                self._state[c] += self.first_order.batch_score(sums[c], batch, tokens)
            self._state["denominator"] += self.first_order.batch_weight(batch, None if self.flat else self.tokens)
            self._state["batches"] += 1
        self.last_loss = loss_total
        return loss_total

    def _draws(self, batch_index: int) -> list:
        """The `hessian_blocks` block draws of a batch: the first is the reference's, the others are
        keyed by (seed, global batch index, draw), so every process and run sees the same."""
        depth = self.arch.depth
        return [block_draw(self.seed, batch_index, depth)] + [
            block_draw(self.seed, batch_index, depth, draw=k) for k in range(1, self.hessian_blocks)]

    def _backward(self, images: torch.Tensor, targets, weight: Optional[float], gates: Sequence[torch.Tensor],
                  batch_index: int) -> Tuple[torch.Tensor, Sequence[torch.Tensor], Dict[str, torch.Tensor]]:
        """Loss (times `weight`), gate gradients and the criterion's per-unit sums of one chunk."""
        capture = TaylorCapture(self.model, self.first_order.reduce) if self.first_order.uses_taylor else None
        try:  # a model that needs the targets to give its outputs (a detector's losses) says so
            outputs = self.model(images, targets) if getattr(self.model, "takes_targets", False) else self.model(images)
            if capture is not None:
                capture.stop_forward()
            loss = self.criterion(outputs, targets)
            if loss.dim():
                raise ValueError(f"criterion must return a scalar loss, got shape {tuple(loss.shape)}")
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss ({loss.item()}) at batch {batch_index} of the pruning pass")
            if weight is not None:
                loss = loss * weight
            grads = torch.autograd.grad(loss, gates, create_graph=self.need_hessian)
        finally:
            if capture is not None:
                capture.stop()
        with torch.no_grad():
            return loss, grads, self.first_order.chunk_sums(capture, gates, grads, self.arch.depth, self.flat)

    def score_batches(self, batches: Iterable, num_batches: int, first_index: int = 0, index_stride: int = 1,
                      log: Optional[Callable[[str], None]] = print, log_every: int = 10,
                      log_seconds: float = 30.0) -> None:
        """Score the first `num_batches` batches of `batches`, logging progress.

        Batch k of this process has the global index `first_index + k * index_stride`
        (rank r of W processes scoring interleaved shards: first_index=r, index_stride=W).

        Args:
            batches: an iterable of `(images, targets)`, e.g. a DataLoader.
            num_batches: how many batches to take from it (at least 1).
            first_index: global index of the first batch.
            index_stride: step between the global indices of consecutive batches.
            log: called with one progress line; None for silence.
            log_every: log every this many batches (and the last one).
            log_seconds: also log after a batch that ends this many seconds or more after the
                previous line (or the start): a slow pass is never silent for long.
        """
        if num_batches < 1:
            raise UserError(f"the pruning pass needs at least one batch, got {num_batches}")
        start = last_line = time.time()
        samples = 0
        is_cuda = self.device.type == "cuda"
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        k = -1
        for k, (images, targets) in enumerate(batches):
            if k >= num_batches:
                break
            self.score_batch(images, targets, first_index + k * index_stride)
            samples += images.shape[0]
            done = k + 1
            now = time.time()
            if log is not None and (done % max(1, log_every) == 0 or done == num_batches
                                    or now - last_line >= log_seconds):
                last_line = now
                elapsed = now - start
                eta = elapsed / done * (num_batches - done)
                line = (f"pruning pass: [{done:>{len(str(num_batches))}}/{num_batches}]  eta {format_seconds(eta)}  "
                        f"{samples / max(elapsed, 1e-9):.1f} samples/s  loss {self.last_loss:.4f}")
                if is_cuda:
                    line += f"  max mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.0f} MB"
                log(line)
        if k + 1 < num_batches:
            raise UserError(f"the pruning pass expected {num_batches} batches but the data gave only {k + 1}")

    def state(self) -> Dict[str, torch.Tensor]:
        """The accumulators (float64 tensors on the model's device): sums over batches."""
        return {k: v.clone() for k, v in self._state.items()}

    def finalize(self, state: Optional[Dict[str, torch.Tensor]] = None
                 ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Criteria and C from `state` (default: this scorer's own, e.g. after `all_reduce_state`).

        Args:
            state: accumulators as returned by `state()` (possibly summed over processes).

        Returns:
            ({'heads': [depth, heads], 'mlp': [depth, hidden], 'embed': [D]}, C [3, 3] or None
            without `need_hessian`), float64 CPU tensors.
        """
        state = self.state() if state is None else state
        batches = float(state["batches"])
        if batches < 1:
            raise UserError("the pruning pass scored no batch (empty training data?)")
        criteria = {c: (state[c] / float(state["denominator"])).cpu() for c in COMPONENTS}
        interactions = (state["interactions"] / batches).cpu() if self.need_hessian else None
        return criteria, interactions


def sum_states(states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Add up scorer states (e.g. of shards scored separately in one process)."""
    return {k: sum(s[k] for s in states) for k in _STATE_KEYS}


def all_reduce_state(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Sum a scorer state over all processes (one collective); a no-op without torch.distributed.

    Args:
        state: as returned by `PruningScorer.state()`; every process passes the same shapes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    flat = torch.cat([state[k].reshape(-1) for k in _STATE_KEYS])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for k in _STATE_KEYS:
        n = state[k].numel()
        out[k] = flat[offset:offset + n].view_as(state[k])
        offset += n
    return out


def _unit_tokens(arch) -> Dict[str, torch.Tensor]:
    """A Swin unit's token count: the H * W tokens of its stage, per unit of each component (flat)."""
    tokens = [float(arch.resolutions[s] ** 2) for s in arch.stage_of_block()]
    stage_tokens = [float(r * r) for r in arch.resolutions]
    per_group = {"heads": tokens, "mlp": tokens, "embed": stage_tokens}
    return {c: torch.cat([torch.full((n,), t, dtype=torch.float64) for n, t in zip(sizes, per_group[c])])
            for c, sizes in group_sizes(arch).items()}
