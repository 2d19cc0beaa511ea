"""SAViT pruning: score heads, MLP neurons and embedding channels of a DeiT, search how
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
import sys
import time

import torch

from args import common_parents, validate_common
from datasets import build_dataset, build_loaders, build_mixup
from engine import evaluate
from losses import build_base_criterion
from models import arch_of, create_model, gated_name_of, is_deploy_name, list_models
from models.loading import load_pretrained
from pruning.deploy import deploy_structure
from pruning.feed import feed_batches
from pruning.flops import format_table, mask_macs, mask_params, ptflops_macs
from pruning.importance import PruningScorer, all_reduce_state
from pruning.mask import PruneMask
from pruning.pickles import HESSIAN_FILE, criteria_filename, load_pickles, save_pickles
from pruning.search import SearchOptions, check_target_reachable, prune
from pruning.selection import normalize_by_layer
from utils import (UserError, all_reduce_sum, atomic_copy, atomic_torch_save, atomic_write_json, cleanup_distributed,
                   cli_entry, error_line, init_distributed_mode, is_main_process, model_checkpoint, prepare_output_dir,
                   refuse_to_clobber, set_seed, setup_logging)

CHECKPOINT_NAME = "checkpoint_pruned_00.pth"
MASK_NAME = "mask.json"
REPORT_NAME = "pruning_report.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SAViT pruning (main.py)", parents=common_parents())
    g = parser.add_argument_group("pruning")
    g.add_argument("--pruning_method", type=int, default=2, choices=[1, 2, 3, 4],
                   help="importance: 1 mean|grad*out|, 2 (g*dL/dg)^2, 3 sum_b(sum_n grad*out)^2, "
                        "4 sum|grad*out| / positions (default: 2)")
    g.add_argument("--pruning_layers", type=int, default=3, choices=[0, 1, 2, 3],
                   help="what to prune: 0 heads, 1 MLP neurons, 2 embedding channels, 3 all (default: 3)")
    g.add_argument("--pruning_feed_percent", type=float, default=0.1,
                   help="fraction of the training batches used for scoring (at least one batch; default: 0.1)")
    g.add_argument("--pruning_flops_threshold", type=float, default=1e-4,
                   help="tolerance of the search's FLOPs constraint (default: 1e-4)")
    g.add_argument("--need_hessian", action="store_true",
                   help="estimate the interactions between components (SAViT); without it, first-order mode")
    g.add_argument("--hessian_embed", type=float, default=6.0,
                   help="scale of the embedding normaliser of the interactions (default: 6.0)")
    g.add_argument("--hessian_estimator", default="reference", choices=["reference", "rb"],
                   help="estimator of the interactions: reference (one block m per pair) or rb (the exact "
                        "mean over m <= l: same expectation and cost, lower variance; default: reference)")
    g.add_argument("--hessian_blocks", type=int, default=1,
                   help="draws of the block l per batch for the interactions, averaged; each costs 2 more "
                        "Hessian-vector products (default: 1)")
    g.add_argument("--pruning_micro_batch", type=int, default=0,
                   help="score each batch in chunks of this many images: same criteria and C, peak memory "
                        "about proportional to the chunk (0: whole batches; default: 0)")
    g.add_argument("--pruning_pickle_from", type=str, default="",
                   help="folder with criteria/hessian pickles of an earlier run: skip scoring")
    g.add_argument("--pruning_normalize_by_layer", action="store_true",
                   help="divide each block's criteria by their norm (see --pruning_normalize_type)")
    g.add_argument("--pruning_normalize_type", type=int, default=2, choices=[1, 2], help="1: L1, 2: L2 (default: 2)")
    g.add_argument("--pruning_protect", action="store_true",
                   help="never prune the top 5%% units of each block and component (default: on)")
    g.add_argument("--no-pruning_protect", "--no_pruning_protect", action="store_false", dest="pruning_protect")
    g.add_argument("--pruning_silent", action="store_true", help="no per-block listing in the output")
    g.add_argument("--mask_aware_norm", action="store_true",
                   help="with --eval: LayerNorm statistics over the kept embedding channels only (the exact "
                        "pruned network); default is the reference's LayerNorm over all channels")
    # accepted for the reference's commands; SAViT prunes in one shot, so they change nothing
    g.add_argument("--pruning_per_iteration", type=int, default=100, help="(reference flag; unused in one-shot SAViT)")
    g.add_argument("--maximum_pruning_iterations", type=int, default=1,
                   help="(reference flag; unused in one-shot SAViT)")
    g.add_argument("--pruning_momentum", type=float, default=0.0, help="(reference flag; unused in one-shot SAViT)")
    parser.set_defaults(pruning_protect=True)
    return parser


def validate_pruning_args(args) -> None:
    if args.mask_aware_norm and args.finetune_op == 2:
        raise UserError("--mask_aware_norm is for --eval only: the pruning pass scores the gated model with the "
                        "reference's LayerNorm")
    if args.resume:
        raise UserError("--resume: main.py prunes in one pass and has nothing to resume; "
                        "resume fine-tuning with main_deploy.py --resume")
    if not 0 < args.pruning_feed_percent <= 1:
        raise UserError(f"--pruning_feed_percent must be in (0, 1], got {args.pruning_feed_percent}")
    if not args.pruning_flops_threshold > 0:
        raise UserError(f"--pruning_flops_threshold must be > 0, got {args.pruning_flops_threshold}")
    if args.finetune_op == 2 and not 0 < args.pruning_flops_percentage < 1:
        raise UserError(f"--pruning_flops_percentage must be in (0, 1) to prune, got {args.pruning_flops_percentage}")
    if is_deploy_name(args.model) or gated_name_of(args.model) not in list_models():
        raise UserError(f"--model {args.model!r}: main.py prunes a gated DeiT; choose from "
                        f"{', '.join(n for n in list_models() if not is_deploy_name(n))}")
    if args.finetune_op not in (2,) and not args.eval:
        raise UserError("main.py prunes (--finetune_op 2) or evaluates (--eval); "
                        "fine-tune the pruned model with main_deploy.py")
    if args.pruning_pickle_from and not os.path.isdir(args.pruning_pickle_from):
        raise UserError(f"--pruning_pickle_from: not a directory: {args.pruning_pickle_from!r}")


def build_gated_model(args, num_classes: int):
    model = create_model(args.model, num_classes=num_classes, img_size=args.input_size, drop_rate=args.drop,
                         drop_path_rate=args.drop_path, mask_aware_norm=args.mask_aware_norm)
    if args.finetune:
        try:
            load_pretrained(model, args.finetune, trust=args.trust_checkpoint)
        except UserError as err:  # name the flag in every loading error
            raise UserError(str(err) if str(err).startswith("--finetune") else f"--finetune: {err}") from None
    return model


def score(args, model, dataset_train, num_classes: int, device, log):
    """The pruning pass: criteria dict and C (None in first-order mode)."""
    mixup_fn = build_mixup(args, num_classes)
    criterion = build_base_criterion(mixup_fn is not None, args.smoothing)
    batches, mine, total = feed_batches(dataset_train, args.batch_size, args.pruning_feed_percent, args.seed,
                                        args.rank, args.world_size, mixup_fn, args.num_workers,
                                        args.pin_mem and device.type == "cuda")
    log(f"pruning pass: {total} batches of {args.batch_size} ({args.pruning_feed_percent:.1%} of the training set), "
        f"{mine} on this process; method {args.pruning_method}, interactions {'on' if args.need_hessian else 'off'}")
    scorer = PruningScorer(model, criterion, method=args.pruning_method, need_hessian=args.need_hessian,
                           hessian_embed=args.hessian_embed, seed=args.seed,
                           micro_batch=args.pruning_micro_batch,
                           estimator=args.hessian_estimator, hessian_blocks=args.hessian_blocks)
    model.eval()
    error = None
    if mine:
        try:
            scorer.score_batches(batches, mine, first_index=args.rank, index_stride=args.world_size,
                                 log=log, log_every=args.log_period)
        except UserError as err:  # reach the all-reduce below so that every rank stops together
            error = err
    if all_reduce_sum(torch.tensor([1.0 if error else 0.0], device=device)).item():
        raise error or UserError("the pruning pass stopped on another process (see its error)")
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


def write_outputs(args, model, mask, report, criteria, interactions, log) -> None:
    """Rank 0: pickles, mask JSON, report, and the gated checkpoint with 0/1 gates (all atomic).

    The checkpoint holds tensors and plain values only (it loads with `weights_only=True`);
    the mask records the model's class count and input size, so every tool counts the same.
    """
    out = args.output_dir
    mask.for_model(model.arch.num_classes, model.arch.img_size)
    if not args.pruning_pickle_from:
        for path in save_pickles(out, args.pruning_method, criteria, interactions):
            log(f"wrote {path}")
    else:  # the new folder can serve as --pruning_pickle_from too
        for path in copy_pickles(args.pruning_pickle_from, out, args.pruning_method):
            log(f"copied {path} from {args.pruning_pickle_from}")
    mask.save_json(os.path.join(out, MASK_NAME))
    atomic_write_json(report, os.path.join(out, REPORT_NAME))
    mask.apply_to(model)
    atomic_torch_save(model_checkpoint(model, mask, args), os.path.join(out, CHECKPOINT_NAME))
    log(f"wrote {os.path.join(out, CHECKPOINT_NAME)} (gated model, 0/1 gates) and {os.path.join(out, MASK_NAME)}")


def run_pruning(args, model, dataset_train, num_classes, device, log, pickles=None) -> None:
    """Score (or take `pickles`: (criteria, C) read by --pruning_pickle_from), search, report, write."""
    arch = model.arch
    if pickles is not None:
        log(f"criteria and interactions read from {args.pruning_pickle_from}: no data pass")
        criteria, interactions = pickles
    else:
        criteria, interactions = score(args, model, dataset_train, num_classes, device, log)
    if args.pruning_normalize_by_layer:
        criteria = normalize_by_layer(criteria, args.pruning_normalize_type)
    mask, report = prune(criteria, interactions, arch, SearchOptions.from_args(args), model_name=args.model)
    if interactions is not None:
        log("interaction matrix C (heads, mlp, embed):\n" + "\n".join(
            "  " + "  ".join(f"{v:+.4e}" for v in row) for row in interactions.tolist()))
    log(f"search: {json.dumps(report.get('search', {}))}")
    if not args.pruning_silent:
        for line in mask.summary_lines():
            log(line)
    else:
        for line in mask.summary_lines()[:3]:
            log(line)
    for line in format_table(arch, mask):
        log(line)
    deploy = create_model(gated_name_of(args.model) + "_deploy", num_classes=num_classes, img_size=args.input_size,
                          mask=mask)
    counted = ptflops_macs(deploy.eval(), arch)
    before = mask_macs(arch)["total"]
    achieved = 1 - counted["total"] / before
    report["deploy_ptflops_macs"] = counted["total"]
    report["deploy_params"] = counted["params"]
    report["achieved_reduction_deploy"] = achieved
    report["deploy_structure"] = deploy_structure(mask)
    log(f"FLOPs reduction (deploy model, ptflops): {achieved:.4%} (target {args.pruning_flops_percentage:.4%}); "
        f"GMACs {before / 1e9:.3f} -> {counted['total'] / 1e9:.3f}; params {counted['params'] / 1e6:.3f} M")
    if is_main_process() and args.output_dir:
        write_outputs(args, model, mask, report, criteria, interactions, log)


@cli_entry
def main(args) -> None:
    # every input is checked before anything is written: a bad flag, file or data folder
    # leaves --output_dir untouched. Own checks first: --pruning_flops_percentage has a
    # narrower range here, (0, 1), than validate_common's [0, 1)
    validate_pruning_args(args)
    validate_common(args)
    init_distributed_mode(args)
    device = torch.device(args.device)
    set_seed(args.seed)
    arch = arch_of(args.model, img_size=args.input_size)
    prune_now = args.finetune_op == 2
    pickles = None
    if prune_now:  # before any data is read
        check_target_reachable(arch, args.pruning_flops_percentage, args.pruning_layers, args.pruning_protect)
        if args.pruning_pickle_from:
            pickles = load_pickles(args.pruning_pickle_from, args.pruning_method, arch, args.need_hessian)
    dataset_train = dataset_val = num_classes = None
    if prune_now and pickles is None:
        dataset_train, num_classes = build_dataset(True, args, what="training set while pruning")
    if args.eval or num_classes is None:  # from pickles the classifier size still comes from the data
        dataset_val, num_classes = build_dataset(False, args)
    model = build_gated_model(args, num_classes).to(device)

    if prune_now:  # last check, before anything is written (--eval writes no checkpoint)
        refuse_to_clobber(args.output_dir, CHECKPOINT_NAME, resuming=False, overwrite=args.overwrite)

    logger = setup_logging(args.output_dir if args.log == "same" else args.log, "savit.prune")
    log = logger.info
    try:
        log("command: " + " ".join(sys.argv))
        log("configuration: " + json.dumps(vars(args), sort_keys=True, default=str))
        prepare_output_dir(args.output_dir, log)
        if prune_now and args.output_dir and os.path.exists(os.path.join(args.output_dir, CHECKPOINT_NAME)):
            log(f"--overwrite: replacing the earlier run's outputs in {args.output_dir}")
        gates = PruneMask.from_gate_state_dict(model.state_dict())  # all ones unless --finetune is a pruned model
        log(f"model {args.model}: {mask_params(model.arch, gates) / 1e6:.2f} M parameters, "
            f"{mask_macs(model.arch, gates)['total'] / 1e9:.4f} GMACs under its gates, {num_classes} classes")
        if args.eval:
            _, loader_val = build_loaders(args, None, dataset_val, args.distributed)
            stats = evaluate(loader_val, model, device, amp=args.amp, print_freq=args.log_period, print_fn=log)
            log(f"accuracy of the gated model ({'mask-aware' if args.mask_aware_norm else 'reference'} LayerNorm) "
                f"on {len(dataset_val)} images: top-1 {stats['acc1']:.2f}%  top-5 {stats['acc5']:.2f}%  "
                f"loss {stats['loss']:.4f}")
        if prune_now:
            start = time.time()
            run_pruning(args, model, dataset_train, num_classes, device, log, pickles)
            log(f"pruning done in {time.time() - start:.1f} s")
    except UserError as err:  # e.g. a non-finite loss or an unreadable image: record it in the log too
        logger.error(f"error: {error_line(err)}")
        raise
    cleanup_distributed()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
