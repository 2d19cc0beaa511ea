"""SAViT pruning: score heads, MLP neurons and embedding channels of a ViT, search how
much of each to remove under a FLOPs budget, and save the gated model with 0/1 gates.

    python main.py --finetune deit_base.pth --data-path /imagenet --model deit_base_patch16_224 \
        --pruning_method 2 --pruning_layers 3 --pruning_flops_percentage 0.50 --need_hessian \
        --finetune_op 2 --output_dir out/

Multi-process: `torchrun --nproc_per_node N main.py ...` (each rank scores its share of
the batches; sums are all-reduced; rank 0 writes). Fine-tuning is main_deploy.py's job.
"""
import argparse
import json
import os
import time
from dataclasses import dataclass

import torch

from args import (WORLD_SIZE, DistributedConfig, ModelConfig, PruneConfig, ReferenceFlag, RunConfig,
                  add_augmentation_args, add_data_args, add_distributed_args, add_mixup_args, add_model_args,
                  add_pruning_args, add_reference_group, add_run_args, check_common, check_input_size, command_line,
                  data_config, error_text, init_distributed, mixup_config, model_config, prune_config,
                  reference_warnings, run_config, script_entry)
from datasets import DataConfig, MixupConfig, build_dataset, build_loaders, build_mixup, mean_std
from engine import evaluate
from losses import build_base_criterion
from models import PruneMask, ViTArch, arch_of, build_deploy_model, build_gated_model, is_deploy_name
from models.loading import load_pretrained
from pruning.compensate import compensate
from pruning.feed import feed_batches
from pruning.flops import format_table, mask_macs, mask_params, ptflops_macs
from pruning.scoring import PruningScorer, all_reduce_state
from pruning.pickles import HESSIAN_FILE, criteria_filename, load_pickles, save_pickles
from pruning.search import check_target_reachable, prune
from pruning.selection import normalize_by_layer
from utils import (Parser, UserError, atomic_copy, atomic_torch_save, atomic_write_json,
                   cleanup_distributed, is_main_process, model_checkpoint, prepare_output_dir,
                   refuse_to_clobber, set_seed, set_tf32, setup_logging)

CHECKPOINT_NAME = "checkpoint_pruned_00.pth"
MASK_NAME = "mask.json"
REPORT_NAME = "pruning_report.json"

