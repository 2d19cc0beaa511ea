"""Importance of SAViT's prunable units and the 3x3 interaction matrix (docs/METHOD.md sections 2-3).

One pass over a few training batches, model in eval mode, fp32, no optimiser step.
Only the GATES get gradients: during the pass every network weight has
`requires_grad=False` (restored afterwards), so no weight gradient is ever computed.
Per batch:

  1 backward         `torch.autograd.grad(loss, gates, create_graph=need_hessian)`;
  3 double-backwards (only with `need_hessian`) -- one Hessian-vector product per row of C.

First-order criteria (section 2). Let t[b, n, u] be unit u's Taylor term at token n of
sample b: grad_output * output at its gate, summed over the unit's own channels (the
head_dim channels of a head) and, for the shared embedding gate, over all of its
2 * depth + 1 applications. Then sum_{b,n} t[b, n, u] = g_u * dL/dg_u and per batch

  method 1: mean_{b,n} |t|            method 2: (g_u * dL/dg_u)^2
  method 3: sum_b (sum_n t)^2         method 4: sum_{b,n} |t|, denominator B * N

Across batches methods 1-3 are summed and divided by the number of batches, method 4
by the sum of its denominators. t is captured with forward hooks on the `Gate` modules
that put tensor hooks on their outputs; method 2 needs no hooks.

Interactions (section 3). Per batch, a block l is drawn uniformly over blocks and, for
every pair (i, j) with i, j in {heads, mlp}, a block m[i][j] uniformly in [0, l] (the
reference draws m per pair; so do we). For the embedding row (i = embed) the reference
uses block 0 for both columns, and so do we: m[embed] = (0, 0). Row i of C is ONE Hessian-vector product:
differentiate s_i = dL/dg_i[l] . 1 (for embed the one shared vector) with respect to
g_heads[m[i][0]], g_mlp[m[i][1]] and g_embed together, and add the sum of each vector,
divided by N[i, j] = n_i * n_j (n_heads = D, n_mlp = mlp hidden = 4D,
n_embed = D * depth * hessian_embed). C is finally divided by the number of batches: C and
the criteria average the SAME batches (the reference's loop scores C on one batch more than
its criteria, int(feed * len) + 1 against int(feed * len); we do not copy that).
The draws come from `block_draw(seed, batch_index, depth)`: they depend on the GLOBAL
batch index only, so batches sharded over processes see the same draws as in one process.

Accumulators are tensors (`state()`), summed over processes by `all_reduce_state` and
turned into criteria and C by `finalize`.

Memory: the forward activations plus the graph that `create_graph` keeps dominate (on
DeiT-S, batch 8, about half of a reference-style pass's peak). `micro_batch` splits each
batch into chunks whose losses are weighted by chunk size / batch size; gradients, Taylor
terms and Hessian-vector products then add up to exactly the whole batch's (for a
criterion that averages per-sample losses, as all DeiT criteria do), with the same block
draws, at a memory cost proportional to the chunk size.
"""
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from models.deit_base import DeiTArch
from utils import UserError, atomic_write_pickle, load_numpy_pickle

COMPONENTS = ("heads", "mlp", "embed")  # component (layer) 0, 1, 2 of the reference
METHODS = (1, 2, 3, 4)
HESSIAN_FILE = "hessian.pickle"
_STATE_KEYS = ("heads", "mlp", "embed", "interactions", "denominator", "batches")


def criteria_filename(method: int, layer: int) -> str:
    """The reference's file name for the criteria of component `layer` (0 heads, 1 mlp, 2 embed)."""
    return f"criteria_m{method}l{layer}_final.pickle"


def criteria_shapes(arch: DeiTArch) -> Dict[str, Tuple[int, ...]]:
    """Shapes of the criteria of each component: [depth, heads], [depth, mlp hidden], [embed dim]."""
    return {"heads": (arch.depth, arch.num_heads), "mlp": (arch.depth, arch.mlp_hidden), "embed": (arch.embed_dim,)}


