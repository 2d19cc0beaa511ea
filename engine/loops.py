"""The training and evaluation loops (DeiT's engine.py, made exact and reproducible).

`train_one_epoch` runs one epoch: mixup, forward under autocast (CUDA only), the
criterion `criterion(samples, outputs, targets)` (a `losses.DistillationLoss`),
backward through the AMP scaler or plainly, optional clipping, optimiser step and
EMA update, with progress lines and TensorBoard scalars; the host waits for the device only at log
points (every `print_freq` iterations and the last). `evaluate` returns top-1,
top-5 and loss summed exactly over samples and ranks.

Reproducibility: with `seed=` given, `train_one_epoch` reseeds Python, NumPy and
torch from `(seed, epoch, rank)` before the epoch's first batch is drawn, so the
epoch's augmentation, mixup, drop path and worker seeds depend only on those
numbers and the state passed in (model, optimiser, EMA, scaler), never on what
ran earlier in the process: a run resumed from an epoch checkpoint replays the
same epochs on CPU.
"""
import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import NativeScaler

from utils import (MetricLogger, SmoothedValue, TensorboardLogger, UserError, all_reduce_sum, derive_seed,
                   get_rank, set_seed)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; training stops."""


def _flush_losses(pending: list, lrs: list, it: int, num_steps: int, epoch: int, metric_logger: MetricLogger,
                  tb_logger: Optional[TensorboardLogger]) -> None:
    """At a log point: stop every rank together if a loss since the last one was not finite (one
    all-reduce), else record each iteration's loss and lr (one host synchronisation)."""
    losses = torch.stack([loss for loss, _ in pending])
    bad = (~torch.isfinite(losses)).any().double().reshape(1)
    values = torch.cat([all_reduce_sum(bad), losses]).tolist()
    first = it + 2 - len(pending)  # 1-based iteration of pending[0]
    if values[0]:
        local = [(first + k, v) for k, v in enumerate(values[1:]) if not math.isfinite(v)]
        where = (f"{local[0][1]} at epoch {epoch}, iteration {local[0][0]}/{num_steps}" if local else
                 f"non-finite on another process at epoch {epoch}, between iterations {first} and {it + 1}/{num_steps}")
        raise NonFiniteLossError(f"the training loss is {where}; stopping (try a lower --lr, a --clip-grad or "
                                 f"turning --amp off)")
    for k, ((_, n), value, lr) in enumerate(zip(pending, values[1:], lrs)):
        metric_logger.update(n=n, loss=value)
        metric_logger.update(lr=lr)
        if tb_logger is not None:
            tb_logger.update(step=epoch * num_steps + first - 1 + k, head="train", loss=value, lr=lr)
    pending.clear()
    lrs.clear()


def make_loss_scaler(device: torch.device, amp: bool):
    """timm's `NativeScaler` when AMP is on and the device is CUDA, else None (plain fp32 backward)."""
    if amp and torch.device(device).type == "cuda":
        return NativeScaler()
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, loss_scaler=None, max_norm: Optional[float] = None,
                    model_ema=None, mixup_fn: Optional[Callable] = None, set_training_mode: bool = True,
                    amp: bool = True, tb_logger: Optional[TensorboardLogger] = None, *, print_freq: int = 10,
                    print_fn: Optional[Callable[[str], None]] = None, seed: Optional[int] = None) -> Dict[str, float]:
    """Train `model` for one pass over `data_loader`.

    Args:
        model: the network (possibly wrapped in DistributedDataParallel).
        criterion: `(samples, outputs, targets) -> loss`, e.g. `losses.DistillationLoss`.
        data_loader: yields `(images, labels)`; call `data_loader.sampler.set_epoch(epoch)` first.
        optimizer: the optimiser (its first group's lr is logged).
        device: where the batches go.
        epoch: epoch number (for logs, TensorBoard steps and reseeding).
        loss_scaler: timm `NativeScaler` (CUDA AMP) or None for a plain backward and step.
        max_norm: clip the gradient norm to this (None or 0: no clipping).
        model_ema: a timm ModelEma*, updated after every step, or None.
        mixup_fn: timm `Mixup` applied to each batch, or None.
        set_training_mode: `model.train(set_training_mode)` before the epoch.
        amp: autocast (float16) on CUDA; ignored on CPU.
        tb_logger: TensorBoard logger for per-iteration `train/loss` and `train/lr` (written at log points).
        print_freq: progress line every this many iterations (`--log_period`); the losses are read from
            the device (the only host synchronisation) and checked only then and at the epoch's end.
        print_fn: where progress lines go (default: print on rank 0).
        seed: when given, reseed every RNG from `(seed, epoch, rank)` first (see module docstring).

    Returns:
        Epoch averages over all ranks: `{'loss': ..., 'lr': ...}`.

    Raises:
        NonFiniteLossError: a loss was NaN or infinite (names the epoch and the iteration, or the
            iterations since the last log point when it was another rank's); every rank stops at the
            same log point, after the steps in between ran.
    """
    device = torch.device(device)
    if seed is not None:
        set_seed(derive_seed(seed, epoch, get_rank()))
    model.train(set_training_mode)
    use_amp = amp and device.type == "cuda"
    second_order = getattr(optimizer, "is_second_order", False)
    clip = max_norm if max_norm else None
    metric_logger = MetricLogger(delimiter="  ", print_fn=print_fn, device=device)
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    num_steps = len(data_loader)
    if num_steps == 0:
        raise UserError("the training loader yields no batch (fewer samples per process than --batch-size)")
    print_freq = max(1, int(print_freq))
    pending, lrs = [], []  # (loss on the device, batch size) and lr of each iteration since the last log point
    for it, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]")):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        # no host synchronisation per step: the losses stay on the device until the next log point
        pending.append((loss.detach().reshape(()).double(), samples.shape[0]))
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip, parameters=model.parameters(), create_graph=second_order)
        else:
            loss.backward(create_graph=second_order)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(_unwrap(model))
        lrs.append(optimizer.param_groups[0]["lr"])
        if it % print_freq == 0 or it == num_steps - 1:  # the same iterations on every rank
            _flush_losses(pending, lrs, it, num_steps, epoch, metric_logger, tb_logger)
    metric_logger.synchronize_between_processes()
    metric_logger.print_fn(f"Averaged stats: {metric_logger}")
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


