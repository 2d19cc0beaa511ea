"""Build the physically smaller ViT from a SAViT mask and fine-tune it (DeiT recipe,
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
import re
import shutil
from dataclasses import dataclass

import torch

from args import (WORLD_SIZE, DistributedConfig, ModelConfig, ReferenceFlag, RunConfig, add_fine_tuning_groups,
                  add_reference_group, check_common, check_input_size, command_line, data_config, error_text,
                  init_distributed, model_config, reference_warnings, run_config, script_entry, train_config)
from datasets import DataConfig, build_dataset, build_loaders, build_mixup, mean_std
from engine import LAST_CHECKPOINT, TrainConfig, evaluate, fit, measure_throughput
from losses import build_teacher
from models import PruneMask, ViTArch, arch_of, build_deploy_model, gated_name_of, is_deploy_name, load_pruned
from pruning.flops import ptflops_macs
from utils import (Parser, UserError, cleanup_distributed, is_main_process, load_resume_weights, load_torch_file,
                   prepare_output_dir, refuse_to_clobber, set_seed, set_tf32, setup_logging)

CHECKPOINT_NAME = LAST_CHECKPOINT
REFERENCE_FLAGS = [
    ReferenceFlag("--pruning_flops_percentage", float, 0.0, (0.0,),
                  "the pruned structure comes from --masked_model; prune with main.py"),
    ReferenceFlag("--finetune_op", int, 1, (1,), "main_deploy.py always fine-tunes (or --eval / --throughput)"),
    ReferenceFlag("--resplit", bool, False, (False,), "no augmentation splits are used (accepted as in DeiT)"),
    WORLD_SIZE,
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = Parser(description="SAViT fine-tuning of the physically pruned ViT (main_deploy.py)")
    add_fine_tuning_groups(parser, seed_help="random seed (default: 0); rank r uses seed + r")
    add_reference_group(parser, REFERENCE_FLAGS)
    return parser


def resolve_auto_resume(ns) -> str:
    """The checkpoint to resume from: --resume, or with --auto_resume --output_dir/checkpoint.pth when it exists."""
    if not ns.auto_resume:
        return ns.resume
    if ns.resume:
        raise UserError(f"--auto_resume and --resume {ns.resume!r} exclude each other: --auto_resume resumes "
                        f"from --output_dir/{CHECKPOINT_NAME}; pass one of them")
    if not ns.output_dir:
        raise UserError(f"--auto_resume needs --output_dir (it resumes from --output_dir/{CHECKPOINT_NAME})")
    candidate = os.path.join(ns.output_dir, CHECKPOINT_NAME)
    return candidate if os.path.isfile(candidate) else ""


def check_deploy_flags(ns, resume: str) -> ViTArch:
    """Checks of main_deploy.py's own flags that need no file to be read; returns the --model's architecture."""
    if not is_deploy_name(ns.model):
        raise UserError(f"--model {ns.model!r}: main_deploy.py builds a deploy model; add the '_deploy' suffix "
                        f"(e.g. {ns.model}_deploy)")
    with UserError.about("model"):
        arch = arch_of(ns.model)  # one line for a model SAViT cannot prune, before any data is read
    for flag, path in (("--resume", resume), ("--masked_model", ns.masked_model), ("--finetune", ns.finetune)):
        if path and not os.path.isfile(path):
            raise UserError(f"{flag}: file not found: {path!r}")
    if ns.masked_model and ns.finetune and not ns.masked_model.endswith(".json"):
        raise UserError(f"--finetune is read only with a mask JSON --masked_model, but {ns.masked_model!r} is a "
                        f"checkpoint that carries its own weights (drop --finetune or pass the mask JSON)")
    return arch


@dataclass(frozen=True)
class DeployRun:
    """Everything main_deploy.py runs with, built once from the flags (`settings`)."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    dist: DistributedConfig
    masked_model: str
    throughput: bool
    auto_resume: bool
    record: dict  # the flags with their effective values: logged, and stored in each checkpoint
    notes: tuple  # how the effective values were derived from the flags (logged)


def settings(ns: argparse.Namespace, dist: DistributedConfig, resume: str = "") -> DeployRun:
    """main_deploy.py's configuration from its flags, the process group and the resolved --resume."""
    train, notes = train_config(ns, dist.world_size)
    effective = {"device": dist.device, "world_size": dist.world_size, "rank": dist.rank,
                 "distributed": dist.distributed, "dist_backend": dist.backend, "resume": resume,
                 "lr": train.lr, "min_lr": train.min_lr, "warmup_lr": train.warmup_lr}
    return DeployRun(run=run_config(ns, dist, resume), model=model_config(ns), data=data_config(ns, dist.device),
                     train=train, dist=dist, masked_model=ns.masked_model, throughput=ns.throughput,
                     auto_resume=ns.auto_resume, record={**vars(ns), **effective}, notes=tuple(notes))