def interaction_normalisers(arch: DeiTArch, hessian_embed: float) -> torch.Tensor:
    """N[i, j] = n_i * n_j with n = (D, mlp hidden, D * depth * hessian_embed), float64 [3, 3]."""
    d = float(arch.embed_dim)
    n = torch.tensor([d, float(arch.mlp_hidden), d * arch.depth * hessian_embed], dtype=torch.float64)
    return n[:, None] * n[None, :]


@dataclass(frozen=True)
class BlockDraw:
    """The random blocks of one batch: `l` for g_i, `m[i][j]` for g_j (j = 0 heads, 1 mlp).

    m[2] (the embedding row) is always (0, 0), as in the reference.
    """

    l: int
    m: Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]


def block_draw(seed: int, batch_index: int, depth: int) -> BlockDraw:
    """Draw the blocks of batch `batch_index` from a private generator.

    Args:
        seed: the run's seed.
        batch_index: the global index of the batch in the pass (not the per-process one).
        depth: the number of blocks.
    """
    rng = random.Random(f"savit-interactions:{seed}:{batch_index}")  # str seeds hash with sha512: stable
    l = rng.randrange(depth)
    # heads and MLP rows: m in [0, l] per pair; embedding row: block 0 for both columns (the reference's)
    m = tuple((rng.randint(0, l), rng.randint(0, l)) for _ in range(2)) + ((0, 0),)
    return BlockDraw(l, m)


@contextmanager
def gates_only_grad(model: nn.Module) -> Iterator[List[nn.Parameter]]:
    """Within the block only the gate weights require grad; eval mode. Both are restored after.

    Args:
        model: a `GatedDeiT`.

    Yields:
        the gate weights: heads per block, MLP per block, then the shared embedding gate.
    """
    gates = model.gate_parameters()
    gate_ids = {id(g) for g in gates}
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(id(p) in gate_ids)
        model.eval()
        yield gates
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        model.train(was_training)


