"""Flag groups shared by `main.py` (pruning) and `main_deploy.py` (fine-tuning).

Each `*_args()` function returns an `argparse.ArgumentParser(add_help=False)` for
use with `parents=[...]`; names and defaults are DeiT's and the SAViT reference's
(hyphenated where they hyphenate, underscored where they underscore), so the
reference's commands work unchanged. `common_parents()` lists them all:

    parser = argparse.ArgumentParser("SAViT pruning", parents=args.common_parents())
    parser.add_argument("--pruning_method", ...)      # script-specific flags
    ns = parser.parse_args(); args.validate_common(ns)

Nothing is parsed at import time.
"""
import argparse
import math
import os
from typing import List

import torch

from utils import UserError

DATA_SETS = ("IMNET", "CIFAR", "INAT", "INAT19", "DIGITS")
INAT_CATEGORIES = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name")


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def model_args() -> argparse.ArgumentParser:
    """`--model --input-size --drop --drop-path --model-ema/--no-model-ema --model-ema-decay --model-ema-force-cpu`."""
    p = _parser()
    g = p.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL",
                   help="name of the model (project DeiTs, their _deploy forms, or any timm name)")
    g.add_argument("--input-size", default=224, type=int, help="image size (default: 224)")
    g.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    g.add_argument("--drop-path", type=float, default=0.1, metavar="PCT", help="drop path rate (default: 0.1)")
    g.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    g.add_argument("--model-ema-decay", type=float, default=0.99996, help="EMA decay (default: 0.99996)")
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False, help="keep the EMA on the CPU")
    p.set_defaults(model_ema=True)
    return p


def optimizer_args() -> argparse.ArgumentParser:
    """`--opt --opt-eps --opt-betas --clip-grad --momentum --weight-decay` (read by timm's optimizer factory)."""
    p = _parser()
    g = p.add_argument_group("optimiser")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER", help='optimiser (default: "adamw")')
    g.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON", help="optimiser epsilon (default: 1e-8)")
    g.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA",
                   help="optimiser betas (default: the optimiser's own)")
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: no clipping)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (default: 0.05)")
    return p


def schedule_args() -> argparse.ArgumentParser:
    """`--sched --lr --lr-noise* --warmup-lr --min-lr --*-epochs --decay-rate --epochs` (timm's scheduler factory)."""
    p = _parser()
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER", help='scheduler (default: "cosine")')
    g.add_argument("--lr", type=float, default=5e-4, metavar="LR",
                   help="learning rate for a total batch of 512, scaled linearly (default: 5e-4)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct",
                   help="learning rate noise on/off epoch percentages")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT",
                   help="learning rate noise limit percent (default: 0.67)")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV",
                   help="learning rate noise std-dev (default: 1.0)")
    g.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR", help="warm-up learning rate (default: 1e-6)")
    g.add_argument("--min-lr", type=float, default=1e-5, metavar="LR",
                   help="lower lr bound for cyclic schedulers (default: 1e-5)")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N", help="epoch interval to decay the lr")
    g.add_argument("--warmup-epochs", type=int, default=5, metavar="N", help="warm-up epochs (default: 5)")
    g.add_argument("--cooldown-epochs", type=int, default=10, metavar="N",
                   help="epochs at min_lr after the cyclic schedule ends (default: 10)")
    g.add_argument("--patience-epochs", type=int, default=10, metavar="N",
                   help="patience epochs of the plateau scheduler (default: 10)")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE", help="lr decay rate (default: 0.1)")
    g.add_argument("--epochs", default=300, type=int, help="training epochs (default: 300)")
    return p


