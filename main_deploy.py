"""Build the physically smaller DeiT from a SAViT mask and fine-tune it (DeiT recipe,
optional distillation from a RegNetY-16GF teacher), or evaluate / time it.

    torchrun --nproc_per_node 8 main_deploy.py --model deit_base_patch16_224_deploy \
        --masked_model out/checkpoint_pruned_00.pth --data-path /imagenet --batch-size 128 \
        --teacher-path regnety_160.pth --distillation-type hard --dist-eval --output_dir ft/

Without --masked_model a `_deploy` model is the unpruned network (to train baselines).
`--resume ft/checkpoint.pth` continues a run (model, optimiser, scheduler, scaler, EMA, epoch);
`--auto_resume` does so from `--output_dir/checkpoint.pth` when it exists and starts afresh otherwise.
A training run into a folder that holds an earlier run's checkpoint.pth is refused unless it
resumes or `--overwrite` is given.
"""
import argparse
import datetime
import json
import os
import sys
import time

import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV2

from args import common_parents, mixup_active, validate_common
from datasets import build_dataset, build_loaders, build_mixup
from engine import evaluate, make_loss_scaler, measure_throughput, train_one_epoch
from losses import DistillationLoss, build_base_criterion, build_teacher
from models import DeployDeiT, arch_of, gated_name_of, is_deploy_name, list_models
from models.loading import load_pretrained
from pruning.deploy import deploy_structure, load_masked_model
from pruning.flops import ptflops_macs
from pruning.mask import PruneMask
from utils import (TensorboardLogger, UserError, append_json_line, atomic_torch_save, checkpoint_state,
                   cleanup_distributed, cli_entry, error_line, init_distributed_mode, is_main_process,
                   load_resume_weights, load_torch_file, prepare_output_dir, refuse_to_clobber, restore_training_state,
                   save_pruned_safetensors, set_seed, setup_logging)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SAViT fine-tuning of the pruned DeiT (main_deploy.py)",
                                     parents=common_parents())
    g = parser.add_argument_group("deploy")
    g.add_argument("--masked_model", default="",
                   help="the pruned model: main.py's checkpoint_pruned_00.pth, the reference's, or a mask JSON "
                        "(then --finetune gives the weights to slice)")
    g.add_argument("--throughput", action="store_true",
                   help="measure inference images/s of this model and of the unpruned one, then exit")
    g.add_argument("--auto_resume", action="store_true",
                   help="resume from --output_dir/checkpoint.pth when it exists, else start from epoch 0")
    g.add_argument("--save_safetensors", action="store_true",
                   help="also write best_checkpoint.safetensors (weights; architecture, structure and "
                        "normalisation in its metadata): models.load_pruned reads it")
    return parser


CHECKPOINT_NAME = "checkpoint.pth"


def resolve_auto_resume(args) -> None:
    """--auto_resume: set `args.resume` to --output_dir/checkpoint.pth when that file exists."""
    if not args.auto_resume:
        return
    if args.resume:
        raise UserError(f"--auto_resume and --resume {args.resume!r} exclude each other: --auto_resume resumes "
                        f"from --output_dir/{CHECKPOINT_NAME}; pass one of them")
    if not args.output_dir:
        raise UserError(f"--auto_resume needs --output_dir (it resumes from --output_dir/{CHECKPOINT_NAME})")
    candidate = os.path.join(args.output_dir, CHECKPOINT_NAME)
    args.resume = candidate if os.path.isfile(candidate) else ""


def validate_deploy_args(args) -> None:
    """Checks of main_deploy.py's own flags that need no file to be read (resolves --auto_resume)."""
    resolve_auto_resume(args)
    if not is_deploy_name(args.model) or gated_name_of(args.model) not in list_models():
        raise UserError(f"--model {args.model!r}: main_deploy.py builds a _deploy DeiT; choose from "
                        f"{', '.join(n for n in list_models() if is_deploy_name(n))}")
    for flag, path in (("--resume", args.resume), ("--masked_model", args.masked_model), ("--finetune", args.finetune)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag}: file not found: {path!r}")
    if args.masked_model and args.finetune and not args.masked_model.endswith(".json"):
        raise UserError(f"--finetune is read only with a mask JSON --masked_model, but {args.masked_model!r} is a "
                        f"checkpoint that carries its own weights (drop --finetune or pass the mask JSON)")