def build_student(cfg: DeployRun, arch, resume_checkpoint):
    """(mask, deploy model) from --masked_model (+ --finetune), else --resume's mask, else --finetune's
    weights (nothing pruned); the model records the run's input normalisation for its checkpoints."""
    run, name = cfg.run, cfg.model.name
    if cfg.masked_model or resume_checkpoint is None or not isinstance(resume_checkpoint.get("mask"), dict):
        with UserError.about("masked_model" if cfg.masked_model else "finetune"):
            model = load_pruned(cfg.masked_model or None, arch, run.finetune or None, trust=run.trust_checkpoint,
                                classes_from_checkpoint=cfg.throughput, target=f"--model {name}")
        mask = model.mask
        if mask is None:
            raise UserError(f"{cfg.masked_model!r} records the pruned structure but not the mask: pass main.py's "
                            f"checkpoint_pruned_00.pth or mask.json", field="masked_model")
    else:  # the weights come with the rest of the training state (load_resume_weights)
        with UserError.about("resume"):
            mask = PruneMask.from_dict(resume_checkpoint["mask"], source=run.resume)
        try:
            model = build_deploy_model(arch, mask)
        except UserError as err:  # the file may be fine, just not for this --model
            raise UserError(f"{run.resume!r} does not fit --model {name}: {err}", field="resume") from None
    mask.model = mask.model or gated_name_of(name)
    model.normalization = dict(zip(("mean", "std"), mean_std(cfg.data.inception_mean_std)))
    return mask, model


