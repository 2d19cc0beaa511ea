"""The training and evaluation loops (DeiT's engine.py, made exact and reproducible).

`train_one_epoch` runs one epoch: mixup, forward under autocast (CUDA only), the
criterion `criterion(samples, outputs, targets)` (a `losses.DistillationLoss`),
backward through the AMP scaler or plainly, optional clipping, optimiser step and
EMA update, with progress lines and TensorBoard scalars. `evaluate` returns top-1,
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

from utils import (MetricLogger, SmoothedValue, TensorboardLogger, UserError, all_reduce_sum, derive_seed,
                   get_rank, set_seed)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; training stops."""


def all_ranks_finite(value: float, device: torch.device) -> bool:
    """Whether `value` is finite on every rank (one tiny all-reduce when distributed)."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    return all_reduce_sum(bad).item() == 0


def make_loss_scaler(device: torch.device, amp: bool):
    """timm's `NativeScaler` when AMP is on and the device is CUDA, else None (plain fp32 backward)."""
    if amp and torch.device(device).type == "cuda":
        from timm.utils import NativeScaler

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
        tb_logger: TensorBoard logger for per-iteration `train/loss` and `train/lr`.
        print_freq: progress line every this many iterations (`--log_period`).
        print_fn: where progress lines go (default: print on rank 0).
        seed: when given, reseed every RNG from `(seed, epoch, rank)` first (see module docstring).

    Returns:
        Epoch averages over all ranks: `{'loss': ..., 'lr': ...}`.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite (names epoch and iteration).
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
    for it, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]")):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        loss_value = loss.item()
        # every rank must stop together: a rank leaving alone would hang the others in DDP's all-reduce
        if not all_ranks_finite(loss_value, device):
            loss_value = loss_value if not math.isfinite(loss_value) else "non-finite on another process"
            raise NonFiniteLossError(f"the training loss is {loss_value} at epoch {epoch}, iteration {it + 1}/"
                                     f"{num_steps}; stopping (try a lower --lr, --clip-grad or --no-amp)")
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip, parameters=model.parameters(), create_graph=second_order)
        else:
            loss.backward(create_graph=second_order)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if model_ema is not None:
            model_ema.update(_unwrap(model))
        lr = optimizer.param_groups[0]["lr"]
        metric_logger.update(n=samples.shape[0], loss=loss_value)
        metric_logger.update(lr=lr)
        if tb_logger is not None:
            tb_logger.update(step=epoch * num_steps + it, head="train", loss=loss_value, lr=lr)
    metric_logger.synchronize_between_processes()
    metric_logger.print_fn(f"Averaged stats: {metric_logger}")
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model: nn.Module, device: torch.device, amp: bool = True, *, print_freq: int = 10,
             print_fn: Optional[Callable[[str], None]] = None, header: str = "Test:") -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy on `data_loader`, exact over samples and ranks.

    Per-rank sums of loss, correct predictions and sample counts are all-reduced,
    so with a `ShardSampler` (`--dist-eval`) every sample counts once; without
    it every rank reads the whole set and the ratios are the same. A DDP model is
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
    all_reduce_sum(sums)
    loss_sum, top1, top5, count = sums.tolist()
    if count == 0:
        raise UserError("the validation loader yields no sample")
    stats = {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss_sum / count}
    metric_logger.print_fn(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
                           f"({int(count)} images)")
    return stats