def augmentation_args() -> argparse.ArgumentParser:
    """RandAugment, label smoothing, interpolation, repeated augmentation, random erasing, eval crop."""
    p = _parser()
    g = p.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT", help="colour jitter (default: 0.4)")
    g.add_argument("--hflip", type=float, default=0.5, metavar="PCT",
                   help="horizontal flip probability (default: 0.5, as DeiT; 0 for digits or text)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help='AutoAugment / RandAugment policy, "" for none (default: rand-m9-mstd0.5-inc1)')
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--train-interpolation", type=str, default="bicubic",
                   help='training interpolation: random, bilinear or bicubic (default: "bicubic")')
    g.add_argument("--repeated-aug", action="store_true", help="repeated-augmentation sampler (default: on)")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase probability (default: 0.25)")
    g.add_argument("--remode", type=str, default="pixel", help='random erase mode (default: "pixel")')
    g.add_argument("--recount", type=int, default=1, help="random erase count (default: 1)")
    g.add_argument("--resplit", action="store_true", default=False,
                   help="do not random-erase the first augmentation split (accepted as in DeiT; "
                        "no effect, since no augmentation splits are used)")
    g.add_argument("--crop_pct", type=float, default=None,
                   help="evaluation centre-crop fraction (default: 224/256, i.e. resize to 256 for 224)")
    p.set_defaults(repeated_aug=True)
    return p


def mixup_args() -> argparse.ArgumentParser:
    """`--mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob --mixup-mode`."""
    p = _parser()
    g = p.add_argument_group("mixup / cutmix")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, on if > 0 (default: 0.8)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, on if > 0 (default: 1.0)")
    g.add_argument("--cutmix-minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio; overrides alpha and turns cutmix on if set")
    g.add_argument("--mixup-prob", type=float, default=1.0,
                   help="probability of applying mixup or cutmix to a batch (default: 1.0)")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of cutmix instead of mixup when both are on (default: 0.5)")
    g.add_argument("--mixup-mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                   help='how mixup/cutmix parameters are drawn: per "batch", "pair" or "elem"')
    return p


def distillation_args() -> argparse.ArgumentParser:
    """`--teacher-model --teacher-path --distillation-type --distillation-alpha --distillation-tau`."""
    p = _parser()
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL",
                   help="teacher model name (default: regnety_160)")
    g.add_argument("--teacher-path", type=str, default="",
                   help="teacher weights: a state dict or {'model': state_dict}")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str,
                   help="distillation loss (default: none)")
    g.add_argument("--distillation-alpha", default=0.5, type=float, help="weight of the distillation loss (default: 0.5)")
    g.add_argument("--distillation-tau", default=1.0, type=float, help="soft distillation temperature (default: 1.0)")
    return p


def data_args() -> argparse.ArgumentParser:
    """`--batch-size --data-path --data-set --inat-category --num_workers --pin-mem/--no-pin-mem`."""
    p = _parser()
    g = p.add_argument_group("data")
    g.add_argument("--batch-size", default=64, type=int, help="batch size per process (default: 64)")
    g.add_argument("--data-path", default="", type=str,
                   help="data set root (IMNET: a folder with train/ and val/ ImageFolder trees)")
    g.add_argument("--data-set", default="IMNET", choices=list(DATA_SETS), type=str,
                   help="IMNET (any ImageFolder tree), CIFAR (CIFAR-100), INAT (2018), INAT19, "
                        "DIGITS (scikit-learn's handwritten digits, offline; --data-path ignored)")
    g.add_argument("--inat-category", default="name", choices=list(INAT_CATEGORIES), type=str,
                   help="iNaturalist label granularity (default: name)")
    g.add_argument("--not_imagenet_default_mean_and_std", action="store_true",
                   help="normalise with mean = std = 0.5 instead of ImageNet's statistics")
    g.add_argument("--num_workers", default=10, type=int, help="data-loading worker processes (default: 10)")
    g.add_argument("--pin-mem", action="store_true", help="pin host memory in the loaders (default: on, CUDA only)")
    g.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    p.set_defaults(pin_mem=True)
    return p


def run_args() -> argparse.ArgumentParser:
    """Output, device, seed, resume/eval and logging flags."""
    p = _parser()
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="./output", help="where to save; empty for no saving (default: ./output)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an --output_dir that holds an earlier run's checkpoint, replacing its files "
                        "(without it such a run is refused)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device: cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    g.add_argument("--seed", default=0, type=int, help="random seed (default: 0); fine-tuning ranks use seed + rank, the pruning pass one seed for all")
    g.add_argument("--resume", default="", help="resume from this checkpoint")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="load checkpoints (--finetune, --masked_model, --resume, --teacher-path) that need full "
                        "unpickling: this RUNS CODE FROM THE FILE, so use it only for files you trust (default: "
                        "off, tensors and plain values only)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch (set by --resume)")
    g.add_argument("--eval", action="store_true", help="evaluate only")
    g.add_argument("--dist-eval", action="store_true", default=False,
                   help="shard evaluation over the processes (exact: no sample counted twice)")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (default: on; ignored on CPU)")
    g.add_argument("--no-amp", action="store_false", dest="amp")
    g.add_argument("--log", type=str, default="same",
                   help='folder for the {timestamp}.log file; "same" means --output_dir (default: same)')
    g.add_argument("--log_period", type=int, default=10, help="print progress every N iterations (default: 10)")
    g.add_argument("--save_freq", default=50, type=int, help="also keep checkpoint_{epoch}.pth every N epochs")
    p.set_defaults(amp=True)
    return p