def is_sharded(data_loader) -> bool:
    """Whether `data_loader` reads only this rank's share of its set: its sampler (or its batch
    sampler's) splits the indices over `num_replicas` > 1 ranks (`ShardSampler`, `RASampler`,
    `DistributedSampler`). A `SequentialSampler` (or any iterable without one) reads everything."""
    samplers = [getattr(data_loader, "sampler", None),
                getattr(getattr(data_loader, "batch_sampler", None), "sampler", None)]
    return any(int(getattr(s, "num_replicas", 1) or 1) > 1 for s in samplers if s is not None)


@torch.no_grad()
def evaluate(data_loader, model: nn.Module, device: torch.device, amp: bool = True, *, print_freq: int = 10,
             print_fn: Optional[Callable[[str], None]] = None, header: str = "Test:") -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy on `data_loader`, exact over samples and ranks.

    With a sharded loader (its sampler splits the set over `num_replicas` > 1
    ranks: `ShardSampler` with `--dist-eval`) the per-rank sums of loss, correct
    predictions and sample counts are all-reduced, so every sample counts once;
    otherwise every rank reads the whole set, its own sums are already the totals
    and nothing is reduced (the printed image count is the set's, not world x N). A DDP model is
    unwrapped (evaluation needs no gradient synchronisation); a model that returns
    `(class, dist)` logits is scored on their average. The model's train/eval
    mode is restored afterwards.

    Args:
        data_loader: yields `(images, labels)` with class-index labels.
        model: the network.
        device: where the batches go.
        amp: autocast (float16) on CUDA; ignored on CPU.
        print_freq: progress line every this many iterations.
        print_fn: where progress lines go (default: print on rank 0).
        header: progress-line prefix.

    Returns:
        `{'acc1': ..., 'acc5': ..., 'loss': ...}` (top-5 is top-min(5, classes)).
    """
    device = torch.device(device)
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    use_amp = amp and device.type == "cuda"
    metric_logger = MetricLogger(delimiter="  ", print_fn=print_fn, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for images, target in metric_logger.log_every(data_loader, print_freq, header):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            output = model(images)
        if isinstance(output, (tuple, list)):
            output = (output[0] + output[1]) / 2
        output = output.float()
        loss = F.cross_entropy(output, target, reduction="sum")
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = top.eq(target[:, None])
        batch = torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(images.shape[0]), dtype=torch.float64, device=device)])
        sums += batch
        n = images.shape[0]
        metric_logger.update(n=n, loss=batch[0].item() / n, acc1=100.0 * batch[1].item() / n,
                             acc5=100.0 * batch[2].item() / n)
    model.train(was_training)
    if is_sharded(data_loader):
        all_reduce_sum(sums)
    loss_sum, top1, top5, count = sums.tolist()
    if count == 0:
        raise UserError("the validation loader yields no sample")
    stats = {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss_sum / count}
    metric_logger.print_fn(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
                           f"({int(count)} images)")
    return stats