def measure_throughput(model: nn.Module, batch_size: int, img_size: int, device: torch.device, *,
                       train_step: bool = False, warmup: int = 3, iters: int = 10, in_chans: int = 3,
                       amp: bool = False) -> float:
    """Images per second of inference (or of a forward+backward+SGD step) on random input.

    Args:
        model: the network (its train/eval mode and weights are restored afterwards).
        batch_size: images per call.
        img_size: square input size.
        device: where to run.
        train_step: time forward + backward + optimiser step instead of inference.
        warmup: untimed calls first.
        iters: timed calls.
        in_chans: input channels.
        amp: autocast to float16 (CUDA only).

    Returns:
        images per second (median over the timed calls).
    """
    import copy
    import time

    device = torch.device(device)
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    net = copy.deepcopy(model).to(device) if train_step else model.to(device)
    was_training = model.training
    net.train(train_step)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-6) if train_step else None
    use_amp = amp and device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            if train_step:
                out = net(images)
                loss = sum(o.float().mean() for o in out) if isinstance(out, tuple) else out.float().mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    net(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    model.train(was_training)
    times.sort()
    return batch_size / times[len(times) // 2]


CHECKPOINT_FORMAT_VERSION = 1


def plain_args(args) -> dict:
    """The run's flags as plain Python values (str/int/float/bool/None, lists and dicts of them),
    so that a checkpoint holding them loads with `torch.load(weights_only=True)`; anything else
    (a device, a NumPy scalar, a Namespace) is stored as its text."""
    import numbers

    import numpy as np

    def plain(value):
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, numbers.Integral):  # NumPy integers too
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return str(value)

    return plain(dict(vars(args)) if not isinstance(args, dict) else args)


def checkpoint_state(model: nn.Module, mask, optimizer, lr_scheduler, loss_scaler, model_ema, epoch: int,
                     max_accuracy: float, args) -> dict:
    """Everything `--resume` needs to continue a fine-tuning run (timm/DeiT keys plus the mask)."""
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model": model.state_dict(),
        "mask": mask.to_dict(),
        "arch": model.arch.to_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
        "model_ema": model_ema.module.state_dict() if model_ema is not None else None,
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "args": plain_args(args),
    }


def load_resume_weights(checkpoint: dict, path: str, model: nn.Module, mask) -> None:
    """Check that a `--resume` checkpoint belongs to this model and mask, then load its weights.

    Raises:
        UserError: the checkpoint was written for another model or mask (nothing is loaded then).
    """
    from pruning.mask import PruneMask

    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"--resume {path!r} is not a training checkpoint (no 'model' entry)")
    if isinstance(checkpoint.get("mask"), dict) and PruneMask.from_dict(checkpoint["mask"], path) != mask:
        raise UserError(f"--resume {path!r} was written for another pruned model (its mask differs from "
                        f"--masked_model's)")
    own = model.state_dict()
    theirs = checkpoint["model"]
    bad = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    extra = [k for k in theirs if k not in own]
    if bad or extra:
        raise UserError(f"--resume {path!r} does not fit --model (first mismatching keys: {(bad + extra)[:3]})")
    model.load_state_dict(theirs)


