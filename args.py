"""Command-line flags of `main.py` (pruning) and `main_deploy.py` (fine-tuning), and the
configurations built from them once per script.

Each `add_*` function adds one flag group to a parser; each script adds only the groups it
reads (`main.py --help` and `main_deploy.py --help` list only their own flags). Names and
defaults are DeiT's and the SAViT reference's (hyphenated where they hyphenate, underscored
where they underscore), so the reference's commands work unchanged; the reference flags a
script does not use sit in ONE group, `add_reference_group`, and setting one to a value
that would matter in the reference logs a warning (`reference_warnings`).

Ranges are checked while parsing, by the `type=` callables below (each value in one
place); `Parser.error` prints one line `error: --flag: what was expected, got X`, exit 2.
Checks across flags that need nothing but the flags are in `check_common`.

The library never sees the parsed namespace: the scripts turn it into frozen dataclasses
(`datasets.DataConfig`, `datasets.MixupConfig`, `engine.TrainConfig`, `losses.DistillConfig`,
and here `ModelConfig`, `RunConfig`, `PruneConfig`). Defaults live in the flags only (`defaults`
gives them without a command line).
A library `UserError` names the configuration field it is about (`field="data_path"`);
`error_text` prints the field's flag before the message, the line both scripts print and log.

Nothing is parsed at import time.
"""
import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

# the configurations built here from the flags (nothing else of these modules is used)
from datasets import DataConfig, MixupConfig
from engine import TrainConfig
from losses import DistillConfig
from pruning.search import SearchOptions
from utils import DistributedConfig, UserError, cli_entry, error_line, init_distributed_mode, option_flags
from utils.distributed import DEFAULT_TIMEOUT_S
from utils.job_guard import LOST_AFTER_S

DATA_SETS = ("IMNET", "CIFAR", "DIGITS")
REFERENCE_GROUP = "accepted for the reference's commands (no effect)"


# -- value types: each range checked once, while parsing ------------------------------------------

def _number(kind: type, test: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """A `type=` callable: `kind(text)` that passes `test`, else 'must be EXPECTED, got TEXT'."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {expected} (got {text})")
        return value

    convert.__name__ = f"{kind.__name__} {expected}"
    return convert


positive_int = _number(int, lambda v: v >= 1, ">= 1")
non_negative_int = _number(int, lambda v: v >= 0, ">= 0")
seed_int = _number(int, lambda v: 0 <= v < 2**32, "in [0, 2**32)")
positive_float = _number(float, lambda v: v > 0, "> 0")
non_negative_float = _number(float, lambda v: v >= 0, ">= 0")
unit_interval = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
half_open_unit = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")  # [0, 1)
open_unit_interval = _number(float, lambda v: 0 < v < 1, "in (0, 1)")
upper_unit_interval = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")  # (0, 1]


def _on_off(group, flag: str, help: str, default: bool = True) -> None:
    """`--flag` / `--no-flag`, default on unless told."""
    group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


# -- flag groups ----------------------------------------------------------------------------------

def add_model_args(parser: argparse.ArgumentParser, ema: bool) -> None:
    """`--model --input-size --drop --drop-path`, and with `ema` the weight-EMA flags."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="deit_base_patch16_224", type=str, metavar="MODEL",
                   help="a timm ViT name (main_deploy.py: with _deploy), e.g. deit_base_patch16_224, or a tiny test configuration")
    g.add_argument("--input-size", default=None, type=positive_int,
                   help="image size (default: the model's own, e.g. 224 for DeiT-B, 384 for vit_base_patch16_384)")
    g.add_argument("--drop", type=half_open_unit, default=0.0, metavar="PCT", help="dropout rate (default: 0)")
    g.add_argument("--drop-path", type=half_open_unit, default=0.1, metavar="PCT",
                   help="drop path rate (default: 0.1)")
    if ema:
        _on_off(g, "--model-ema", "keep an exponential moving average of the weights (default: on)")
        g.add_argument("--model-ema-decay", type=open_unit_interval, default=0.99996,
                       help="EMA decay (default: 0.99996)")
        g.add_argument("--model-ema-force-cpu", action="store_true", help="keep the EMA on the CPU")
        _on_off(g, "--model-ema-eval", "also evaluate the EMA after every epoch (default: off, as in DeiT; with "
                "--model-ema-force-cpu that evaluation runs on the CPU)", default=False)


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """`--opt --opt-eps --opt-betas --clip-grad --momentum --weight-decay` (timm's optimizer factory)."""
    g = parser.add_argument_group("optimiser")
    g.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER", help='optimiser (default: "adamw")')
    g.add_argument("--opt-eps", default=1e-8, type=non_negative_float, metavar="EPSILON",
                   help="optimiser epsilon (default: 1e-8)")
    g.add_argument("--opt-betas", default=None, type=half_open_unit, nargs=2, metavar="BETA",
                   help="optimiser betas, two values in [0, 1) (default: the optimiser's own)")
    g.add_argument("--clip-grad", type=positive_float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: no clipping)")
    g.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.05, help="weight decay (default: 0.05)")


