"""Time and peak memory per batch of the pruning pass (importance + interactions).

Variants, each in a fresh subprocess (so that its peak RSS is its own):
  (a) plain   -- forward + backward with the weights' gradients (a training step's cost);
  (b) ref     -- reference-style: `loss.backward(create_graph=True)` over ALL parameters,
                 then nine separate `autograd.grad` calls, one per (i, j) entry of C;
  (ours)      -- `pruning.scoring.PruningScorer`: gates-only gradients, 1 backward +
                 3 Hessian-vector products;
  (ours mb)   -- the same with `--micro-batch` (each batch in chunks; same results), when given.
(b) and ours use the same block draws; their criteria (method 2) and C are compared.
Variants run round-robin `--repeats` times (the machine may be shared): the table shows
the fastest time and the median peak memory of each. `--device cuda` runs them on the GPU
(benchmarks/gpu_check.py's pruning pass) and also reports the peak GPU memory.

Example (DeiT-S, steadiest on a shared machine with one thread):
    python benchmarks/bench_pruning_pass.py --model deit_small_patch16_224 --batch-size 8 --batches 3 \
        --micro-batch 2 --repeats 2 --threads 1
Quick check on the tiny model:
    python benchmarks/bench_pruning_pass.py --model deit_test_patch8_32 --input-size 32 --batches 3
"""
import argparse
import os
import resource
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.common import run_worker, timed  # noqa: E402
from models import create_model  # noqa: E402
from pruning.scoring import PruningScorer  # noqa: E402
from pruning.interactions import block_draw, interaction_normalisers  # noqa: E402
from pruning.mask import COMPONENTS, criteria_shapes  # noqa: E402
from utils import Parser, UserError, atomic_write_json, cli_entry  # noqa: E402

VARIANTS = ("plain", "ref", "ours", "ours_mb")
LABELS = {"plain": "(a) plain forward+backward", "ref": "(b) reference-style pass", "ours": "ours",
          "ours_mb": "ours, micro-batch {}"}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=3, help="timed batches (after one warm-up batch)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--hessian_embed", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=0, help="also run ours with this micro-batch (0: no)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant, round-robin")
    p.add_argument("--variants", default="plain,ref,ours", help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_batches(args, num_classes: int, device: torch.device):
    g = torch.Generator().manual_seed(args.seed)
    n = args.warmup + args.batches
    return [(torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g).to(device),
             torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)) for _ in range(n)]


def reference_style_batch(model: nn.Module, criterion, images, targets, batch_index: int, seed: int,
                          normalisers: torch.Tensor, sums: dict) -> None:
    """What the reference does per batch: create_graph over every parameter, then 9 grads."""
    depth = model.arch.depth
    loss = criterion(model(images), targets)
    loss.backward(create_graph=True)
    gates = model.gate_parameters()
    grads = [g.grad for g in gates]
    with torch.no_grad():
        scores = [(g * d).double().pow(2) for g, d in zip(gates, grads)]
        sums["heads"] += torch.stack(scores[:depth])
        sums["mlp"] += torch.stack(scores[depth:2 * depth])
        sums["embed"] += scores[-1]
    draw = block_draw(seed, batch_index, depth)
    firsts = (grads[draw.l], grads[depth + draw.l], grads[-1])
    for i in range(3):
        for j in range(3):
            target = (gates[draw.m[i][0]], gates[depth + draw.m[i][1]], gates[-1])[j]
            h, = torch.autograd.grad(firsts[i].sum(), target, retain_graph=True)
            sums["C"][i, j] += h.double().sum() / normalisers[i, j]
    for p in model.parameters():  # drop the grads and the graph they hold
        p.grad = None