def distributed_args() -> argparse.ArgumentParser:
    """`--world_size --dist_url --local-rank/--local_rank` (the launcher's environment takes precedence)."""
    p = _parser()
    g = p.add_argument_group("distributed")
    g.add_argument("--world_size", default=1, type=int,
                   help="number of processes (taken from WORLD_SIZE when launched by torchrun)")
    g.add_argument("--dist_url", default="env://", help="rendezvous URL (default: env://)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="local rank, passed by torch.distributed.launch without --use_env")
    return p


def savit_args() -> argparse.ArgumentParser:
    """`--finetune --finetune_op --pruning_flops_percentage` (taken by both scripts)."""
    p = _parser()
    g = p.add_argument_group("SAViT")
    g.add_argument("--finetune", default="", help="start from this checkpoint (a DeiT or gated checkpoint)")
    g.add_argument("--finetune_op", type=int, default=0, choices=[0, 1, 2],
                   help="1: fine-tune only, 2: prune only (default: 0)")
    g.add_argument("--pruning_flops_percentage", type=float, default=0.50,
                   help="fraction of the FLOPs to remove (default: 0.50)")
    return p


def common_parents() -> List[argparse.ArgumentParser]:
    """All shared groups, in help order, for `argparse.ArgumentParser(..., parents=common_parents())`."""
    return [model_args(), optimizer_args(), schedule_args(), augmentation_args(), mixup_args(),
            distillation_args(), data_args(), run_args(), distributed_args(), savit_args()]


def mixup_active(args) -> bool:
    """Whether mixup or cutmix is on (DeiT's rule)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _in_unit(value: float, closed_top: bool = True) -> bool:
    return math.isfinite(value) and 0 <= value and (value <= 1 if closed_top else value < 1)


def check_output_folder(flag: str, path: str) -> None:
    """`path` is a folder or can be made one: neither it nor a parent is a file."""
    if not path:
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe!r}"
        raise UserError(f"{flag} {path!r} {what}; expected a folder (existing or to create)")


def _check_input_size(args) -> None:
    """--input-size must be a multiple of the patch size of a known --model."""
    from models import arch_of, gated_name_of, list_models

    model = getattr(args, "model", None)
    if not model or gated_name_of(model) not in list_models():
        return  # an unknown model is reported by the script's own check
    patch = arch_of(model).patch_size
    _check(args.input_size % patch == 0,
           f"--input-size {args.input_size} is not a multiple of the patch size {patch} of --model {model}")


def validate_common(args) -> None:
    """Reject obviously bad values of the shared flags with one `UserError` naming the flag.

    Only checks that need nothing but the flags themselves: data folders, checkpoints
    and model/mask compatibility are checked where they are read.

    Args:
        args: the parsed namespace of a parser built from `common_parents()`.

    Raises:
        UserError: the first bad value found.
    """
    _check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    _check(args.input_size >= 1, f"--input-size must be >= 1, got {args.input_size}")
    _check_input_size(args)
    _check(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    _check(0 <= args.start_epoch, f"--start_epoch must be >= 0, got {args.start_epoch}")
    _check(math.isfinite(args.lr) and args.lr > 0, f"--lr must be > 0, got {args.lr}")
    for flag, value in (("--warmup-lr", args.warmup_lr), ("--min-lr", args.min_lr),
                        ("--weight-decay", args.weight_decay), ("--opt-eps", args.opt_eps)):
        _check(math.isfinite(value) and value >= 0, f"{flag} must be >= 0, got {value}")
    for flag, value in (("--warmup-epochs", args.warmup_epochs), ("--cooldown-epochs", args.cooldown_epochs),
                        ("--patience-epochs", args.patience_epochs)):
        _check(value >= 0, f"{flag} must be >= 0, got {value}")
    if args.opt_betas is not None:
        _check(len(args.opt_betas) == 2 and all(0 <= b < 1 for b in args.opt_betas),
               f"--opt-betas takes two values in [0, 1), got {args.opt_betas}")
    if args.clip_grad is not None:
        _check(math.isfinite(args.clip_grad) and args.clip_grad > 0, f"--clip-grad must be > 0, got {args.clip_grad}")
    _check(_in_unit(args.drop, closed_top=False), f"--drop must be in [0, 1), got {args.drop}")
    _check(_in_unit(args.drop_path, closed_top=False), f"--drop-path must be in [0, 1), got {args.drop_path}")
    _check(0 < args.model_ema_decay < 1, f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}")
    _check(_in_unit(args.smoothing, closed_top=False), f"--smoothing must be in [0, 1), got {args.smoothing}")
    _check(_in_unit(args.reprob), f"--reprob must be in [0, 1], got {args.reprob}")
    _check(_in_unit(args.hflip), f"--hflip must be in [0, 1], got {args.hflip}")
    _check(args.recount >= 1, f"--recount must be >= 1, got {args.recount}")
    _check(math.isfinite(args.color_jitter) and args.color_jitter >= 0,
           f"--color-jitter must be >= 0, got {args.color_jitter}")
    if args.crop_pct is not None:
        _check(0 < args.crop_pct <= 1, f"--crop_pct must be in (0, 1], got {args.crop_pct}")
    _check(args.mixup >= 0, f"--mixup must be >= 0, got {args.mixup}")
    _check(args.cutmix >= 0, f"--cutmix must be >= 0, got {args.cutmix}")
    if args.cutmix_minmax is not None:
        lo_hi = args.cutmix_minmax
        _check(len(lo_hi) == 2 and 0 < lo_hi[0] < lo_hi[1] <= 1,
               f"--cutmix-minmax takes two values 0 < min < max <= 1, got {lo_hi}")
    _check(_in_unit(args.mixup_prob), f"--mixup-prob must be in [0, 1], got {args.mixup_prob}")
    _check(_in_unit(args.mixup_switch_prob), f"--mixup-switch-prob must be in [0, 1], got {args.mixup_switch_prob}")
    if mixup_active(args) and args.mixup_prob > 0 and args.mixup_mode == "batch":
        # timm's Mixup pairs each sample with its mirror in the batch
        _check(args.batch_size % 2 == 0,
               f"--batch-size must be even when mixup/cutmix is on (got {args.batch_size}); "
               f"use an even size or --mixup 0 --cutmix 0")
    _check(_in_unit(args.distillation_alpha), f"--distillation-alpha must be in [0, 1], got {args.distillation_alpha}")
    _check(math.isfinite(args.distillation_tau) and args.distillation_tau > 0,
           f"--distillation-tau must be > 0, got {args.distillation_tau}")
    if args.distillation_type != "none":
        _check(bool(args.teacher_path),
               f"--distillation-type {args.distillation_type} needs --teacher-path (the teacher's weights)")
    _check(args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}")
    _check(args.log_period >= 1, f"--log_period must be >= 1, got {args.log_period}")
    _check(args.save_freq >= 1, f"--save_freq must be >= 1, got {args.save_freq}")
    _check(args.world_size >= 1, f"--world_size must be >= 1, got {args.world_size}")
    _check(0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}")
    check_output_folder("--output_dir", args.output_dir)
    if args.log != "same":
        check_output_folder("--log", args.log)
    _check(_in_unit(args.pruning_flops_percentage, closed_top=False),
           f"--pruning_flops_percentage must be in [0, 1), got {args.pruning_flops_percentage}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device (expected cuda, cuda:N or cpu)") from None
    if device.type == "cuda":
        _check(torch.cuda.is_available(), f"--device {args.device}: CUDA is not available here (use --device cpu)")
    else:
        _check(device.type == "cpu", f"--device {args.device!r}: only cuda and cpu are supported")