class _TaylorCapture:
    """Per-unit statistics `reduce(t)` of the Taylor terms t[b, n, u] of every gate, from hooks.

    A forward hook on each `Gate` puts a tensor hook on its output; the tensor hook gets
    grad_output and forms t. Heads and MLP gates are reduced at once (t is not kept); the
    shared embedding gate sums t over its applications first.
    """

    def __init__(self, model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.depth = len(model.blocks)
        self.reduce = reduce
        self.embed_t: Optional[torch.Tensor] = None  # (B, N, D): summed over the gate's applications
        self.stats: Dict[Tuple[str, int], torch.Tensor] = {}  # (component, block) -> [units]
        self._tensor_hooks = []
        self._module_hooks = []
        for block, gate in enumerate(model.head_gates()):
            self._module_hooks.append(gate.register_forward_hook(self._forward_hook("heads", block)))
        for block, gate in enumerate(model.mlp_gates()):
            self._module_hooks.append(gate.register_forward_hook(self._forward_hook("mlp", block)))
        self._module_hooks.append(model.res_gate.register_forward_hook(self._forward_hook("embed", 0)))

    def _forward_hook(self, component: str, block: int) -> Callable:
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if output.requires_grad:
                self._tensor_hooks.append(output.register_hook(self._grad_hook(component, block, output)))

        return hook

    def _grad_hook(self, component: str, block: int, output: torch.Tensor) -> Callable:
        def hook(grad: torch.Tensor) -> None:
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

    def result(self, component: str) -> torch.Tensor:
        """The statistics of a component: [depth, units] for heads/mlp, [D] for embed."""
        if component == "embed":
            return self.reduce(self.embed_t)
        return torch.stack([self.stats[(component, b)] for b in range(self.depth)])


class PruningScorer:
    """Accumulates the first-order criteria and (optionally) the interaction matrix C.

    Args:
        model: a `GatedDeiT` (any device); its flags and mode are restored after each batch.
        criterion: `criterion(outputs, targets) -> scalar loss`; targets may be soft (mixup).
        method: `--pruning_method`, 1..4 (section 2).
        need_hessian: also estimate the 3x3 interaction matrix (section 3).
        hessian_embed: `--hessian_embed`, scales the embedding normaliser.
        seed: the run's seed, for the block draws.
        micro_batch: process each batch in chunks of at most this many samples (same results
            for a criterion that averages per-sample losses, as DeiT's do; less memory);
            None or 0: whole batches.
    """

    def __init__(self, model: nn.Module, criterion: Callable, method: int = 2, need_hessian: bool = False,
                 hessian_embed: float = 6.0, seed: int = 0, micro_batch: Optional[int] = None):
        if method not in METHODS:
            raise UserError(f"--pruning_method must be one of {METHODS}, got {method!r}")
        if need_hessian and not hessian_embed > 0:
            raise UserError(f"--hessian_embed must be > 0, got {hessian_embed!r}")
        self.model = model
        self.arch: DeiTArch = model.arch
        self.criterion = criterion
        self.method = method
        self.need_hessian = need_hessian
        self.hessian_embed = hessian_embed
        self.seed = seed
        if micro_batch is not None and micro_batch < 0:
            raise UserError(f"the pruning micro-batch must be >= 1 (or 0 for whole batches), got {micro_batch}")
        self.micro_batch = micro_batch or None
        self.device = model.res_gate.weight.device
        self.normalisers = interaction_normalisers(self.arch, hessian_embed).to(self.device)
        shapes = criteria_shapes(self.arch)
        f64 = dict(dtype=torch.float64, device=self.device)
        self._sums = {c: torch.zeros(shapes[c], **f64) for c in COMPONENTS}
        self._interactions = torch.zeros(3, 3, **f64)
        self._denominator = torch.zeros((), **f64)
        self._batches = torch.zeros((), **f64)
        self.last_loss = float("nan")

    # -- one batch -------------------------------------------------------------------
    def score_batch(self, images: torch.Tensor, targets, batch_index: int) -> float:
        """Add one batch's criteria (and interactions) to the sums; returns its loss.

        With `micro_batch`, the batch is processed in chunks whose losses are weighted by
        chunk size / batch size, so that gradients, Taylor terms and Hessian-vector products
        add up to those of the whole batch (the criterion must average per-sample losses).

        Args:
            images: a batch of images.
            targets: class indices or soft targets, as `criterion` expects.
            batch_index: the GLOBAL index of this batch in the pass (for the block draws).
        """
        model = self.model
        dtype = model.patch_embed.proj.weight.dtype  # fp32 in practice (no autocast: fp16 gives NaN here)
        images = images.to(self.device, dtype=dtype, non_blocking=True)
        if isinstance(targets, torch.Tensor):
            targets = targets.to(self.device, non_blocking=True)
        batch = images.shape[0]
        step = batch if not self.micro_batch else self.micro_batch
        if step < batch and not isinstance(targets, torch.Tensor):
            raise TypeError("micro-batches need the targets as one tensor")
        draw = block_draw(self.seed, batch_index, self.arch.depth) if self.need_hessian else None
        sums = {}  # this batch's sums: gate gradients (method 2) or Taylor-term statistics
        loss_total = 0.0
        with gates_only_grad(model) as gates, torch.enable_grad(), \
                torch.autocast(self.device.type, enabled=False):
            for start in range(0, batch, step):
                chunk = slice(start, min(start + step, batch))
                capture = _TaylorCapture(model, self._taylor_statistic) if self.method != 2 else None
                try:
                    outputs = model(images[chunk])
                    if capture is not None:
                        capture.stop_forward()
                    loss = self.criterion(outputs, targets[chunk] if step < batch else targets)
                    if loss.dim():
                        raise ValueError(f"criterion must return a scalar loss, got shape {tuple(loss.shape)}")
                    if not torch.isfinite(loss):
                        raise UserError(f"non-finite loss ({loss.item()}) at batch {batch_index} of the pruning pass")
                    if step < batch:
                        loss = loss * ((chunk.stop - chunk.start) / batch)
                    grads = torch.autograd.grad(loss, gates, create_graph=self.need_hessian)
                finally:
                    if capture is not None:
                        capture.stop()
                self._add_first_order(sums, gates, grads, capture)
                if self.need_hessian:
                    self._add_interactions(gates, grads, draw)
                del grads, outputs
                loss_total += loss.item()
        self._close_batch(sums, batch)
        self.last_loss = loss_total
        return loss_total

    def _add_first_order(self, sums: Dict[str, torch.Tensor], gates: Sequence[torch.Tensor],
                         grads: Sequence[torch.Tensor], capture: Optional[_TaylorCapture]) -> None:
        """Add one chunk's contribution (all of it additive over samples) to this batch's `sums`."""
        depth = self.arch.depth
        with torch.no_grad():
            if self.method == 2:  # g * dL/dg, squared once the whole batch is in (_close_batch)
                gg = [(g.detach() * d.detach()).double() for g, d in zip(gates, grads)]
                part = {"heads": torch.stack(gg[:depth]), "mlp": torch.stack(gg[depth:2 * depth]), "embed": gg[-1]}
            else:
                part = {c: capture.result(c) for c in COMPONENTS}
                sums["tokens"] = capture.embed_t.shape[1]
            for k, v in part.items():
                sums[k] = v if k not in sums else sums[k] + v

    def _taylor_statistic(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit sum over one chunk of t (B, N, units): of |t| (methods 1, 4) or of (sum_n t)^2 (3)."""
        t = t.double()
        return t.sum(1).pow(2).sum(0) if self.method == 3 else t.abs().sum((0, 1))

    def _close_batch(self, sums: Dict[str, torch.Tensor], batch: int) -> None:
        """Turn one batch's sums into its per-batch scores (section 2 table) and add them up."""
        with torch.no_grad():
            for c in COMPONENTS:
                if self.method == 2:
                    # "method 22" of Molchanov et al. 2019: (g * dL/dg)^2, the squared minibatch gate gradient
                    self._sums[c] += sums[c].pow(2)
                elif self.method == 1:  # mean over batch and tokens
                    self._sums[c] += sums[c] / (batch * sums["tokens"])
                else:  # 3: already sum_b (sum_n t)^2; 4: sum over batch and tokens
                    self._sums[c] += sums[c]
            if self.method == 4:  # Michel et al. 2019: normalised by all (sample, token) positions seen
                self._denominator += batch * sums["tokens"]
            self._batches += 1

    def _add_interactions(self, gates: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                          draw: BlockDraw) -> None:
        depth = self.arch.depth
        firsts = (grads[draw.l], grads[depth + draw.l], grads[-1])  # dL/dg_i at block l (embed: shared)
        for i, first in enumerate(firsts):
            wrt = (gates[draw.m[i][0]], gates[depth + draw.m[i][1]], gates[-1])
            # one Hessian-vector product gives the whole row: d(dL/dg_i[l] . 1)/d(g_heads[m], g_mlp[m], g_embed).
            # The embedding row, whose graph is the largest, goes last and frees the graph as it goes.
            row = torch.autograd.grad(first.sum(), wrt, retain_graph=i < 2, allow_unused=True,
                                      materialize_grads=True)
            with torch.no_grad():
                self._interactions[i] += torch.stack([v.double().sum() for v in row]) / self.normalisers[i]

    # -- many batches ----------------------------------------------------------------
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
                line = (f"pruning pass: [{done:>{len(str(num_batches))}}/{num_batches}]  eta {_hms(eta)}  "
                        f"{samples / max(elapsed, 1e-9):.1f} samples/s  loss {self.last_loss:.4f}")
                if is_cuda:
                    line += f"  max mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.0f} MB"
                log(line)
        if k + 1 < num_batches:
            raise UserError(f"the pruning pass expected {num_batches} batches but the data gave only {k + 1}")

    # -- state and results -----------------------------------------------------------
    def state(self) -> Dict[str, torch.Tensor]:
        """The accumulators (float64 tensors on the model's device): sums over batches."""
        return {"heads": self._sums["heads"].clone(), "mlp": self._sums["mlp"].clone(),
                "embed": self._sums["embed"].clone(), "interactions": self._interactions.clone(),
                "denominator": self._denominator.clone(), "batches": self._batches.clone()}

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
        divisor = float(state["denominator"]) if self.method == 4 else batches
        criteria = {c: (state[c] / divisor).cpu() for c in COMPONENTS}
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


# -- pickles ---------------------------------------------------------------------------
def save_pickles(output_dir: str, method: int, criteria: Dict[str, torch.Tensor],
                 interactions: Optional[torch.Tensor] = None) -> List[str]:
    """Write `criteria_m{method}l{0,1,2}_final.pickle` and, given C, `hessian.pickle` atomically.

    Each file holds one float64 numpy array: heads [depth, heads], mlp [depth, hidden],
    embed [D]; hessian [3, 3].

    Args:
        output_dir: the directory (created when missing).
        method: the pruning method the criteria were computed with.
        criteria: as returned by `PruningScorer.finalize`.
        interactions: C, or None to write no hessian.pickle.

    Returns:
        the paths written.
    """
    paths = []
    for layer, c in enumerate(COMPONENTS):
        path = os.path.join(output_dir, criteria_filename(method, layer))
        atomic_write_pickle(criteria[c].detach().cpu().double().numpy(), path)
        paths.append(path)
    if interactions is not None:
        path = os.path.join(output_dir, HESSIAN_FILE)
        atomic_write_pickle(interactions.detach().cpu().double().numpy(), path)
        paths.append(path)
    return paths


def _load_array(path: str, shape: Tuple[int, ...], what: str, flag: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise UserError(f"{flag}: {what} file not found: {path}")
    try:
        array = np.asarray(load_numpy_pickle(path), dtype=np.float64)  # numpy arrays only: no code runs
    except UserError as err:
        raise UserError(f"{flag}: {err}") from None
    except Exception as err:  # unpickling errors of any kind, ragged lists
        raise UserError(f"{flag}: {path} is not a readable {what} pickle ({type(err).__name__}: {err})")
    if array.shape == (1, *shape):  # the reference's list of per-layer arrays, one layer
        array = array[0]
    if array.shape != tuple(shape):
        raise UserError(f"{flag}: {path} holds shape {list(array.shape)}, this model expects {list(shape)} "
                        f"(pickles of another model?)")
    if not np.isfinite(array).all():
        raise UserError(f"{flag}: {path} holds non-finite values")
    return torch.from_numpy(array)


def load_pickles(directory: str, method: int, arch: DeiTArch, need_hessian: bool = True,
                 flag: str = "--pruning_pickle_from") -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Read the criteria (and C) written by `save_pickles`, validated against `arch`.

    Args:
        directory: the folder holding the pickles.
        method: the pruning method (part of the file names).
        arch: the model's architecture; shapes must match it.
        need_hessian: also read `hessian.pickle` (required then).
        flag: the flag named in error messages.

    Returns:
        (criteria dict, C or None), float64 CPU tensors.
    """
    if not os.path.isdir(directory):
        raise UserError(f"{flag}: not a directory: {directory!r}")
    shapes = criteria_shapes(arch)
    criteria = {c: _load_array(os.path.join(directory, criteria_filename(method, layer)), shapes[c],
                               f"criteria (method {method}, {c})", flag)
                for layer, c in enumerate(COMPONENTS)}
    interactions = None
    if need_hessian:
        interactions = _load_array(os.path.join(directory, HESSIAN_FILE), (3, 3), "interaction (hessian)", flag)
    return criteria, interactions


def _hms(seconds: float) -> str:
    seconds = int(round(seconds)) if math.isfinite(seconds) else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
