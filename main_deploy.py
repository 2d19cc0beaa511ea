"""Build the physically smaller DeiT from a SAViT mask and fine-tune it (DeiT recipe,
optional distillation from a RegNetY-16GF teacher), or evaluate / time it.

    torchrun --nproc_per_node 8 main_deploy.py --model deit_base_patch16_224_deploy \
        --masked_model out/checkpoint_pruned_00.pth --data-path /imagenet --batch-size 128 \
        --teacher-path regnety_160.pth --distillation-type hard --dist-eval --output_dir ft/

Without --masked_model a `_deploy` model is the unpruned network (to train baselines).
`--resume ft/checkpoint.pth` continues a run (model, optimiser, scheduler, scaler, EMA, epoch).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV2

from args import common_parents, mixup_active, validate_common
from datasets import build_dataset, build_loaders, build_mixup
from engine import (checkpoint_state, evaluate, load_resume_weights, make_loss_scaler, measure_throughput,
                    restore_training_state, train_one_epoch)
from losses import DistillationLoss, build_base_criterion, build_teacher
from models import DeployDeiT, arch_of, gated_name_of, is_deploy_name, list_models
from models.loading import load_pretrained
from pruning.deploy import deploy_structure, load_masked_model
from pruning.flops import mask_macs, ptflops_macs
from pruning.mask import PruneMask
from utils import (TensorboardLogger, UserError, append_json_line, atomic_torch_save, cleanup_distributed,
                   cli_entry, init_distributed_mode, is_main_process, load_torch_file, set_seed, setup_logging)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SAViT fine-tuning of the pruned DeiT (main_deploy.py)",
                                     parents=common_parents())
    g = parser.add_argument_group("deploy")
    g.add_argument("--masked_model", default="",
                   help="the pruned model: main.py's checkpoint_pruned_00.pth, the reference's, or a mask JSON "
                        "(then --finetune gives the weights to slice)")
    g.add_argument("--throughput", action="store_true",
                   help="measure inference images/s of this model and of the unpruned one, then exit")
    return parser


def validate_deploy_args(args) -> None:
    if not is_deploy_name(args.model) or gated_name_of(args.model) not in list_models():
        raise UserError(f"--model {args.model!r}: main_deploy.py builds a _deploy DeiT; choose from "
                        f"{', '.join(n for n in list_models() if is_deploy_name(n))}")
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f"--resume: checkpoint not found: {args.resume!r}")
    if args.masked_model and not os.path.isfile(args.masked_model):
        raise UserError(f"--masked_model: file not found: {args.masked_model!r}")


def build_student(args, arch, resume_checkpoint):
    """(mask, deploy model) from --masked_model, --resume or --finetune (in that order of authority)."""
    if args.masked_model:
        mask, model = load_masked_model(arch, args.masked_model, args.finetune)
    elif resume_checkpoint is not None and isinstance(resume_checkpoint.get("mask"), dict):
        mask = PruneMask.from_dict(resume_checkpoint["mask"], source=args.resume)
        mask.check_fits(arch)
        model = DeployDeiT(arch, **deploy_structure(mask))
    else:
        mask = PruneMask.full(arch, model=gated_name_of(args.model))
        model = DeployDeiT(arch)
        if args.finetune:
            load_pretrained(model, args.finetune)
    mask.model = mask.model or gated_name_of(args.model)
    return mask, model


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


def run_throughput(args, model, arch, device, log) -> None:
    for name, net in (("unpruned", DeployDeiT(arch)), ("deploy", model)):
        ips = measure_throughput(net, args.batch_size, arch.img_size, device, amp=args.amp)
        log(f"throughput {name}: {ips:.1f} images/s (batch {args.batch_size}, {device})")


def fine_tune(args, model, mask, arch, dataset_train, dataset_val, num_classes, resume_checkpoint, complexity,
              device, log) -> None:
    """The DeiT training loop with per-epoch evaluation, checkpoints, log.txt and TensorBoard."""
    out = args.output_dir
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val, args.distributed)
    # DeiT: learning rate scaled linearly with the total batch size (reference 512)
    args.lr = args.lr * args.batch_size * args.world_size / 512.0
    optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=args))
    loss_scaler = make_loss_scaler(device, args.amp)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    mixup_fn = build_mixup(args, num_classes)
    teacher = None
    if args.distillation_type != "none":
        teacher = build_teacher(args.teacher_model, args.teacher_path, num_classes, device)
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
                                                                loss_scaler, model_ema)
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
            atomic_torch_save(state, os.path.join(out, "checkpoint.pth"))
            if (epoch + 1) % args.save_freq == 0:
                atomic_torch_save(state, os.path.join(out, f"checkpoint_{epoch}.pth"))
            if improved:
                atomic_torch_save(state, os.path.join(out, "best_checkpoint.pth"))
        record = {**{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()},
                  "epoch": epoch, "n_parameters": complexity["params"], "gmacs": complexity["gmacs"]}
        append_json_line(os.path.join(out, "log.txt") if out else "", record)
        tb.update(epoch, "test", acc1=test_stats["acc1"], acc5=test_stats["acc5"], loss=test_stats["loss"])
        tb.flush()
    tb.close()
    hours = (time.time() - start) / 3600
    log(f"done: best top-1 {max_accuracy:.2f}% ({complexity['gmacs']:.4f} GMACs, {complexity['params'] / 1e6:.3f} M "
        f"params) after {args.epochs} epochs; training time {hours:.2f} h")


@cli_entry
def main(args) -> None:
    validate_common(args)
    validate_deploy_args(args)
    init_distributed_mode(args)
    device = torch.device(args.device)
    set_seed(args.seed + args.rank)
    logger = setup_logging(args.output_dir if args.log == "same" else args.log, "savit.deploy")
    log = logger.info
    log("command: " + " ".join(sys.argv))
    log("configuration: " + json.dumps(vars(args), sort_keys=True, default=str))

    training = not (args.eval or args.throughput)
    dataset_val, num_classes = build_dataset(False, args) if not args.throughput else (None, None)
    dataset_train = None
    if training:
        dataset_train, num_classes = build_dataset(True, args)
    arch = arch_of(args.model, img_size=args.input_size, num_classes=num_classes, drop_rate=args.drop,
                   drop_path_rate=args.drop_path)
    resume_checkpoint = load_torch_file(args.resume, "--resume checkpoint") if args.resume else None
    mask, model = build_student(args, arch, resume_checkpoint)
    if resume_checkpoint is not None:
        load_resume_weights(resume_checkpoint, args.resume, model, mask)
    complexity = log_complexity(model.eval(), arch, mask, log)
    if args.throughput:
        run_throughput(args, model, arch, device, log)
    elif args.eval:
        _, loader_val = build_loaders(args, None, dataset_val, args.distributed)
        stats = evaluate(loader_val, model.to(device), device, amp=args.amp, print_freq=args.log_period, print_fn=log)
        log(f"accuracy of the deploy model on {len(dataset_val)} images: top-1 {stats['acc1']:.2f}%  "
            f"top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f}")
    else:
        fine_tune(args, model.to(device), mask, arch, dataset_train, dataset_val, num_classes,
                  resume_checkpoint, complexity, device, log)
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