def add_schedule_args(parser: argparse.ArgumentParser) -> None:
    """`--sched --lr --lr-noise* --warmup-lr --min-lr --*-epochs --decay-rate --epochs --start_epoch`."""
    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="cosine", type=str, metavar="SCHEDULER", help='scheduler (default: "cosine")')
    g.add_argument("--lr", type=positive_float, default=5e-4, metavar="LR",
                   help="learning rate for a total batch of 512, scaled linearly (default: 5e-4)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct",
                   help="learning rate noise on/off epoch percentages")
    g.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT",
                   help="learning rate noise limit percent (default: 0.67)")
    g.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV",
                   help="learning rate noise std-dev (default: 1.0)")
    g.add_argument("--warmup-lr", type=non_negative_float, default=1e-6, metavar="LR",
                   help="warm-up learning rate (default: 1e-6)")
    g.add_argument("--min-lr", type=non_negative_float, default=1e-5, metavar="LR",
                   help="lower lr bound for cyclic schedulers (default: 1e-5)")
    g.add_argument("--decay-epochs", type=float, default=30, metavar="N", help="epoch interval to decay the lr")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=5, metavar="N",
                   help="warm-up epochs (default: 5)")
    g.add_argument("--cooldown-epochs", type=non_negative_int, default=10, metavar="N",
                   help="epochs at min_lr after the cyclic schedule ends (default: 10)")
    g.add_argument("--patience-epochs", type=non_negative_int, default=10, metavar="N",
                   help="patience epochs of the plateau scheduler (default: 10)")
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE", help="lr decay rate (default: 0.1)")
    g.add_argument("--epochs", default=300, type=positive_int, help="training epochs (default: 300)")
    g.add_argument("--start_epoch", default=0, type=non_negative_int, metavar="N",
                   help="start epoch (set by --resume)")


