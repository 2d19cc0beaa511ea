"""Where the pruning pass's time goes, and the alternatives to its three Hessian-vector products.

One batch, in one process, variants side by side (round-robin over `--repeats`, fastest kept),
each timed per batch on the block draws of batch indices 0 .. `--draws` - 1 (averaged):
  plain      -- forward + backward with the weights' gradients (a training step's cost);
  reverse    -- forward, one `autograd.grad(create_graph=True)` over the gates, then three
                reverse-over-reverse products, one per row of C, each over its three columns;
  symmetric  -- the pass as `pruning.scoring` runs it: as `reverse`, but the heads and MLP rows'
                embedding column is read off the embedding row's product (H is symmetric), so their
                products stop at the lowest block they read;
  batched    -- the three products as ONE reverse call over the stacked rows (`is_grads_batched`, vmap);
  fwd-rev    -- forward-over-reverse: `torch.func.jvp` of `torch.func.grad`, one per row (the Hessian
                is symmetric, so H @ 1_row gives the same row);
  fwd-rev-v  -- the three jvps batched with `torch.func.vmap`.
Each variant's rows of C (the reference's block draws) are compared with `reverse`'s, and each
round's time of `symmetric` is divided by that of `reverse` in the same round (paired: the machine's
speed drifts between rounds).
`--profile` prints torch.profiler's top operators of the `symmetric` variant.

    python benchmarks/bench_hvp_variants.py --model deit_small_patch16_224 --batch-size 8 --threads 1
"""
import copy
import os
import statistics
import sys
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.func import functional_call, grad, jvp, vmap  # noqa: E402

from benchmarks.common import synced_clock as clock  # noqa: E402
from models import create_model  # noqa: E402
from pruning.scoring import gates_only_grad  # noqa: E402
from pruning.interactions import block_draw  # noqa: E402
from utils import Parser, cli_entry  # noqa: E402

VARIANTS = ("plain", "reverse", "symmetric", "batched", "fwd-rev", "fwd-rev-v")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--input-size", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--draws", type=int, default=1, help="block draws (of batch indices 0, 1, ...) per variant run")
    p.add_argument("--profile", action="store_true", help="print the top operators of the symmetric variant")
    return p.parse_args(argv)


class Bench:
    """One model, one batch, one block draw (`use_draw`); each variant returns {phase: seconds} and the rows of C."""

    def __init__(self, model, images, targets):
        self.model, self.images, self.targets = model, images, targets
        self.criterion = torch.nn.CrossEntropyLoss()
        self.gates = model.gate_parameters()
        names = {id(p): n for n, p in model.named_parameters()}
        self.gate_names = [names[id(g)] for g in self.gates]
        self.depth = len(self.gates) // 2
        self.use_draw(0)

    def use_draw(self, batch_index: int) -> None:
        draw, d = block_draw(0, batch_index, self.depth), self.depth
        # row i: the gates differentiated (s_i) and the columns (heads, MLP, embedding gate)
        self.firsts = [draw.l, d + draw.l, 2 * d]
        self.columns = [[draw.m[i][0], d + draw.m[i][1], 2 * d] for i in range(3)]

    def run(self, variant: Callable, draws: int):
        """`variant` on each draw: mean seconds per phase, and the rows of every draw."""
        times: Dict[str, float] = {}
        rows = []
        for index in range(draws):
            self.use_draw(index)
            t, r = variant()
            times = {k: times.get(k, 0.0) + v / draws for k, v in t.items()}
            rows += r or []
        return times, rows

    def _loss(self):
        return self.criterion(self.model(self.images), self.targets)

    def plain(self):
        params = [p for p in self.model.parameters() if p not in set(self.gates)]
        for p in params:
            p.requires_grad_(True)
        t0 = clock()
        loss = self._loss()
        t1 = clock()
        loss.backward()
        t2 = clock()
        self.model.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(False)
        return {"forward": t1 - t0, "backward": t2 - t1}, None

    def reverse(self):
        return self._reverse(symmetric=False)

    def symmetric(self):
        return self._reverse(symmetric=True)

    def _reverse(self, symmetric: bool):
        with gates_only_grad(self.model) as gates:
            t0 = clock()
            loss = self._loss()
            t1 = clock()
            grads = torch.autograd.grad(loss, gates, create_graph=True)
            t2 = clock()
            times, rows = {"forward": t1 - t0, "backward (create_graph)": t2 - t1}, []
            for i in range(3):
                t = clock()
                wrt = [gates[j] for j in self.columns[i]]
                if symmetric:  # heads and MLP rows: no embedding column; the embed row also reads block l
                    wrt = wrt[:2] if i < 2 else wrt + [gates[f] for f in self.firsts[:2]]
                row = torch.autograd.grad(grads[self.firsts[i]].sum(), wrt, retain_graph=i < 2, allow_unused=True,
                                          materialize_grads=True)
                rows.append([float(v.double().sum()) for v in row])
                times[f"product {i} ({('heads', 'mlp', 'embed')[i]} row)"] = clock() - t
        if symmetric:  # 1_i^T H 1_embed = 1_embed^T H 1_i
            rows = [rows[0] + [rows[2][3]], rows[1] + [rows[2][4]], rows[2][:3]]
        return times, rows

    def batched(self):
        with gates_only_grad(self.model) as gates:
            t0 = clock()
            grads = torch.autograd.grad(self._loss(), gates, create_graph=True)
            t1 = clock()
            union = sorted({j for cols in self.columns for j in cols})
            s = torch.stack([grads[f].sum() for f in self.firsts])
            out = torch.autograd.grad(s, [gates[j] for j in union], grad_outputs=torch.eye(3),
                                      is_grads_batched=True, allow_unused=True, materialize_grads=True)
            at = dict(zip(union, out))
            rows = [[float(at[j][i].double().sum()) for j in self.columns[i]] for i in range(3)]
            return {"forward + backward (create_graph)": t1 - t0, "three products, batched": clock() - t1}, rows

    def _functional(self):
        keys = self.gate_names
        values = {k: self.model.get_parameter(k).detach().clone() for k in keys}
        model = copy.deepcopy(self.model)  # torch.func leaves the gates of the model it calls as plain tensors

        def loss_of(g):
            return self.criterion(functional_call(model, g, (self.images,), strict=False), self.targets)

        def tangent(index):
            return {k: (torch.ones_like(v) if i == index else torch.zeros_like(v)) for i, (k, v) in
                    enumerate(values.items())}
        return keys, values, grad(loss_of), tangent

    def fwd_rev(self):
        keys, values, grad_fn, tangent = self._functional()
        times, rows = {}, []
        with torch.enable_grad():
            for i in range(3):
                t = clock()
                _, hv = jvp(grad_fn, (values,), (tangent(self.firsts[i]),))
                rows.append([float(hv[keys[j]].double().sum()) for j in self.columns[i]])
                times[f"jvp {i}"] = clock() - t
        return times, rows

    def fwd_rev_v(self):
        keys, values, grad_fn, tangent = self._functional()
        tangents = {k: torch.stack([tangent(f)[k] for f in self.firsts]) for k in keys}
        with torch.enable_grad():
            t = clock()
            hv = vmap(lambda tt: jvp(grad_fn, (values,), (tt,))[1])(tangents)
            elapsed = clock() - t
        rows = [[float(hv[keys[j]][i].double().sum()) for j in self.columns[i]] for i in range(3)]
        return {"three jvps, vmap": elapsed}, rows