def measure(args) -> dict:
    """Run variant `args.worker` in this process: seconds per timed batch (wall and process CPU), memory
    and, but for 'plain', the criteria and C."""
    # (b) resets every .grad after each batch, which breaks the cycle this warning is about
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = create_model(args.model, img_size=args.input_size).eval().to(device)
    criterion = nn.CrossEntropyLoss()
    batches = make_batches(args, model.arch.num_classes, device)
    variant = args.worker
    if variant == "plain":
        for p in model.gate_parameters():
            p.requires_grad_(False)
    elif variant == "ref":
        for p in model.parameters():
            p.requires_grad_(True)
        normalisers = interaction_normalisers(model.arch, args.hessian_embed).to(device)
        shapes = dict(criteria_shapes(model.arch), C=(3, 3))
        sums = {c: torch.zeros(shapes[c], dtype=torch.float64, device=device) for c in shapes}
    else:
        scorer = PruningScorer(model, criterion, method=2, need_hessian=True, hessian_embed=args.hessian_embed,
                               seed=args.seed, micro_batch=args.micro_batch if variant == "ours_mb" else None)

    def batch(k: int, images, targets) -> None:
        if variant == "plain":  # eval mode as the others; gates frozen, weights get .grad
            criterion(model(images), targets).backward()
            for p in model.parameters():
                p.grad = None
        elif variant == "ref":
            reference_style_batch(model, criterion, images, targets, k, args.seed, normalisers, sums)
        else:
            scorer.score_batch(images, targets, k)

    rss_start = current_rss_mb()
    times, cpu_times = [], []
    for k, (images, targets) in enumerate(batches):
        _, wall, cpu = timed(lambda: batch(k, images, targets))
        if k >= args.warmup:
            times.append(wall)
            cpu_times.append(cpu)
    result = {"variant": variant, "times": times, "s_per_batch": sum(times) / len(times),
              "cpu_s_per_batch": sum(cpu_times) / len(cpu_times), "rss_start_mb": rss_start,
              "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        result["reserved_cuda_mb"] = torch.cuda.max_memory_reserved(device) / 2 ** 20
    if variant == "ref":
        n = len(batches)
        result["criteria"] = {c: (sums[c] / n).tolist() for c in COMPONENTS}
        result["C"] = (sums["C"] / n).tolist()
    elif variant != "plain":
        criteria, C = scorer.finalize()
        result["criteria"] = {c: v.tolist() for c, v in criteria.items()}
        result["C"] = C.tolist()
    return result


def run_variant(variant: str, argv) -> dict:
    """`measure` of `variant` in a fresh process (its peak RSS is its own)."""
    rc, lines, result = run_worker(__file__, [*argv, "--worker", variant], echo=print)
    if result is None:
        raise UserError(f"variant {variant!r} failed (exit status {rc}); its output is above")
    return result


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |b| (normwise: entries near zero do not blow it up)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@cli_entry
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        atomic_write_json(measure(args), args.result)
        return
    variants = [v for v in args.variants.split(",") if v]
    if args.micro_batch and "ours_mb" not in variants:
        variants.append("ours_mb")
    LABELS["ours_mb"] = LABELS["ours_mb"].format(args.micro_batch)
    runs = {v: [] for v in variants}
    for rep in range(args.repeats):
        for v in variants:
            print(f"run {rep + 1}/{args.repeats}: {LABELS[v]} ...", flush=True)
            runs[v].append(run_variant(v, argv))
    results = {}
    for v, rs in runs.items():
        passes = sorted(r["peak_rss_mb"] - r["rss_start_mb"] for r in rs)
        peaks = sorted(r["peak_rss_mb"] for r in rs)
        results[v] = dict(rs[0], s_per_batch=min(r["s_per_batch"] for r in rs),
                          cpu_s_per_batch=min(r["cpu_s_per_batch"] for r in rs),
                          pass_mb=passes[len(passes) // 2], peak_rss_mb=peaks[len(peaks) // 2])
    threads = next(iter(results.values()))["threads"]
    print(f"\n{args.model} at {args.input_size}, batch {args.batch_size}, {args.batches} timed batches "
          f"(+{args.warmup} warm-up), {'CPU' if args.device == 'cpu' else args.device}, {threads} threads, "
          f"{args.repeats} run(s) each; "
          f"pruning method 2 with interactions")
    print(f"{'variant':<30} {'s/batch':>9} {'CPU s/batch':>12} {'peak RSS MB':>12} {'pass peak MB':>13}")
    for v, r in results.items():
        print(f"{LABELS[v]:<30} {r['s_per_batch']:>9.3f} {r['cpu_s_per_batch']:>12.3f} {r['peak_rss_mb']:>12.0f} "
              f"{r['pass_mb']:>13.0f}")
    print("(s/batch: wall time, fastest run; CPU s/batch: process CPU time, all threads, fastest run -- steadier\n"
          " on a shared machine, best with --threads 1; pass peak: peak RSS minus RSS after building the model\n"
          " and data, i.e. the pass's own memory, median over runs)")
    for mine in ("ours", "ours_mb"):
        if mine not in results:
            continue
        ours = results[mine]
        for v in ("ref", "plain"):
            if v in results:
                r = results[v]
                print(f"{LABELS[mine]} / {LABELS[v].split()[0]}: time {ours['s_per_batch'] / r['s_per_batch']:.2f}x, "
                      f"CPU time {ours['cpu_s_per_batch'] / r['cpu_s_per_batch']:.2f}x, "
                      f"pass peak memory {ours['pass_mb'] / r['pass_mb']:.2f}x, "
                      f"process peak RSS {ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x")
        if "ref" in results:
            ref = results["ref"]
            diffs = {c: max_rel_diff(ours["criteria"][c], ref["criteria"][c]) for c in COMPONENTS}
            diffs["C"] = max_rel_diff(ours["C"], ref["C"])
            print(f"max rel diff {LABELS[mine]} vs (b): " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    if "ours" in results:
        print("C (ours):\n" + "\n".join("  " + " ".join(f"{x: .4e}" for x in row) for row in results["ours"]["C"]))


if __name__ == "__main__":
    main()