def add_augmentation_args(parser: argparse.ArgumentParser, repeated_aug: bool) -> None:
    """RandAugment, label smoothing, interpolation, random erasing, eval crop (+ repeated augmentation)."""
    g = parser.add_argument_group("augmentation")
    g.add_argument("--color-jitter", type=non_negative_float, default=0.4, metavar="PCT",
                   help="colour jitter (default: 0.4)")
    g.add_argument("--hflip", type=unit_interval, default=0.5, metavar="PCT",
                   help="horizontal flip probability (default: 0.5, as DeiT; 0 for digits or text)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help='AutoAugment / RandAugment policy, "" for none (default: rand-m9-mstd0.5-inc1)')
    g.add_argument("--smoothing", type=half_open_unit, default=0.1, help="label smoothing (default: 0.1)")
    g.add_argument("--train-interpolation", type=str, default="bicubic",
                   help='training interpolation: random, bilinear or bicubic (default: "bicubic")')
    if repeated_aug:
        _on_off(g, "--repeated-aug", "repeated-augmentation sampler (default: on)")
    g.add_argument("--reprob", type=unit_interval, default=0.25, metavar="PCT",
                   help="random erase probability (default: 0.25)")
    g.add_argument("--remode", type=str, default="pixel", help='random erase mode (default: "pixel")')
    g.add_argument("--recount", type=positive_int, default=1, help="random erase count (default: 1)")
    g.add_argument("--crop_pct", type=upper_unit_interval, default=None,
                   help="evaluation centre-crop fraction (default: 224/256, i.e. resize to 256 for 224)")


def add_mixup_args(parser: argparse.ArgumentParser) -> None:
    """`--mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob --mixup-mode`."""
    g = parser.add_argument_group("mixup / cutmix")
    g.add_argument("--mixup", type=non_negative_float, default=0.8, help="mixup alpha, on if > 0 (default: 0.8)")
    g.add_argument("--cutmix", type=non_negative_float, default=1.0, help="cutmix alpha, on if > 0 (default: 1.0)")
    g.add_argument("--cutmix-minmax", type=upper_unit_interval, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="cutmix min/max ratio, 0 < min < max <= 1; overrides alpha and turns cutmix on if set")
    g.add_argument("--mixup-prob", type=unit_interval, default=1.0,
                   help="probability of applying mixup or cutmix to a batch (default: 1.0)")
    g.add_argument("--mixup-switch-prob", type=unit_interval, default=0.5,
                   help="probability of cutmix instead of mixup when both are on (default: 0.5)")
    g.add_argument("--mixup-mode", type=str, default="batch", choices=["batch", "pair", "elem"],
                   help='how mixup/cutmix parameters are drawn: per "batch", "pair" or "elem"')


def add_distillation_args(parser: argparse.ArgumentParser) -> None:
    """`--teacher-model --teacher-path --distillation-type --distillation-alpha --distillation-tau`."""
    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL",
                   help="teacher model name (default: regnety_160)")
    g.add_argument("--teacher-path", type=str, default="",
                   help="teacher weights: a state dict or {'model': state_dict}")
    g.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"], type=str,
                   help="distillation loss (default: none)")
    g.add_argument("--distillation-alpha", default=0.5, type=unit_interval,
                   help="weight of the distillation loss (default: 0.5)")
    g.add_argument("--distillation-tau", default=1.0, type=positive_float,
                   help="soft distillation temperature (default: 1.0)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """`--batch-size --data-path --data-set --num_workers --pin-mem/--no-pin-mem`."""
    g = parser.add_argument_group("data")
    g.add_argument("--batch-size", default=64, type=positive_int, help="batch size per process (default: 64)")
    g.add_argument("--data-path", default="", type=str,
                   help="data set root (IMNET: a folder with train/ and val/ ImageFolder trees)")
    g.add_argument("--data-set", default="IMNET", choices=list(DATA_SETS), type=str,
                   help="IMNET (any ImageFolder tree), CIFAR (CIFAR-100), "
                        "DIGITS (scikit-learn's handwritten digits, offline; --data-path ignored)")
    g.add_argument("--not_imagenet_default_mean_and_std", action="store_true",
                   help="normalise with mean = std = 0.5 instead of ImageNet's statistics")
    g.add_argument("--num_workers", default=10, type=non_negative_int,
                   help="data-loading worker processes (default: 10)")
    _on_off(g, "--pin-mem", "pin host memory in the loaders (default: on, CUDA only)")


def add_run_args(parser: argparse.ArgumentParser, save_freq: bool, seed_help: str, tf32: bool = False) -> None:
    """Output, device, seed, checkpoints, evaluation, AMP, TF32 (default `tf32`) and logging (+ `--save_freq`)."""
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default="./output", help="where to save; empty for no saving (default: ./output)")
    g.add_argument("--overwrite", action="store_true",
                   help="write into an --output_dir that holds an earlier run's checkpoint, replacing its files "
                        "(without it such a run is refused)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device: cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    g.add_argument("--seed", default=0, type=seed_int, help=seed_help)
    g.add_argument("--finetune", default="", help="start from these weights: a timm/DeiT .pth or .safetensors, or a gated checkpoint")
    g.add_argument("--resume", default="", help="resume from this checkpoint")
    g.add_argument("--trust_checkpoint", action="store_true",
                   help="load checkpoints (--finetune, --masked_model, --resume, --teacher-path) that need full "
                        "unpickling: this RUNS CODE FROM THE FILE, so use it only for files you trust (default: "
                        "off, tensors and plain values only)")
    g.add_argument("--eval", action="store_true", help="evaluate only")
    g.add_argument("--dist-eval", action="store_true", default=False,
                   help="shard evaluation over the processes (exact: no sample counted twice)")
    _on_off(g, "--amp", "mixed precision on CUDA (default: on; ignored on CPU)")
    _on_off(g, "--tf32", "allow TF32 in float32 matmuls and convolutions on CUDA (Ampere and newer) "
            f"(default: {'on, for training speed' if tf32 else 'off: the pruning pass scores in full fp32'})",
            default=tf32)
    g.add_argument("--log", type=str, default="same",
                   help='folder for the {timestamp}.log file; "same" means --output_dir (default: same)')
    g.add_argument("--log_period", type=positive_int, default=10, help="print progress every N iterations (default: 10)")
    if save_freq:
        g.add_argument("--save_freq", default=50, type=positive_int,
                       help="also keep checkpoint_{epoch}.pth every N epochs")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """`--dist_url --local-rank/--local_rank` (the launcher's environment takes precedence)."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--dist_url", default="env://", help="rendezvous URL (default: env://)")
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="local rank, passed by torch.distributed.launch without --use_env")
    g.add_argument("--dist_timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                   help=f"timeout of each collective, in seconds (default: {DEFAULT_TIMEOUT_S}). A rank that fails "
                        f"ends every rank within about {LOST_AFTER_S:.0f} s whatever this is")


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    """main.py's pruning flags: target, method, scope, scoring pass, interactions, pickles, protection."""
    g = parser.add_argument_group("pruning")
    g.add_argument("--pruning_flops_percentage", type=open_unit_interval, default=0.50,
                   help="fraction of the FLOPs to remove, in (0, 1) (default: 0.50)")
    g.add_argument("--pruning_method", type=int, default=2, choices=[1, 2, 3, 4],
                   help="importance: 1 mean|grad*out|, 2 (g*dL/dg)^2, 3 sum_b(sum_n grad*out)^2, "
                        "4 sum|grad*out| / positions (default: 2)")
    g.add_argument("--pruning_layers", type=int, default=3, choices=[0, 1, 2, 3],
                   help="what to prune: 0 heads, 1 MLP neurons, 2 embedding channels, 3 all (default: 3)")
    g.add_argument("--pruning_feed_percent", type=upper_unit_interval, default=0.1,
                   help="fraction of the training batches used for scoring (at least one batch; default: 0.1)")
    g.add_argument("--pruning_flops_threshold", type=positive_float, default=1e-4,
                   help="tolerance of the search's FLOPs constraint (default: 1e-4)")
    g.add_argument("--round_to", type=positive_int, default=1,
                   help="hardware-aligned widths: every block's kept MLP width and the kept embedding width are "
                        "multiples of N (N must divide both widths; default: 1, the reference's selection)")
    g.add_argument("--need_hessian", action="store_true",
                   help="estimate the interactions between components (SAViT); without it, first-order mode")
    g.add_argument("--hessian_embed", type=float, default=6.0,
                   help="scale of the embedding normaliser of the interactions (default: 6.0)")
    g.add_argument("--hessian_estimator", default="reference", choices=["reference", "rb"],
                   help="estimator of the interactions: reference (one block m per pair) or rb (the exact "
                        "mean over m <= l: same expectation and cost, lower variance; default: reference)")
    g.add_argument("--hessian_blocks", type=positive_int, default=1,
                   help="draws of the block l per batch for the interactions, averaged; each costs 2 more "
                        "Hessian-vector products (default: 1)")
    g.add_argument("--pruning_micro_batch", type=non_negative_int, default=0,
                   help="score each batch in chunks of this many images: same criteria and C, peak memory "
                        "about proportional to the chunk (0: whole batches; default: 0)")
    g.add_argument("--pruning_pickle_from", type=str, default="",
                   help="folder with criteria/hessian pickles of an earlier run: skip scoring")
    g.add_argument("--pruning_normalize_by_layer", action="store_true",
                   help="divide each block's criteria by their norm (see --pruning_normalize_type)")
    g.add_argument("--pruning_normalize_type", type=int, default=2, choices=[1, 2], help="1: L1, 2: L2 (default: 2)")
    g.add_argument("--pruning_protect", action=argparse.BooleanOptionalAction, default=True,
                   help="never prune the top 5%% units of each block and component (default: on)")
    g.add_argument("--no_pruning_protect", action="store_false", dest="pruning_protect", help=argparse.SUPPRESS)
    g.add_argument("--pruning_silent", action="store_true", help="no per-block listing in the output")
    g.add_argument("--compensate", default="none", choices=["none", "bias", "ls"],
                   help="after the search, refit the kept weights in closed form on calibration batches: bias "
                        "(removed units' mean into the output bias) or ls (ridge refit of attn.proj and mlp.fc2, "
                        "block by block; docs/METHOD.md section 5.1). Default: none")
    g.add_argument("--compensation_batches", type=positive_int, default=16,
                   help="calibration batches of --batch-size for --compensate: the first of the pruning pass's "
                        "permutation, without augmentation (default: 16)")
    g.add_argument("--compensation_ridge", type=non_negative_float, default=1e-2,
                   help="--compensate ls: ridge, relative to the mean second moment of the kept inputs "
                        "(default: 0.01)")
    g.add_argument("--mask_aware_norm", action="store_true",
                   help="with --eval: LayerNorm statistics over the kept embedding channels only (the exact "
                        "pruned network); default is the reference's LayerNorm over all channels")


def add_deploy_args(parser: argparse.ArgumentParser) -> None:
    """main_deploy.py's own flags: `--masked_model --throughput --auto_resume --save_safetensors`."""
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


# -- the reference's flags a script accepts but does not use ----------------------------------------

@dataclass(frozen=True)
class ReferenceFlag:
    """A flag kept only so that the reference's commands run: `neutral` values are silent, others warn."""

    flag: str
    type: Callable
    default: object
    neutral: Tuple
    why: str  # why it has no effect in this script

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


WORLD_SIZE = ReferenceFlag("--world_size", positive_int, 1, (1,),
                           "the number of processes comes from the launcher (torchrun --nproc_per_node)")


def add_reference_group(parser: argparse.ArgumentParser, flags: List[ReferenceFlag]) -> None:
    g = parser.add_argument_group(REFERENCE_GROUP)
    for ref in flags:
        kind = {"action": "store_true"} if ref.type is bool else {"type": ref.type}  # a switch, or a value
        g.add_argument(ref.flag, default=ref.default, dest=ref.dest, help=f"(no effect: {ref.why})", **kind)


def reference_warnings(ns: argparse.Namespace, flags: List[ReferenceFlag]) -> List[str]:
    """One line per reference flag set to a value that would change the reference's behaviour."""
    return [f"{ref.flag} {getattr(ns, ref.dest)} has no effect here: {ref.why}"
            for ref in flags if getattr(ns, ref.dest) not in ref.neutral]


def add_fine_tuning_groups(parser: argparse.ArgumentParser, seed_help: str) -> None:
    """Every flag group of main_deploy.py (its reference-only flags aside)."""
    add_model_args(parser, ema=True)
    add_optimizer_args(parser)
    add_schedule_args(parser)
    add_augmentation_args(parser, repeated_aug=True)
    add_mixup_args(parser)
    add_distillation_args(parser)
    add_data_args(parser)
    add_run_args(parser, save_freq=True, seed_help=seed_help, tf32=True)
    add_distributed_args(parser)
    add_deploy_args(parser)


def _all_flags_parser() -> argparse.ArgumentParser:
    """Every flag group of main.py and main_deploy.py (not the reference's): each field's flag and default."""
    parser = argparse.ArgumentParser(add_help=False)
    add_fine_tuning_groups(parser, seed_help="")
    add_pruning_args(parser)  # main.py's groups are main_deploy.py's, less some, plus this one
    return parser


@functools.lru_cache(maxsize=None)
def script_flags() -> Dict[str, str]:
    """Field (argparse dest) -> flag of the two scripts, e.g. "data_path" -> "--data-path"."""
    return option_flags(_all_flags_parser())


def defaults(**overrides) -> argparse.Namespace:
    """The flags' defaults (main_deploy.py's where the scripts differ) with `overrides`, for the
    configurations built without a command line (tests, benchmarks)."""
    ns = vars(_all_flags_parser().parse_args([]))
    unknown = sorted(set(overrides) - set(ns))
    if unknown:
        raise TypeError(f"no such flags: {unknown}")
    return argparse.Namespace(**{**ns, **overrides})


def error_text(err: BaseException) -> str:
    """The one line a script prints (and logs) for `err`: the flag of its field, then the message."""
    return error_line(err, script_flags())


def script_entry(main_fn: Callable) -> Callable:
    """`utils.cli_entry` with the scripts' flags: a `UserError` becomes `error: {error_text(err)}`, exit 2."""
    return cli_entry(main_fn, flags=script_flags)


# -- checks across flags (ranges are checked by the parser) -----------------------------------------

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


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_input_size(ns: argparse.Namespace, arch) -> None:
    """Set --input-size to the image size of `arch` (the --model's) when not given, so that the
    logged configuration is the one that runs; it must be a multiple of the patch size."""
    if ns.input_size is None:
        ns.input_size = arch.img_size
    _check(ns.input_size % arch.patch_size == 0, f"--input-size {ns.input_size} is not a multiple of the patch "
                                                 f"size {arch.patch_size} of --model {ns.model}")
    if arch.family == "swin":  # the stage grids must also fit the windows
        try:
            arch.with_options(img_size=ns.input_size)
        except UserError as err:
            raise UserError(f"--input-size {ns.input_size} does not fit --model {ns.model}: {err}") from None


def check_common(ns: argparse.Namespace) -> None:
    """Checks that combine flags or need the machine (the parser checked each value's range).

    Raises:
        UserError: the first bad combination found, naming the flags.
    """
    if ns.cutmix_minmax is not None:
        _check(ns.cutmix_minmax[0] < ns.cutmix_minmax[1],
               f"--cutmix-minmax takes two values 0 < min < max <= 1, got {ns.cutmix_minmax}")
    mixup = mixup_config(ns)
    if mixup.active and mixup.prob > 0 and mixup.mode == "batch":
        # timm's Mixup pairs each sample with its mirror in the batch
        _check(ns.batch_size % 2 == 0, f"--batch-size must be even when mixup/cutmix is on (got {ns.batch_size}); "
                                       f"use an even size or --mixup 0 --cutmix 0")
    if getattr(ns, "distillation_type", "none") != "none":
        _check(bool(ns.teacher_path),
               f"--distillation-type {ns.distillation_type} needs --teacher-path (the teacher's weights)")
    check_output_folder("--output_dir", ns.output_dir)
    if ns.log != "same":
        check_output_folder("--log", ns.log)
    try:
        device = torch.device(ns.device)
    except RuntimeError:
        raise UserError(f"--device {ns.device!r} is not a device (expected cuda, cuda:N or cpu)") from None
    if device.type == "cuda":
        _check(torch.cuda.is_available(), f"--device {ns.device}: CUDA is not available here (use --device cpu)")
    else:
        _check(device.type == "cpu", f"--device {ns.device!r}: only cuda and cpu are supported")


# -- configurations ---------------------------------------------------------------------------------

def init_distributed(ns: argparse.Namespace) -> DistributedConfig:
    """Join the launcher's process group (if any) as the flags say."""
    return init_distributed_mode(ns.device, ns.dist_url, ns.local_rank, timeout_s=ns.dist_timeout)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input_size: int
    drop: float
    drop_path: float


@dataclass(frozen=True)
class RunConfig:
    """Where the run reads and writes, and how it reports."""

    output_dir: str
    log_dir: str  # the {timestamp}.log folder (--log, "same" resolved)
    overwrite: bool
    device: str  # the effective device (cuda:{local rank} under a launcher)
    seed: int
    finetune: str
    resume: str
    trust_checkpoint: bool
    eval: bool
    amp: bool
    log_period: int
    tf32: bool  # TF32 matmuls and convolutions on CUDA (--tf32)


@dataclass(frozen=True)
class PruneConfig:
    """main.py's pruning flags (`SearchOptions` is the part the search reads)."""

    method: int
    layers: int
    feed_percent: float
    need_hessian: bool
    hessian_embed: float
    hessian_estimator: str
    hessian_blocks: int
    micro_batch: int
    pickle_from: str
    normalize_by_layer: bool
    normalize_type: int
    silent: bool
    mask_aware_norm: bool
    search: SearchOptions
    compensate: str = "none"
    compensation_batches: int = 16
    compensation_ridge: float = 1e-2

    @property
    def flops_percentage(self) -> float:
        return self.search.flops_percentage


def model_config(ns) -> ModelConfig:
    return ModelConfig(name=ns.model, input_size=ns.input_size, drop=ns.drop, drop_path=ns.drop_path)


def run_config(ns, dist: DistributedConfig, resume: Optional[str] = None) -> RunConfig:
    return RunConfig(output_dir=ns.output_dir, log_dir=ns.output_dir if ns.log == "same" else ns.log,
                     overwrite=ns.overwrite, device=dist.device, seed=ns.seed, finetune=ns.finetune,
                     resume=ns.resume if resume is None else resume, trust_checkpoint=ns.trust_checkpoint,
                     eval=ns.eval, amp=ns.amp, log_period=ns.log_period, tf32=ns.tf32)


def data_config(ns, device: Optional[str] = None) -> DataConfig:
    """The data flags; pinning is on only where it helps (`--pin-mem` and a CUDA device)."""
    device = torch.device(device or ns.device)
    return DataConfig(
        data_set=ns.data_set, data_path=ns.data_path,
        input_size=ns.input_size, batch_size=ns.batch_size, num_workers=ns.num_workers,
        pin_memory=bool(ns.pin_mem) and device.type == "cuda", repeated_aug=getattr(ns, "repeated_aug", True),
        dist_eval=ns.dist_eval, seed=ns.seed, color_jitter=ns.color_jitter, hflip=ns.hflip, aa=ns.aa,
        train_interpolation=ns.train_interpolation, reprob=ns.reprob, remode=ns.remode, recount=ns.recount,
        crop_pct=ns.crop_pct, inception_mean_std=ns.not_imagenet_default_mean_and_std)


def mixup_config(ns) -> MixupConfig:
    return MixupConfig(mixup=ns.mixup, cutmix=ns.cutmix,
                       cutmix_minmax=tuple(ns.cutmix_minmax) if ns.cutmix_minmax is not None else None,
                       prob=ns.mixup_prob, switch_prob=ns.mixup_switch_prob, mode=ns.mixup_mode,
                       smoothing=ns.smoothing)


def distill_config(ns) -> DistillConfig:
    return DistillConfig(type=ns.distillation_type, alpha=ns.distillation_alpha, tau=ns.distillation_tau,
                         teacher_model=ns.teacher_model, teacher_path=ns.teacher_path)


def prune_config(ns) -> PruneConfig:
    search = SearchOptions(flops_percentage=ns.pruning_flops_percentage, flops_threshold=ns.pruning_flops_threshold,
                           layers=ns.pruning_layers, protect=ns.pruning_protect, use_interactions=ns.need_hessian,
                           seed=ns.seed, round_to=ns.round_to)
    return PruneConfig(method=ns.pruning_method, layers=ns.pruning_layers, feed_percent=ns.pruning_feed_percent,
                       need_hessian=ns.need_hessian, hessian_embed=ns.hessian_embed,
                       hessian_estimator=ns.hessian_estimator, hessian_blocks=ns.hessian_blocks,
                       micro_batch=ns.pruning_micro_batch, pickle_from=ns.pruning_pickle_from,
                       normalize_by_layer=ns.pruning_normalize_by_layer, normalize_type=ns.pruning_normalize_type,
                       silent=ns.pruning_silent, mask_aware_norm=ns.mask_aware_norm, search=search,
                       compensate=ns.compensate, compensation_batches=ns.compensation_batches,
                       compensation_ridge=ns.compensation_ridge)


def train_config(ns, world_size: int, start_epoch: Optional[int] = None) -> Tuple[TrainConfig, List[str]]:
    """The training configuration that runs, and the lines that explain its lr.

    DeiT's linear scaling of --lr with the total batch (reference 512); --min-lr and
    --warmup-lr are bounds below the peak lr: when the scaled lr falls under them (small
    total batches) they are lowered to it, else the cosine schedule would rise.
    """
    total_batch = ns.batch_size * world_size
    lr = ns.lr * total_batch / 512.0
    bounds, notes = {}, []
    for name, flag in (("min_lr", "--min-lr"), ("warmup_lr", "--warmup-lr")):
        value = getattr(ns, name)
        if value > lr:
            notes.append(f"{flag} lowered from {value:.3g} to {lr:.3g}, the lr scaled for a total batch of "
                         f"{total_batch} (else the schedule would rise above its peak)")
        bounds[name] = min(value, lr)
    cfg = TrainConfig(
        epochs=ns.epochs, start_epoch=ns.start_epoch if start_epoch is None else start_epoch, seed=ns.seed,
        total_batch=total_batch, lr=lr, opt=ns.opt, opt_eps=ns.opt_eps,
        opt_betas=tuple(ns.opt_betas) if ns.opt_betas is not None else None, momentum=ns.momentum,
        weight_decay=ns.weight_decay, clip_grad=ns.clip_grad, sched=ns.sched,
        lr_noise=tuple(ns.lr_noise) if ns.lr_noise is not None else None, lr_noise_pct=ns.lr_noise_pct,
        lr_noise_std=ns.lr_noise_std, warmup_lr=bounds["warmup_lr"], min_lr=bounds["min_lr"],
        decay_epochs=ns.decay_epochs, warmup_epochs=ns.warmup_epochs, cooldown_epochs=ns.cooldown_epochs,
        patience_epochs=ns.patience_epochs, decay_rate=ns.decay_rate, model_ema=ns.model_ema,
        model_ema_decay=ns.model_ema_decay, model_ema_force_cpu=ns.model_ema_force_cpu,
        model_ema_eval=ns.model_ema_eval, amp=ns.amp,
        log_period=ns.log_period, save_freq=ns.save_freq, output_dir=ns.output_dir,
        save_safetensors=ns.save_safetensors,
        mixup=mixup_config(ns), distill=distill_config(ns))
    return cfg, notes


def command_line() -> str:
    return " ".join(sys.argv)