def max_rel_diff(rows: List[List[float]], ref: List[List[float]]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-30) for ra, rb in zip(rows, ref) for a, b in zip(ra, rb))


@cli_entry
def main(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = {"img_size": args.input_size} if args.input_size else {}
    model = create_model(args.model, **kwargs).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    size = model.arch.img_size
    images = torch.randn(args.batch_size, 3, size, size)
    targets = torch.randint(0, model.arch.num_classes, (args.batch_size,))
    bench = Bench(model, images, targets)
    runners: Dict[str, Callable] = {"plain": bench.plain, "reverse": bench.reverse, "symmetric": bench.symmetric,
                                    "batched": bench.batched,
                                    "fwd-rev": bench.fwd_rev, "fwd-rev-v": bench.fwd_rev_v}
    chosen = [v for v in args.variants.split(",") if v]
    best: Dict[str, dict] = {}
    rows: Dict[str, list] = {}
    totals: Dict[str, List[float]] = {v: [] for v in chosen}
    for v in chosen:  # warm-up
        runners[v]()
    for r in range(args.repeats):
        for v in chosen:
            print(f"run {r + 1}/{args.repeats}: {v} ...", flush=True)
            times, rows[v] = bench.run(runners[v], args.draws)
            totals[v].append(sum(times.values()))
            if v not in best or sum(times.values()) < sum(best[v].values()):
                best[v] = times
    print(f"\n{args.model} at {size}, batch {args.batch_size}, CPU, {args.threads} thread(s), "
          f"fastest of {args.repeats} run(s), mean over the draws of batches 0-{args.draws - 1}")
    base = sum(best["plain"].values()) if "plain" in best else None
    print(f"{'variant':12s}{'s/batch':>10s}{'x plain':>9s}{'max rel diff':>14s}  phases (s)")
    for v in chosen:
        total = sum(best[v].values())
        ratio = f"{total / base:9.2f}" if base else f"{'':9s}"
        diff = f"{max_rel_diff(rows[v], rows['reverse']):14.1e}" if rows.get(v) and rows.get("reverse") else f"{'':14s}"
        phases = ", ".join(f"{k} {t:.3f}" for k, t in best[v].items())
        print(f"{v:12s}{total:10.3f}{ratio}{diff}  {phases}")
    if totals.get("symmetric") and totals.get("reverse"):
        paired = [a / b for a, b in zip(totals["symmetric"], totals["reverse"])]
        print(f"symmetric / reverse, round by round: median {statistics.median(paired):.3f} "
              f"(all: {', '.join(f'{x:.3f}' for x in paired)})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench.use_draw(0)
            bench.symmetric()
        print("\ntop operators of the symmetric variant (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main(parse_args())