ONE_SHOT = "SAViT prunes in one shot"
REFERENCE_FLAGS = [
    ReferenceFlag("--pruning_per_iteration", int, 100, (100,), ONE_SHOT),
    ReferenceFlag("--maximum_pruning_iterations", int, 1, (1,), ONE_SHOT),
    ReferenceFlag("--pruning_momentum", float, 0.0, (0.0,), ONE_SHOT),
    ReferenceFlag("--finetune_op", int, 2, (2,),
                  "main.py prunes unless --eval is given; fine-tune the pruned model with main_deploy.py"),
    ReferenceFlag("--epochs", int, 1, (1,), "main.py trains nothing; it scores --pruning_feed_percent of the data"),
    WORLD_SIZE,
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = Parser(description="SAViT pruning: score, search and save the gated model (main.py)")
    add_model_args(parser, ema=False)
    add_augmentation_args(parser, repeated_aug=False)  # the pruning pass sees training transforms and mixup
    add_mixup_args(parser)
    add_data_args(parser)
    add_run_args(parser, save_freq=False, seed_help="random seed (default: 0), one for all ranks of the pruning pass")
    add_distributed_args(parser)
    add_pruning_args(parser)
    add_reference_group(parser, REFERENCE_FLAGS)
    return parser


def check_pruning_flags(ns) -> ViTArch:
    """main.py's own checks that need no file to be read; returns the --model's architecture."""
    if ns.mask_aware_norm and not ns.eval:
        raise UserError("--mask_aware_norm is for --eval only: the pruning pass scores the gated model with the "
                        "reference's LayerNorm")
    if ns.resume:
        raise UserError("--resume: main.py prunes in one pass and has nothing to resume; "
                        "resume fine-tuning with main_deploy.py --resume")
    if is_deploy_name(ns.model):
        raise UserError(f"--model {ns.model!r}: main.py prunes a gated model; drop the '_deploy' suffix")
    with UserError.about("model"):
        arch = arch_of(ns.model)  # one line for a model SAViT cannot prune, before any data is read
    if ns.pruning_pickle_from and not os.path.isdir(ns.pruning_pickle_from):
        raise UserError(f"--pruning_pickle_from: not a directory: {ns.pruning_pickle_from!r}")
    return arch


@dataclass(frozen=True)
class PruneRun:
    """Everything main.py runs with, built once from the flags (`settings`)."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    mixup: MixupConfig
    prune: PruneConfig
    dist: DistributedConfig
    record: dict  # the flags with their effective values: logged, and stored in the checkpoint


def settings(ns: argparse.Namespace, dist: DistributedConfig) -> PruneRun:
    """main.py's configuration from its parsed flags and the process group it joined."""
    effective = {"device": dist.device, "world_size": dist.world_size, "rank": dist.rank,
                 "distributed": dist.distributed, "dist_backend": dist.backend}
    return PruneRun(run=run_config(ns, dist), model=model_config(ns), data=data_config(ns, dist.device),
                    mixup=mixup_config(ns), prune=prune_config(ns), dist=dist, record={**vars(ns), **effective})


def gated_model(cfg: PruneRun, arch: ViTArch, num_classes: int):
    model = build_gated_model(arch.with_options(num_classes=num_classes, drop_rate=cfg.model.drop,
                                                drop_path_rate=cfg.model.drop_path),
                              mask_aware_norm=cfg.prune.mask_aware_norm)
    if cfg.run.finetune:
        with UserError.about("finetune"):
            load_pretrained(model, cfg.run.finetune, trust=cfg.run.trust_checkpoint)
    return model


def score(cfg: PruneRun, model, dataset_train, num_classes: int, log):
    """The pruning pass: criteria dict and C (None in first-order mode)."""
    prune_cfg, data = cfg.prune, cfg.data
    mixup_fn = build_mixup(cfg.mixup, num_classes)
    criterion = build_base_criterion(mixup_fn is not None, cfg.mixup.smoothing)
    batches, mine, total = feed_batches(dataset_train, data.batch_size, prune_cfg.feed_percent, cfg.run.seed,
                                        cfg.dist.rank, cfg.dist.world_size, mixup_fn, data.num_workers,
                                        data.pin_memory)
    log(f"pruning pass: {total} batches of {data.batch_size} ({prune_cfg.feed_percent:.1%} of the training set), "
        f"{mine} on this process; method {prune_cfg.method}, interactions {'on' if prune_cfg.need_hessian else 'off'}")
    scorer = PruningScorer(model, criterion, method=prune_cfg.method, need_hessian=prune_cfg.need_hessian,
                           hessian_embed=prune_cfg.hessian_embed, seed=cfg.run.seed, micro_batch=prune_cfg.micro_batch,
                           estimator=prune_cfg.hessian_estimator, hessian_blocks=prune_cfg.hessian_blocks)
    model.eval()
    if mine:  # an error on one rank ends every rank (utils/job_guard.py)
        scorer.score_batches(batches, mine, first_index=cfg.dist.rank, index_stride=cfg.dist.world_size,
                             log=log, log_every=cfg.run.log_period)
    criteria, interactions = scorer.finalize(all_reduce_state(scorer.state()))
    return criteria, interactions


def copy_pickles(src: str, dst: str, method: int) -> list:
    """Copy the criteria pickles of `method` and hessian.pickle (when there) from `src` to `dst`, atomically."""
    if os.path.isdir(dst) and os.path.samefile(src, dst):
        return []
    names = [criteria_filename(method, layer) for layer in range(3)] + [HESSIAN_FILE]
    copied = []
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            atomic_copy(os.path.join(src, name), os.path.join(dst, name))
            copied.append(os.path.join(dst, name))
    return copied


def compensate_kept_weights(cfg: PruneRun, model, mask, report: dict, log) -> None:
    """--compensate: refit the kept weights of the gated model (mask applied) on calibration batches,
    the first --compensation_batches of the pass's permutation without augmentation; every rank
    takes its share and the moments are all-reduced. Records what was done in `report`."""
    prune_cfg, data = cfg.prune, cfg.data
    calibration, _ = build_dataset(True, data, what="training set (compensation's calibration images)",
                                   augment=False)
    batches, mine, total = feed_batches(calibration, data.batch_size, 1.0, cfg.run.seed, cfg.dist.rank,
                                        cfg.dist.world_size, None, data.num_workers, data.pin_memory,
                                        count=prune_cfg.compensation_batches)
    images = [x for x, _ in batches]
    log(f"compensation {prune_cfg.compensate}: {total} calibration batches of {data.batch_size} "
        f"({mine} on this process), no augmentation")
    mask.apply_to(model)
    start = time.time()
    layers = compensate(model, images, prune_cfg.compensate, prune_cfg.compensation_ridge, log=log)
    seconds = time.time() - start
    report["compensation"] = {"method": prune_cfg.compensate, "batches": total, "images": total * data.batch_size,
                              "ridge": prune_cfg.compensation_ridge if prune_cfg.compensate == "ls" else None,
                              "seconds": seconds, "layers": layers}
    log(f"compensation {prune_cfg.compensate} done in {seconds:.1f} s ({len(layers)} layers refit)")


def write_outputs(cfg: PruneRun, model, mask, report, criteria, interactions, log) -> None:
    """Rank 0: pickles, mask JSON, report, and the gated checkpoint with 0/1 gates (all atomic).

    The checkpoint holds tensors and plain values only (it loads with `weights_only=True`);
    the mask records the model's class count and input size, so every tool counts the same.
    """
    out, prune_cfg = cfg.run.output_dir, cfg.prune
    mask = mask.for_model(model.arch.num_classes, model.arch.img_size)
    if not prune_cfg.pickle_from:
        for path in save_pickles(out, prune_cfg.method, criteria, interactions):
            log(f"wrote {path}")
    else:  # the new folder can serve as --pruning_pickle_from too
        for path in copy_pickles(prune_cfg.pickle_from, out, prune_cfg.method):
            log(f"copied {path} from {prune_cfg.pickle_from}")
    mask.save_json(os.path.join(out, MASK_NAME))
    atomic_write_json(report, os.path.join(out, REPORT_NAME))
    mask.apply_to(model)
    model.normalization = dict(zip(("mean", "std"), mean_std(cfg.data.inception_mean_std)))
    checkpoint = model_checkpoint(model, mask, cfg.record)
    if "compensation" in report:  # which refit the kept weights carry (pruning/compensate.py)
        checkpoint["compensation"] = {k: v for k, v in report["compensation"].items() if k != "layers"}
    atomic_torch_save(checkpoint, os.path.join(out, CHECKPOINT_NAME))
    log(f"wrote {os.path.join(out, CHECKPOINT_NAME)} (gated model, 0/1 gates) and {os.path.join(out, MASK_NAME)}")


def run_pruning(cfg: PruneRun, model, dataset_train, num_classes, device, log, pickles=None) -> None:
    """Score (or take `pickles`: (criteria, C) read by --pruning_pickle_from), search, report, write."""
    arch, prune_cfg = model.arch, cfg.prune
    if pickles is not None:
        log(f"criteria and interactions read from {prune_cfg.pickle_from}: no data pass")
        criteria, interactions = pickles
    else:
        criteria, interactions = score(cfg, model, dataset_train, num_classes, log)
    if prune_cfg.normalize_by_layer:
        criteria = normalize_by_layer(criteria, prune_cfg.normalize_type, arch)
    mask, report = prune(criteria, interactions, arch, prune_cfg.search, model_name=cfg.model.name)
    if interactions is not None:
        log("interaction matrix C (heads, mlp, embed):\n" + "\n".join(
            "  " + "  ".join(f"{v:+.4e}" for v in row) for row in interactions.tolist()))
    log(f"search: {json.dumps(report.get('search', {}))}")
    for line in mask.summary_lines()[:3] if prune_cfg.silent else mask.summary_lines():
        log(line)
    for line in format_table(arch, mask):
        log(line)
    if prune_cfg.compensate != "none":  # every rank: the moments are all-reduced
        compensate_kept_weights(cfg, model, mask, report, log)
    if not is_main_process():  # the count (a forward pass of the deploy model) and the outputs are rank 0's
        return
    deploy = build_deploy_model(arch, mask)
    counted = ptflops_macs(deploy.eval(), arch)
    before = mask_macs(arch)["total"]
    achieved = 1 - counted["total"] / before
    report["deploy_ptflops_macs"] = counted["total"]
    report["deploy_params"] = counted["params"]
    report["achieved_reduction_deploy"] = achieved
    report["deploy_structure"] = mask.structure()
    log(f"FLOPs reduction (deploy model, ptflops): {achieved:.4%} (target {prune_cfg.flops_percentage:.4%}); "
        f"GMACs {before / 1e9:.3f} -> {counted['total'] / 1e9:.3f}; params {counted['params'] / 1e6:.3f} M")
    if cfg.run.output_dir:
        write_outputs(cfg, model, mask, report, criteria, interactions, log)


@script_entry
def main(ns: argparse.Namespace) -> None:
    # every input is checked before anything is written: a bad flag, file or data folder
    # leaves --output_dir untouched (the parser has checked each flag's range)
    arch = check_pruning_flags(ns)
    check_input_size(ns, arch)
    check_common(ns)
    cfg = settings(ns, init_distributed(ns))
    run, prune_cfg = cfg.run, cfg.prune
    device = torch.device(run.device)
    tf32_line = set_tf32(run.tf32)  # explicitly: a global TF32 setting of the caller must not leak into the scores
    set_seed(run.seed)
    arch = arch.with_options(img_size=cfg.model.input_size)
    prune_now = not run.eval
    pickles = None
    if prune_now:  # before any data is read
        check_target_reachable(arch, prune_cfg.flops_percentage, prune_cfg.layers, prune_cfg.search.protect,
                               prune_cfg.search.round_to)
        if prune_cfg.pickle_from:
            pickles = load_pickles(prune_cfg.pickle_from, prune_cfg.method, arch, prune_cfg.need_hessian)
    dataset_train = dataset_val = num_classes = None
    if prune_now and pickles is None:
        dataset_train, num_classes = build_dataset(True, cfg.data, what="training set while pruning")
    if run.eval or num_classes is None:  # from pickles the classifier size still comes from the data
        dataset_val, num_classes = build_dataset(False, cfg.data)
    model = gated_model(cfg, arch, num_classes).to(device)

    if prune_now:  # last check, before anything is written (--eval writes no checkpoint)
        refuse_to_clobber(run.output_dir, CHECKPOINT_NAME, resuming=False, overwrite=run.overwrite)

    logger = setup_logging(run.log_dir, "savit.prune")
    log = logger.info
    try:
        log("command: " + command_line())
        log("configuration: " + json.dumps(cfg.record, sort_keys=True, default=str))
        for line in reference_warnings(ns, REFERENCE_FLAGS):
            log("warning: " + line)
        log(f"{tf32_line}; the pruning pass is not in full fp32" if run.tf32 else
            "precision: scores in full fp32 (TF32 off for CUDA matmuls and convolutions; --tf32 to allow it)")
        prepare_output_dir(run.output_dir, log)
        if prune_now and run.output_dir and os.path.exists(os.path.join(run.output_dir, CHECKPOINT_NAME)):
            log(f"--overwrite: replacing the earlier run's outputs in {run.output_dir}")
        gates = PruneMask.from_gate_state_dict(model.state_dict())  # all ones unless --finetune is a pruned model
        log(f"model {cfg.model.name}: {mask_params(model.arch, gates) / 1e6:.2f} M parameters, "
            f"{mask_macs(model.arch, gates)['total'] / 1e9:.4f} GMACs under its gates, {num_classes} classes")
        if run.eval:
            _, loader_val = build_loaders(cfg.data, None, dataset_val, cfg.dist.distributed)
            stats = evaluate(loader_val, model, device, amp=run.amp, print_freq=run.log_period, print_fn=log)
            log(f"accuracy of the gated model ({'mask-aware' if prune_cfg.mask_aware_norm else 'reference'} LayerNorm) "
                f"on {len(dataset_val)} images: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  "
                f"loss {stats['loss']:.4f}")
        if prune_now:
            start = time.time()
            run_pruning(cfg, model, dataset_train, num_classes, device, log, pickles)
            log(f"pruning done in {time.time() - start:.1f} s")
    except UserError as err:  # e.g. a non-finite loss or an unreadable image: record it in the log too
        logger.error(f"error: {error_text(err)}")
        raise
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