def build_student(args, arch, resume_checkpoint):
    """(mask, deploy model) from --masked_model, --resume or --finetune (in that order of authority)."""
    if args.masked_model:
        try:
            mask, model = load_masked_model(arch, args.masked_model, args.finetune, trust=args.trust_checkpoint)
        except UserError as err:  # name the flags: the file may be fine, just not for this --model
            if str(err).startswith("--masked_model"):
                raise
            raise UserError(f"--masked_model (with --model {args.model}): {err}") from None
    elif resume_checkpoint is not None and isinstance(resume_checkpoint.get("mask"), dict):
        mask = PruneMask.from_dict(resume_checkpoint["mask"], source=args.resume)
        try:
            mask.check_fits(arch)
        except UserError as err:
            raise UserError(f"--resume (with --model {args.model}): {err}") from None
        model = DeployDeiT(arch, **deploy_structure(mask))
    else:
        mask = PruneMask.full(arch, model=gated_name_of(args.model))
        model = DeployDeiT(arch)
        if args.finetune:
            load_pretrained(model, args.finetune, trust=args.trust_checkpoint)
    mask.model = mask.model or gated_name_of(args.model)
    return mask, model


def start_afresh(out: str, log) -> None:
    """--overwrite over an earlier run: its log.txt goes, so that log.txt holds this run's epochs only."""
    if not os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        return
    log(f"--overwrite: {out} holds an earlier run; its checkpoints are replaced as this run writes them")
    log_txt = os.path.join(out, "log.txt")
    if os.path.isfile(log_txt):
        os.remove(log_txt)
        log(f"--overwrite: removed the earlier run's {log_txt}")


def log_complexity(model, arch, mask, log) -> dict:
    """ptflops count of the deploy model next to the unpruned model's; returns the numbers."""
    full = ptflops_macs(DeployDeiT(arch).eval(), arch)
    ours = ptflops_macs(model, arch)
    kept, total = mask.kept_counts(), mask.total_counts()
    log(f"unpruned model: {full['total'] / 1e9:.4f} GMACs, {full['params'] / 1e6:.3f} M params")
    log(f"deploy model: {ours['total'] / 1e9:.4f} GMACs, {ours['params'] / 1e6:.3f} M params; "
        f"FLOPs reduction {1 - ours['total'] / full['total']:.2%}, params reduction {1 - ours['params'] / full['params']:.2%}")
    log(f"kept heads {kept['heads']}/{total['heads']}, MLP neurons {kept['mlp']}/{total['mlp']}, "
        f"embedding channels {kept['embed']}/{total['embed']}; structure {json.dumps(deploy_structure(mask))}")
    return {"gmacs": ours["total"] / 1e9, "params": ours["params"], "gmacs_unpruned": full["total"] / 1e9}


def run_throughput(args, model, arch, complexity, device, log) -> None:
    """Images/s of the unpruned and the deploy model side by side: inference, then a training step."""
    unpruned = DeployDeiT(arch)
    for train_step, kind in ((False, "inference"), (True, "training step")):
        ips = [measure_throughput(net, args.batch_size, arch.img_size, device, train_step=train_step, amp=args.amp)
               for net in (unpruned, model)]
        log(f"throughput ({kind}, batch {args.batch_size}, {device}): unpruned {ips[0]:.1f} images/s, "
            f"deploy {ips[1]:.1f} images/s; speedup {ips[1] / ips[0]:.2f}x "
            f"(FLOPs ratio {complexity['gmacs_unpruned'] / complexity['gmacs']:.2f}x)")