def start_afresh(out: str, log) -> None:
    """--overwrite over an earlier run: its log, TensorBoard events and extra checkpoints go, so that
    nothing of it is mistaken for this run's; checkpoint.pth is replaced when this run writes its own."""
    if not os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        return
    log(f"--overwrite: {out} holds an earlier run; its checkpoints are replaced as this run writes them")
    earlier = [name for name in sorted(os.listdir(out))
               if name in ("log.txt", "tensorboard") or re.fullmatch(r"(best_checkpoint|checkpoint_\d+)\.\w+", name)]
    for name in earlier:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if earlier:
        log(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {out}")


def log_complexity(model, arch, mask, log) -> dict:
    """ptflops count of the deploy model next to the unpruned model's; returns the numbers.

    Rank 0 only (it builds and runs the unpruned model): the other ranks log none of it and get {}.
    """
    if not is_main_process():
        return {}
    full = ptflops_macs(build_deploy_model(arch).eval(), arch)
    ours = ptflops_macs(model, arch)
    kept, total = mask.kept_counts(), mask.total_counts()
    log(f"unpruned model: {full['total'] / 1e9:.4f} GMACs, {full['params'] / 1e6:.3f} M params")
    log(f"deploy model: {ours['total'] / 1e9:.4f} GMACs, {ours['params'] / 1e6:.3f} M params; "
        f"FLOPs reduction {1 - ours['total'] / full['total']:.2%}, params reduction {1 - ours['params'] / full['params']:.2%}")
    log(f"kept heads {kept['heads']}/{total['heads']}, MLP neurons {kept['mlp']}/{total['mlp']}, "
        f"embedding channels {kept['embed']}/{total['embed']}; structure {json.dumps(mask.structure())}")
    return {"gmacs": ours["total"] / 1e9, "params": ours["params"], "gmacs_unpruned": full["total"] / 1e9}


def run_throughput(cfg: DeployRun, model, arch, complexity, device, log) -> None:
    """Images/s of the unpruned and the deploy model side by side: inference, then a training step."""
    unpruned = build_deploy_model(arch)
    batch = cfg.data.batch_size
    for train_step, kind in ((False, "inference"), (True, "training step")):
        ips = [measure_throughput(net, batch, arch.img_size, device, train_step=train_step, amp=cfg.run.amp)
               for net in (unpruned, model)]
        log(f"throughput ({kind}, batch {batch}, {device}): unpruned {ips[0]:.1f} images/s, "
            f"deploy {ips[1]:.1f} images/s; speedup {ips[1] / ips[0]:.2f}x "
            f"(FLOPs ratio {complexity['gmacs_unpruned'] / complexity['gmacs']:.2f}x)")


@script_entry
def main(ns: argparse.Namespace) -> None:
    # every input (flags, data, mask, weights, teacher, resume checkpoint) is checked before
    # anything is written: bad input leaves --output_dir untouched
    resume = resolve_auto_resume(ns)
    arch = check_deploy_flags(ns, resume)
    check_input_size(ns, arch)
    check_common(ns)
    cfg = settings(ns, init_distributed(ns), resume)
    run = cfg.run
    device = torch.device(run.device)
    tf32_line = set_tf32(run.tf32)
    set_seed(run.seed + cfg.dist.rank)
    training = not (run.eval or cfg.throughput)
    dataset_val, num_classes = build_dataset(False, cfg.data) if not cfg.throughput else (None, None)
    dataset_train = build_dataset(True, cfg.data)[0] if training else None
    arch = arch.with_options(img_size=cfg.model.input_size, num_classes=num_classes, drop_rate=cfg.model.drop,
                             drop_path_rate=cfg.model.drop_path)
    resume_checkpoint = (load_torch_file(run.resume, "checkpoint", trust=run.trust_checkpoint, field="resume")
                         if run.resume else None)
    if resume_checkpoint is not None and not isinstance(resume_checkpoint, dict):
        raise UserError(f"--resume {run.resume!r} is not a training checkpoint (expected a dict)")
    mask, model = build_student(cfg, arch, resume_checkpoint)
    arch = model.arch  # with --throughput, the class count comes from --masked_model
    if resume_checkpoint is not None:
        load_resume_weights(resume_checkpoint, run.resume, model, mask)
        del resume_checkpoint["model"]  # loaded; no second copy of the weights for the whole run
    teacher = None
    distill = cfg.train.distill
    if training and distill.type != "none":
        teacher = build_teacher(distill.teacher_model, distill.teacher_path, num_classes, device,
                                trust=run.trust_checkpoint)
    loader_train, loader_val = build_loaders(cfg.data, dataset_train, dataset_val, cfg.dist.distributed)

    if training:  # last check, before anything is written
        refuse_to_clobber(run.output_dir, CHECKPOINT_NAME, resuming=bool(run.resume), overwrite=run.overwrite,
                          how="resume it with --auto_resume (or --resume FILE), ")

    logger = setup_logging(run.log_dir, "savit.deploy")
    log = logger.info
    try:
        log("command: " + command_line())
        log("configuration: " + json.dumps(cfg.record, sort_keys=True, default=str))
        for line in cfg.notes:
            log(line)
        for line in reference_warnings(ns, REFERENCE_FLAGS):
            log("warning: " + line)
        log(tf32_line)
        prepare_output_dir(run.output_dir, log)
        if cfg.auto_resume:
            log(f"--auto_resume: resuming from {run.resume}" if run.resume else
                f"--auto_resume: no {os.path.join(run.output_dir, CHECKPOINT_NAME)} yet; starting from epoch 0")
        if training and not run.resume and run.output_dir and is_main_process():
            start_afresh(run.output_dir, log)
        complexity = log_complexity(model.eval(), arch, mask, log)
        if cfg.throughput:
            if is_main_process():  # the other ranks would only time the same models again, unlogged
                run_throughput(cfg, model, arch, complexity, device, log)
        elif run.eval:
            stats = evaluate(loader_val, model.to(device), device, amp=run.amp, print_freq=run.log_period,
                             print_fn=log)
            log(f"accuracy of the deploy model on {len(dataset_val)} images: top-1 {stats['acc1']:.2f}%  "
                f"top-5 {stats['acc5']:.2f}%  loss {stats['loss']:.4f}")
        else:
            result = fit(cfg.train, model.to(device), mask, loader_train, loader_val,
                         build_mixup(cfg.train.mixup, num_classes), device,
                         teacher=teacher, distributed=cfg.dist.distributed, resume_checkpoint=resume_checkpoint,
                         resume_path=run.resume, record=cfg.record, log=log,
                         epoch_fields={"n_parameters": complexity["params"], "gmacs": complexity["gmacs"]}
                         if complexity else None)  # log.txt is rank 0's
            size = f" ({complexity['gmacs']:.4f} GMACs, {complexity['params'] / 1e6:.3f} M params)" \
                if complexity else ""
            log(f"done: best top-1 {result['max_accuracy']:.2f}%{size} after {cfg.train.epochs} epochs; "
                f"training time {datetime.timedelta(seconds=int(result['seconds']))}")
    except UserError as err:  # e.g. a non-finite loss or an unreadable image: record it in the log file too
        logger.error(f"error: {error_text(err)}")
        raise
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