def restore_training_state(checkpoint: dict, optimizer, lr_scheduler, loss_scaler=None, model_ema=None, *,
                           path: str = "") -> "tuple[int, float]":
    """Restore optimiser, scheduler, scaler and EMA from a `checkpoint_state` dict.

    The scheduler is then stepped to the next epoch, as the training loop does after
    each epoch, so a resumed run sets the same learning rates as an uninterrupted one.

    Args:
        checkpoint: the loaded `--resume` file (its model weights already loaded).
        optimizer: the freshly built optimiser.
        lr_scheduler: the freshly built timm scheduler.
        loss_scaler: the AMP scaler or None.
        model_ema: the timm ModelEma* or None (a checkpoint without EMA keeps the EMA built from the
            resumed model).
        path: the file, for error messages.

    Returns:
        (the epoch to start from, the best accuracy so far); (0, best) for a weights-only checkpoint.

    Raises:
        UserError: the optimiser, scheduler, scaler or EMA state does not fit this run.
    """
    epoch = checkpoint.get("epoch")
    best = float(checkpoint.get("max_accuracy", 0.0))
    if epoch is None:  # weights only
        return 0, best
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        if loss_scaler is not None and checkpoint.get("scaler") is not None:
            loss_scaler.load_state_dict(checkpoint["scaler"])
        if model_ema is not None and checkpoint.get("model_ema") is not None:
            model_ema.module.load_state_dict(checkpoint["model_ema"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise UserError(f"--resume {path!r}: its training state does not fit this run (same --opt, --sched and "
                        f"model flags needed): {type(err).__name__}: {' '.join(str(err).split())[:300]}") from None
    lr_scheduler.step(epoch + 1)
    return epoch + 1, best


# -- the fine-tuning loop ---------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402  (kept with the loop it serves)
from typing import Tuple  # noqa: E402

from datasets import MixupConfig, build_mixup  # noqa: E402
from losses import DistillConfig, DistillationLoss, build_base_criterion  # noqa: E402

LAST_CHECKPOINT, BEST_CHECKPOINT = "checkpoint.pth", "best_checkpoint.pth"


@dataclass(frozen=True)
class TrainConfig:
    """What `fit` runs: the effective values (lr scaled for the total batch, bounds clamped).

    Field names are timm's (its optimizer and scheduler factories read this object):
    `opt opt_eps opt_betas momentum weight_decay lr`, `sched epochs decay_epochs warmup_epochs
    cooldown_epochs patience_epochs decay_rate min_lr warmup_lr lr_noise lr_noise_pct lr_noise_std seed`.

    Args:
        epochs, start_epoch: train epochs `start_epoch .. epochs - 1` (`--epochs --start_epoch`).
        seed: per-epoch reseeding of every RNG (`--seed`).
        total_batch: images per optimiser step over all processes (for the log).
        lr: the peak learning rate for `total_batch` (`--lr` x total_batch / 512).
        clip_grad: gradient-norm clipping or None (`--clip-grad`).
        model_ema, model_ema_decay, model_ema_force_cpu: the weight EMA (`--model-ema ...`).
        amp: autocast on CUDA (`--amp`).
        log_period: progress line every N iterations (`--log_period`).
        save_freq: keep checkpoint_{epoch}.pth every N epochs (`--save_freq`).
        output_dir: where checkpoints, log.txt and TensorBoard go; "" for nowhere (`--output_dir`).
        mixup: mixup/cutmix and label smoothing of the training batches.
        distill: distillation settings (the teacher is passed to `fit`).
    """

    epochs: int = 300
    start_epoch: int = 0
    seed: int = 0
    total_batch: int = 512
    lr: float = 5e-4
    opt: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: Optional[Tuple[float, float]] = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    clip_grad: Optional[float] = None
    sched: str = "cosine"
    lr_noise: Optional[Tuple[float, ...]] = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    decay_epochs: float = 30
    warmup_epochs: int = 5
    cooldown_epochs: int = 10
    patience_epochs: int = 10
    decay_rate: float = 0.1
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    model_ema_force_cpu: bool = False
    amp: bool = True
    log_period: int = 10
    save_freq: int = 50
    output_dir: str = ""
    mixup: MixupConfig = MixupConfig()
    distill: DistillConfig = DistillConfig()


def ema_horizon_note(decay: float, steps: int) -> str:
    """One line when an EMA of `decay` cannot move far from its start in `steps` optimizer steps, else ''.

    The EMA averages over about 1 / (1 - decay) steps; after `steps` updates its starting
    weights still weigh decay ** steps.
    """
    horizon = 1.0 / (1.0 - decay)
    if steps >= horizon:
        return ""
    advice = f"--model-ema-decay {1 - 10 / steps:.4g} (a horizon of a tenth of the run) or " if steps >= 20 else ""
    return (f"EMA: decay {decay} averages over ~{horizon:.0f} optimizer steps but this run has {steps}, so the EMA "
            f"weights are still {decay ** steps:.0%} the starting weights and 'Test (EMA)' will stay near the starting "
            f"model's accuracy; for this run length use {advice}--no-model-ema")


def fit(cfg: TrainConfig, model: nn.Module, mask, loader_train, loader_val, num_classes: int, device, *,
        teacher: Optional[nn.Module] = None, distributed: bool = False, resume_checkpoint: Optional[dict] = None,
        resume_path: str = "", record: Optional[dict] = None, epoch_fields: Optional[dict] = None,
        log: Callable[[str], None] = print) -> Dict[str, float]:
    """DeiT's training loop with per-epoch evaluation, checkpoints, log.txt and TensorBoard.

    Builds the DDP wrapper (when `distributed`), the EMA, optimiser, scheduler, AMP scaler,
    mixup and criterion from `cfg`; restores them from `resume_checkpoint` (its weights
    already loaded into `model`); then per epoch: train, step the scheduler, evaluate
    (and the EMA), and on rank 0 write `checkpoint.pth` (every epoch),
    `checkpoint_{epoch}.pth` (every `save_freq`) and `best_checkpoint.pth` (on a new best top-1).

    Args:
        cfg: the training configuration (effective values).
        model: the network, on `device`.
        mask: the `PruneMask` stored in each checkpoint.
        loader_train, loader_val: from `datasets.build_loaders`.
        num_classes: classes of the data set (mixup's soft targets).
        device: where the batches go.
        teacher: the frozen distillation teacher, or None.
        distributed: wrap the model in DistributedDataParallel.
        resume_checkpoint, resume_path: a `checkpoint_state` dict to continue from, and its file.
        record: the run's configuration, stored (as plain values) in each checkpoint under 'args'.
        epoch_fields: extra fields of every log.txt line (e.g. parameters and GMACs).
        log: where progress lines go.

    Returns:
        `{'max_accuracy': best top-1 (%), 'seconds': training time}`.
    """
    import os
    import time

    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler
    from timm.utils import ModelEmaV2

    from utils import append_json_line, atomic_torch_save, is_main_process

    out = cfg.output_dir
    model_without_ddp = model
    if distributed:  # DDP broadcasts rank 0's weights: wrap before the EMA copies them
        device_ids = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    model_ema = None
    if cfg.model_ema:
        model_ema = ModelEmaV2(model_without_ddp, decay=cfg.model_ema_decay,
                               device="cpu" if cfg.model_ema_force_cpu else None)
        note = ema_horizon_note(cfg.model_ema_decay, cfg.epochs * len(loader_train))
        if note:
            log(note)
    optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=cfg))
    loss_scaler = make_loss_scaler(device, cfg.amp)
    lr_scheduler, _ = create_scheduler(cfg, optimizer)
    mixup_fn = build_mixup(cfg.mixup, num_classes)
    distill = cfg.distill
    if teacher is not None:
        log(f"distillation: teacher {distill.teacher_model} from {distill.teacher_path}, {distill.type} loss, "
            f"alpha {distill.alpha}, tau {distill.tau}; "
            f"{'dist head' if model_without_ddp.arch.distilled else 'class head'} of the student is distilled")
    else:
        log("distillation: none")
    criterion = DistillationLoss(build_base_criterion(cfg.mixup.active, cfg.mixup.smoothing), teacher,
                                 distill.type, distill.alpha, distill.tau)
    start_epoch, max_accuracy = cfg.start_epoch, 0.0
    if resume_checkpoint is not None:
        start_epoch, max_accuracy = restore_training_state(resume_checkpoint, optimizer, lr_scheduler, loss_scaler,
                                                           model_ema, path=resume_path)
        log(f"resumed from {resume_path}: next epoch {start_epoch}, best top-1 so far {max_accuracy:.2f}%")

    tb = TensorboardLogger(out)
    log(f"training for {cfg.epochs - start_epoch} epochs (from epoch {start_epoch}); lr {cfg.lr:.3g} "
        f"for a total batch of {cfg.total_batch}")
    start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, loss_scaler,
                                      cfg.clip_grad, model_ema, mixup_fn, amp=cfg.amp, tb_logger=tb,
                                      print_freq=cfg.log_period, print_fn=log, seed=cfg.seed)
        lr_scheduler.step(epoch + 1)
        test_stats = evaluate(loader_val, model, device, amp=cfg.amp, print_freq=cfg.log_period, print_fn=log)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        log(f"epoch {epoch}: top-1 {test_stats['acc1']:.2f}% (best {max_accuracy:.2f}%)")
        if model_ema is not None:
            ema_stats = evaluate(loader_val, model_ema.module, device, amp=cfg.amp, print_freq=cfg.log_period,
                                 print_fn=log, header="Test (EMA):")
            test_stats.update({"ema_acc1": ema_stats["acc1"], "ema_acc5": ema_stats["acc5"]})
        if out and is_main_process():
            state = checkpoint_state(model_without_ddp, mask, optimizer, lr_scheduler, loss_scaler, model_ema,
                                     epoch, max_accuracy, record or {})
            atomic_torch_save(state, os.path.join(out, LAST_CHECKPOINT))
            if (epoch + 1) % cfg.save_freq == 0:
                atomic_torch_save(state, os.path.join(out, f"checkpoint_{epoch}.pth"))
            if improved:
                atomic_torch_save(state, os.path.join(out, BEST_CHECKPOINT))
        line = {**{f"train_{k}": v for k, v in train_stats.items()},
                **{f"test_{k}": v for k, v in test_stats.items()},
                "epoch": epoch, **(epoch_fields or {})}
        append_json_line(os.path.join(out, "log.txt") if out else "", line)
        tb.update(epoch, "test", acc1=test_stats["acc1"], acc5=test_stats["acc5"], loss=test_stats["loss"])
        tb.flush()
    tb.close()
    return {"max_accuracy": max_accuracy, "seconds": time.time() - start}
