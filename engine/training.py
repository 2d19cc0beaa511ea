"""The fine-tuning loop: `fit` (DeiT's recipe: optimiser, schedule, EMA, distillation, DDP,
resume, per-epoch evaluation and checkpoints) and its configuration `TrainConfig`."""
from __future__ import annotations  # `MixupConfig` names a type only: engine/ does not import datasets.py

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3

from engine.loops import evaluate, make_loss_scaler, train_one_epoch
from losses import DistillConfig, DistillationLoss, build_base_criterion
from utils import (TensorboardLogger, append_json_line, atomic_torch_save, checkpoint_state, is_main_process,
                   restore_training_state, save_pruned_safetensors)

if TYPE_CHECKING:
    from datasets import MixupConfig

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
        model_ema_eval: also evaluate the EMA after every epoch (`--model-ema-eval`; DeiT does not).
        amp: autocast on CUDA (`--amp`).
        log_period: progress line every N iterations (`--log_period`).
        save_freq: keep checkpoint_{epoch}.pth every N epochs (`--save_freq`).
        output_dir: where checkpoints, log.txt and TensorBoard go; "" for nowhere (`--output_dir`).
        save_safetensors: also write best_checkpoint.safetensors (`--save_safetensors`).
        mixup: mixup/cutmix and label smoothing of the training batches.
        distill: distillation settings (the teacher is passed to `fit`).
    """

    epochs: int
    start_epoch: int
    seed: int
    total_batch: int
    lr: float
    opt: str
    opt_eps: float
    opt_betas: Optional[Tuple[float, float]]
    momentum: float
    weight_decay: float
    clip_grad: Optional[float]
    sched: str
    lr_noise: Optional[Tuple[float, ...]]
    lr_noise_pct: float
    lr_noise_std: float
    warmup_lr: float
    min_lr: float
    decay_epochs: float
    warmup_epochs: int
    cooldown_epochs: int
    patience_epochs: int
    decay_rate: float
    model_ema: bool
    model_ema_decay: float
    model_ema_force_cpu: bool
    model_ema_eval: bool
    amp: bool
    log_period: int
    save_freq: int
    output_dir: str
    save_safetensors: bool
    mixup: MixupConfig
    distill: DistillConfig


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


def _wrap_ddp(model: nn.Module, device) -> nn.Module:
    """`model` in DistributedDataParallel: on its CUDA device, or without device ids on the CPU (gloo)."""
    device = torch.device(device)
    if device.type != "cuda":
        return nn.parallel.DistributedDataParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return nn.parallel.DistributedDataParallel(model, device_ids=[index])


def _build_ema(cfg: TrainConfig, model: nn.Module, steps: int, log: Callable[[str], None]):
    """The weight EMA of `model` for a run of `steps` optimizer steps (constant decay, as in DeiT), or None."""
    if not cfg.model_ema:
        return None
    note = ema_horizon_note(cfg.model_ema_decay, steps)
    if note:
        log(note)
    if not cfg.model_ema_eval:
        log("EMA: not evaluated each epoch (--model-ema-eval to evaluate it)")
    return ModelEmaV3(model, decay=cfg.model_ema_decay,
                      device=torch.device("cpu") if cfg.model_ema_force_cpu else None)


def _build_criterion(cfg: TrainConfig, teacher: Optional[nn.Module], mixup_fn: Optional[Callable],
                     distilled_student: bool, log: Callable[[str], None]) -> DistillationLoss:
    """DeiT's criterion (soft targets under mixup, else label smoothing; distillation from `teacher`),
    after a line saying what is distilled."""
    distill = cfg.distill
    if teacher is not None:
        log(f"distillation: teacher {distill.teacher_model} from {distill.teacher_path}, {distill.type} loss, "
            f"alpha {distill.alpha}, tau {distill.tau}; "
            f"{'dist head' if distilled_student else 'class head'} of the student is distilled")
    elif distilled_student:
        log("distillation: none; both heads of the distilled student learn the labels (mean of their losses)")
    else:
        log("distillation: none")
    return DistillationLoss(build_base_criterion(mixup_fn is not None, cfg.mixup.smoothing), teacher,
                            distill.type, distill.alpha, distill.tau)


def _evaluate_ema(cfg: TrainConfig, loader_val, model_ema, log: Callable[[str], None]) -> Dict[str, float]:
    """`{'ema_acc1', 'ema_acc5'}` of the EMA, evaluated where it lives (the CPU with --model-ema-force-cpu)."""
    ema_device = next(model_ema.module.parameters()).device
    stats = evaluate(loader_val, model_ema.module, ema_device, amp=cfg.amp, print_freq=cfg.log_period,
                     print_fn=log, header="Test (EMA):")
    return {"ema_acc1": stats["acc1"], "ema_acc5": stats["acc5"]}


def _save_checkpoints(cfg: TrainConfig, state: dict, epoch: int, improved: bool, model: nn.Module, mask,
                      record: dict) -> None:
    """checkpoint.pth (every epoch), checkpoint_{epoch}.pth (every `save_freq`) and, on a new best top-1,
    best_checkpoint.pth (and best_checkpoint.safetensors with `save_safetensors`)."""
    out = cfg.output_dir
    atomic_torch_save(state, os.path.join(out, LAST_CHECKPOINT))
    if (epoch + 1) % cfg.save_freq == 0:
        atomic_torch_save(state, os.path.join(out, f"checkpoint_{epoch}.pth"))
    if improved:
        atomic_torch_save(state, os.path.join(out, BEST_CHECKPOINT))
        if cfg.save_safetensors:
            save_pruned_safetensors(model, mask, os.path.join(out, "best_checkpoint.safetensors"))


def _log_epoch(out: str, tb: TensorboardLogger, epoch: int, train_stats: dict, test_stats: dict,
               epoch_fields: Optional[dict]) -> None:
    """One log.txt line (train_*, test_*, epoch and `epoch_fields`) and the test scalars in TensorBoard."""
    line = {**{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            "epoch": epoch, **(epoch_fields or {})}
    append_json_line(os.path.join(out, "log.txt") if out else "", line)
    tb.update(epoch, "test", acc1=test_stats["acc1"], acc5=test_stats["acc5"], loss=test_stats["loss"])
    tb.flush()


def fit(cfg: TrainConfig, model: nn.Module, mask, loader_train, loader_val, mixup_fn: Optional[Callable], device,
        *, teacher: Optional[nn.Module] = None, distributed: bool = False, resume_checkpoint: Optional[dict] = None,
        resume_path: str = "", record: Optional[dict] = None, epoch_fields: Optional[dict] = None,
        log: Callable[[str], None] = print) -> Dict[str, float]:
    """DeiT's training loop with per-epoch evaluation, checkpoints, log.txt and TensorBoard.

    Builds the DDP wrapper (when `distributed`), the EMA, optimiser, scheduler, AMP scaler
    and criterion from `cfg`; restores them from `resume_checkpoint` (its weights
    already loaded into `model`); then per epoch: train, step the scheduler, evaluate
    (and, with `cfg.model_ema_eval`, the EMA), and on rank 0 write `checkpoint.pth` (every epoch),
    `checkpoint_{epoch}.pth` (every `save_freq`) and `best_checkpoint.pth` (on a new best top-1).

    Args:
        cfg: the training configuration (effective values).
        model: the network, on `device`.
        mask: the `PruneMask` stored in each checkpoint.
        loader_train, loader_val: from `datasets.build_loaders`.
        mixup_fn: timm's Mixup for the training batches (`datasets.build_mixup`), or None.
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
    model_without_ddp = model
    if distributed:  # DDP broadcasts rank 0's weights: wrap before the EMA copies them
        model = _wrap_ddp(model, device)
    model_ema = _build_ema(cfg, model_without_ddp, cfg.epochs * len(loader_train), log)
    optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=cfg))
    loss_scaler = make_loss_scaler(device, cfg.amp)
    lr_scheduler, _ = create_scheduler(cfg, optimizer)
    criterion = _build_criterion(cfg, teacher, mixup_fn, model_without_ddp.arch.distilled, log)
    start_epoch, max_accuracy = cfg.start_epoch, 0.0
    if resume_checkpoint is not None:
        start_epoch, max_accuracy = restore_training_state(resume_checkpoint, optimizer, lr_scheduler, loss_scaler,
                                                           model_ema, path=resume_path)
        log(f"resumed from {resume_path}: next epoch {start_epoch}, best top-1 so far {max_accuracy:.2f}%")

    tb = TensorboardLogger(cfg.output_dir)
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
        if model_ema is not None and cfg.model_ema_eval:
            test_stats.update(_evaluate_ema(cfg, loader_val, model_ema, log))
        if cfg.output_dir and is_main_process():
            state = checkpoint_state(model_without_ddp, mask, optimizer, lr_scheduler, loss_scaler, model_ema,
                                     epoch, max_accuracy, record or {})
            _save_checkpoints(cfg, state, epoch, improved, model_without_ddp, mask, record or {})
        _log_epoch(cfg.output_dir, tb, epoch, train_stats, test_stats, epoch_fields)
    tb.close()
    return {"max_accuracy": max_accuracy, "seconds": time.time() - start}