def scale_lr(args, log) -> None:
    """DeiT's linear scaling of --lr with the total batch (reference 512), in place on `args`.

    --min-lr and --warmup-lr are bounds below the peak lr: when the scaled lr falls under
    them (small total batches) they are lowered to it, else the cosine schedule would rise.
    """
    total_batch = args.batch_size * args.world_size
    args.lr = args.lr * total_batch / 512.0
    for name, flag in (("min_lr", "--min-lr"), ("warmup_lr", "--warmup-lr")):
        value = getattr(args, name)
        if value > args.lr:
            log(f"{flag} lowered from {value:.3g} to {args.lr:.3g}, the lr scaled for a total batch of {total_batch} "
                f"(else the schedule would rise above its peak)")
            setattr(args, name, args.lr)


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


def fine_tune(args, model, mask, arch, loader_train, loader_val, num_classes, teacher, resume_checkpoint,
              complexity, device, log) -> None:
    """The DeiT training loop with per-epoch evaluation, checkpoints, log.txt and TensorBoard."""
    out = args.output_dir
    model_without_ddp = model
    if args.distributed:  # DDP broadcasts rank 0's weights: wrap before the EMA copies them
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model_without_ddp, decay=args.model_ema_decay,
                               device="cpu" if args.model_ema_force_cpu else None)
        note = ema_horizon_note(args.model_ema_decay, args.epochs * len(loader_train))
        if note:
            log(note)
    scale_lr(args, log)
    optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=args))
    loss_scaler = make_loss_scaler(device, args.amp)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    mixup_fn = build_mixup(args, num_classes)
    if teacher is not None:
        log(f"distillation: teacher {args.teacher_model} from {args.teacher_path}, {args.distillation_type} loss, "
            f"alpha {args.distillation_alpha}, tau {args.distillation_tau}; "
            f"{'dist head' if arch.distilled else 'class head'} of the student is distilled")
    else:
        log("distillation: none")
    criterion = DistillationLoss(build_base_criterion(mixup_active(args), args.smoothing), teacher,
                                 args.distillation_type, args.distillation_alpha, args.distillation_tau)
    max_accuracy = 0.0
    if resume_checkpoint is not None:
        args.start_epoch, max_accuracy = restore_training_state(resume_checkpoint, optimizer, lr_scheduler,
                                                                loss_scaler, model_ema, path=args.resume)
        log(f"resumed from {args.resume}: next epoch {args.start_epoch}, best top-1 so far {max_accuracy:.2f}%")

    tb = TensorboardLogger(out)
    log(f"training for {args.epochs - args.start_epoch} epochs (from epoch {args.start_epoch}); lr {args.lr:.3g} "
        f"for a total batch of {args.batch_size * args.world_size}")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch, loss_scaler,
                                      args.clip_grad, model_ema, mixup_fn, amp=args.amp, tb_logger=tb,
                                      print_freq=args.log_period, print_fn=log, seed=args.seed)
        lr_scheduler.step(epoch + 1)
        test_stats = evaluate(loader_val, model, device, amp=args.amp, print_freq=args.log_period, print_fn=log)
        improved = test_stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats["acc1"])
        log(f"epoch {epoch}: top-1 {test_stats['acc1']:.2f}% (best {max_accuracy:.2f}%)")
        if model_ema is not None:
            ema_stats = evaluate(loader_val, model_ema.module, device, amp=args.amp, print_freq=args.log_period,
                                 print_fn=log, header="Test (EMA):")
            test_stats.update({"ema_acc1": ema_stats["acc1"], "ema_acc5": ema_stats["acc5"]})
        if out and is_main_process():
            state = checkpoint_state(model_without_ddp, mask, optimizer, lr_scheduler, loss_scaler, model_ema,
                                     epoch, max_accuracy, args)
            atomic_torch_save(state, os.path.join(out, CHECKPOINT_NAME))
            if (epoch + 1) % args.save_freq == 0:
                atomic_torch_save(state, os.path.join(out, f"checkpoint_{epoch}.pth"))
            if improved:
                atomic_torch_save(state, os.path.join(out, "best_checkpoint.pth"))
                if args.save_safetensors:
                    save_pruned_safetensors(model_without_ddp, mask, args,
                                            os.path.join(out, "best_checkpoint.safetensors"))
        record = {**{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()},
                  "epoch": epoch, "n_parameters": complexity["params"], "gmacs": complexity["gmacs"]}
        append_json_line(os.path.join(out, "log.txt") if out else "", record)
        tb.update(epoch, "test", acc1=test_stats["acc1"], acc5=test_stats["acc5"], loss=test_stats["loss"])
        tb.flush()
    tb.close()
    elapsed = datetime.timedelta(seconds=int(time.time() - start))
    log(f"done: best top-1 {max_accuracy:.2f}% ({complexity['gmacs']:.4f} GMACs, {complexity['params'] / 1e6:.3f} M "
        f"params) after {args.epochs} epochs; training time {elapsed}")


@cli_entry
def main(args) -> None:
    # every input (flags, data, mask, weights, teacher, resume checkpoint) is checked before
    # anything is written: bad input leaves --output_dir untouched
    validate_common(args)
    validate_deploy_args(args)
    init_distributed_mode(args)
    device = torch.device(args.device)
    set_seed(args.seed + args.rank)
    training = not (args.eval or args.throughput)
    dataset_val, num_classes = build_dataset(False, args) if not args.throughput else (None, None)
    dataset_train = build_dataset(True, args)[0] if training else None
    arch = arch_of(args.model, img_size=args.input_size, num_classes=num_classes, drop_rate=args.drop,
                   drop_path_rate=args.drop_path)
    resume_checkpoint = (load_torch_file(args.resume, "--resume checkpoint", trust=args.trust_checkpoint)
                         if args.resume else None)
    if resume_checkpoint is not None and not isinstance(resume_checkpoint, dict):
        raise UserError(f"--resume {args.resume!r} is not a training checkpoint (expected a dict)")
    mask, model = build_student(args, arch, resume_checkpoint)
    if resume_checkpoint is not None:
        load_resume_weights(resume_checkpoint, args.resume, model, mask)
        del resume_checkpoint["model"]  # loaded; no second copy of the weights for the whole run
    teacher = None
    if training and args.distillation_type != "none":
        teacher = build_teacher(args.teacher_model, args.teacher_path, num_classes, device,
                                trust=args.trust_checkpoint)
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val, args.distributed)

    if training:  # last check, before anything is written
        refuse_to_clobber(args.output_dir, CHECKPOINT_NAME, resuming=bool(args.resume), overwrite=args.overwrite,
                          how="resume it with --auto_resume (or --resume FILE), ")

    logger = setup_logging(args.output_dir if args.log == "same" else args.log, "savit.deploy")
    log = logger.info
    try:
        log("command: " + " ".join(sys.argv))
        log("configuration: " + json.dumps(vars(args), sort_keys=True, default=str))
        prepare_output_dir(args.output_dir, log)
        if args.auto_resume:
            log(f"--auto_resume: resuming from {args.resume}" if args.resume else
                f"--auto_resume: no {os.path.join(args.output_dir, CHECKPOINT_NAME)} yet; starting from epoch 0")
        if training and not args.resume and args.output_dir and is_main_process():
            start_afresh(args.output_dir, log)
        complexity = log_complexity(model.eval(), arch, mask, log)
        if args.throughput:
            run_throughput(args, model, arch, complexity, device, log)
        elif args.eval:
            stats = evaluate(loader_val, model.to(device), device, amp=args.amp, print_freq=args.log_period,
                             print_fn=log)
            log(f"accuracy of the deploy model on {len(dataset_val)} images: top-1 {stats['acc1']:.2f}%  "
                f"top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f}")
        else:
            fine_tune(args, model.to(device), mask, arch, loader_train, loader_val, num_classes, teacher,
                      resume_checkpoint, complexity, device, log)
    except UserError as err:  # e.g. a non-finite loss or an unreadable image: record it in the log file too
        logger.error(f"error: {error_line(err)}")
        raise
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
