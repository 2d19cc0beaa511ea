"""First-order criteria and the 3x3 interaction matrix (pruning/scoring.py) against
independent computations: `torch.func.grad` of the loss w.r.t. the gates, per-token gate
leaves with plain autograd, and the full gate Hessian of `torch.autograd.functional.hessian`.
"""
import copy
import os
import pickle
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.func import functional_call

from models import arch_of, create_model
from pruning import scoring
from pruning.scoring import PruningScorer, all_reduce_state, sum_states
from pruning.interactions import BlockDraw, block_draw
from pruning.mask import criteria_shapes
from pruning.pickles import criteria_filename, load_pickles, save_pickles
from conftest import randomize_
from utils import UserError

NAME = "deit_test_patch8_32"
# one tiny configuration per kind of residual stream: LayerScale + no_embed_class, registers with avg
# pooling + fc_norm, norm_pre + qk_norm
FAMILIES = [NAME, "deit3_test_patch8_32", "vit_test_reg4_gap_patch8_32", "vit_test_prenorm_qknorm_patch8_32"]
# a narrower tiny model for the full Hessian (3 * (2 + 64) + 16 = 214 gates)
NARROW = dict(embed_dim=16, num_heads=2, img_size=16)


def soft_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mixup's soft-target loss, written out."""
    return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()


def make_batches(arch, sizes, seed: int, dtype=torch.float32):
    """Seeded images with soft (mixup-like) targets; one batch per entry of `sizes`."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        images = torch.randn(b, arch.in_chans, arch.img_size, arch.img_size, generator=g, dtype=dtype)
        labels = torch.randint(0, arch.num_classes, (2, b), generator=g)
        lam = 0.7
        targets = lam * F.one_hot(labels[0], arch.num_classes) + (1 - lam) * F.one_hot(labels[1], arch.num_classes)
        batches.append((images, targets.to(dtype)))
    return batches


def make_model(seed: int = 0, random_gates: bool = False, dtype=torch.float64, name: str = NAME, **kwargs):
    model = randomize_(create_model(name, **kwargs), seed, scale=0.3).to(dtype)
    if random_gates:  # g != 1 checks the g factor of the criteria
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in model.gate_parameters():
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=dtype))
    return model


def gate_names(model):
    """Parameter names of the gate weights in `gate_parameters()` order."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in model.gate_parameters()]


def split_gates(model, flat: list):
    depth = model.arch.depth
    return {"heads": torch.stack(flat[:depth]), "mlp": torch.stack(flat[depth:2 * depth]), "embed": flat[-1]}


# -- independent references ---------------------------------------------------------------

def gate_gradients(model, images, targets):
    """dL/dg for every gate by torch.func.grad over a functional call (not the scorer's code).

    Works on a copy: functional_call does not restore a parameter of a module registered
    under several names (the shared `res_gate`) -- it leaves the swapped-in tensor behind.
    """
    model = copy.deepcopy(model).eval()
    names = gate_names(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def loss_of(gates):
        return soft_cross_entropy(functional_call(model, gates, (images,)), targets)

    grads = torch.func.grad(loss_of)(params)
    return split_gates(model, [grads[n] for n in names]), split_gates(model, [params[n] for n in names])


def taylor_terms(model, images, targets):
    """t[b, n, u] = g_u * dL/dG[b, n, u] with one gate LEAF per (sample, token, unit), plain autograd.

    The embedding gate is one leaf shared by all its applications, so its gradient sums them.
    """
    model = copy.deepcopy(model).eval()
    B, N = images.shape[0], model.arch.num_tokens
    leaves = {}

    def patched(component, block, gate):
        def forward(self, x):
            if component == "heads":  # x: (B, heads, N, head_dim); leaf (B, N, heads)
                leaf = leaves.setdefault((component, block),
                                         self.weight.detach().expand(B, N, -1).clone().requires_grad_())
                return x * leaf.transpose(1, 2).unsqueeze(-1)
            leaf = leaves.setdefault((component, block),
                                     self.weight.detach().expand(B, N, -1).clone().requires_grad_())
            return x * leaf
        return types.MethodType(forward, gate)

    originals = []
    for block, gate in enumerate(model.head_gates()):
        originals.append((gate, gate.forward))
        gate.forward = patched("heads", block, gate)
    for block, gate in enumerate(model.mlp_gates()):
        originals.append((gate, gate.forward))
        gate.forward = patched("mlp", block, gate)
    originals.append((model.res_gate, model.res_gate.forward))
    model.res_gate.forward = patched("embed", 0, model.res_gate)
    try:
        loss = soft_cross_entropy(model(images), targets)
    finally:
        for gate, _ in originals:
            del gate.forward  # back to the class's forward
    keys = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in keys])
    t = {k: leaves[k].detach() * g for k, g in zip(keys, grads)}
    depth = model.arch.depth
    return {"heads": torch.stack([t[("heads", b)] for b in range(depth)]),
            "mlp": torch.stack([t[("mlp", b)] for b in range(depth)]), "embed": t[("embed", 0)]}


# -- first order ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_method2_equals_squared_gate_gradients_per_batch_and_accumulated(name):
    model = make_model(random_gates=True, name=name)
    arch = model.arch
    batches = make_batches(arch, [3, 2, 4], seed=1, dtype=torch.float64)
    scorer = PruningScorer(model, soft_cross_entropy, method=2, seed=0)
    total = None
    for k, (images, targets) in enumerate(batches):
        before = scorer.state()
        scorer.score_batch(images, targets, k)
        after = scorer.state()
        grads, gates = gate_gradients(model, images, targets)
        expected = {c: (gates[c] * grads[c]) ** 2 for c in grads}
        for c in expected:
            torch.testing.assert_close(after[c] - before[c], expected[c], rtol=1e-9, atol=1e-15)
            assert expected[c].abs().max() > 0
        total = expected if total is None else {c: total[c] + expected[c] for c in total}
    criteria, interactions = scorer.finalize()
    assert interactions is None
    for c, shape in criteria_shapes(arch).items():
        assert criteria[c].shape == shape
        torch.testing.assert_close(criteria[c], total[c] / len(batches), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", [1, 3, 4])
def test_methods_1_3_4_match_hand_computation(method, name):
    model = make_model(random_gates=True, name=name)
    batches = make_batches(model.arch, [3, 1, 2], seed=2, dtype=torch.float64)  # unequal sizes matter for 4
    scorer = PruningScorer(model, soft_cross_entropy, method=method, seed=0)
    sums, denominator = None, 0
    for k, (images, targets) in enumerate(batches):
        scorer.score_batch(images, targets, k)
        t = taylor_terms(model, images, targets)  # each (..., B, N, units)
        if method == 1:    # mean over batch and tokens of |grad_output * output|
            per_batch = {c: v.abs().mean((-3, -2)) for c, v in t.items()}
        elif method == 3:  # sum over batch of (sum over tokens)^2
            per_batch = {c: v.sum(-2).pow(2).sum(-2) for c, v in t.items()}
        else:              # sum over batch and tokens of |.|, denominators batch * tokens
            per_batch = {c: v.abs().sum((-3, -2)) for c, v in t.items()}
            denominator += images.shape[0] * model.arch.num_tokens
        sums = per_batch if sums is None else {c: sums[c] + per_batch[c] for c in sums}
    divisor = denominator if method == 4 else len(batches)
    criteria, _ = scorer.finalize()
    for c in sums:
        torch.testing.assert_close(criteria[c], sums[c] / divisor, rtol=1e-9, atol=1e-15)
        assert criteria[c].min() >= 0 and criteria[c].max() > 0


def test_taylor_terms_sum_to_gate_gradient():
    """Sanity of the hand computation itself: sum_{b,n} t = g * dL/dg."""
    model = make_model(random_gates=True)
    images, targets = make_batches(model.arch, [2], seed=3, dtype=torch.float64)[0]
    t = taylor_terms(model, images, targets)
    grads, gates = gate_gradients(model, images, targets)
    for c in t:
        torch.testing.assert_close(t[c].sum((-3, -2)), gates[c] * grads[c], rtol=1e-9, atol=1e-14)


# -- interactions ---------------------------------------------------------------------------

FIXED_DRAWS = {0: BlockDraw(2, ((0, 1), (2, 0), (0, 0))), 1: BlockDraw(1, ((1, 1), (0, 1), (0, 0)))}


@pytest.mark.parametrize("name", FAMILIES)
def test_interactions_equal_sums_of_the_full_gate_hessian(monkeypatch, name):
    model = make_model(name=name, **NARROW)
    arch = model.arch
    depth, D = arch.depth, arch.embed_dim
    monkeypatch.setattr(scoring, "block_draw", lambda seed, index, d: FIXED_DRAWS[index])
    batches = make_batches(arch, [3, 2], seed=4, dtype=torch.float64)
    hessian_embed = 6.0
    scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, hessian_embed=hessian_embed)
    for k, (images, targets) in enumerate(batches):
        scorer.score_batch(images, targets, k)
    _, C = scorer.finalize()

    # independent: full Hessian of the loss w.r.t. the concatenated gate vector
    names = gate_names(model)
    sizes = [p.numel() for p in model.gate_parameters()]
    offsets = np.cumsum([0] + sizes)
    n = torch.tensor([D, 4 * D, D * depth * hessian_embed], dtype=torch.float64)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    model = copy.deepcopy(model).eval()  # see gate_gradients
    for k, (images, targets) in enumerate(batches):
        def loss_of(flat):
            gates = dict(zip(names, flat.split(sizes)))
            return soft_cross_entropy(functional_call(model, gates, (images,)), targets)

        H = torch.autograd.functional.hessian(loss_of, torch.ones(sum(sizes), dtype=torch.float64), vectorize=True)
        draw = FIXED_DRAWS[k]

        def span(component: int, block: int) -> slice:
            index = [block, depth + block, 2 * depth][component]  # gate_parameters() order
            return slice(int(offsets[index]), int(offsets[index + 1]))

        for i in range(3):
            for j in range(3):
                block_j = draw.m[i][j] if i < 2 and j < 2 else 0  # the reference: block 0 for the embed row
                expected[i, j] += H[span(i, draw.l), span(j, block_j)].sum() / (n[i] * n[j])
    expected /= len(batches)
    assert expected.abs().min() > 0
    torch.testing.assert_close(C, expected, rtol=1e-8, atol=1e-16)


@pytest.mark.parametrize("method", [1, 2, 3, 4])
def test_micro_batches_give_the_whole_batch_results(method):
    model = make_model()
    batches = make_batches(model.arch, [3, 2], seed=13, dtype=torch.float64)
    results = []
    for micro_batch in (None, 1, 2):
        scorer = PruningScorer(model, soft_cross_entropy, method=method, need_hessian=True, micro_batch=micro_batch)
        losses = [scorer.score_batch(images, targets, k) for k, (images, targets) in enumerate(batches)]
        results.append((scorer.finalize(), losses))
    (criteria, C), losses = results[0]
    for (criteria2, C2), losses2 in results[1:]:
        for c in criteria:
            torch.testing.assert_close(criteria2[c], criteria[c], rtol=1e-9, atol=1e-18)
        torch.testing.assert_close(C2, C, rtol=1e-9, atol=1e-18)
        assert losses2 == pytest.approx(losses, rel=1e-12)


def test_block_draws_reproducible_and_in_range():
    depth = 12
    draws = [block_draw(7, k, depth) for k in range(400)]
    assert draws == [block_draw(7, k, depth) for k in range(400)]
    assert draws != [block_draw(8, k, depth) for k in range(400)]
    assert {d.l for d in draws} == set(range(depth))
    assert all(0 <= m <= d.l for d in draws for row in d.m for m in row)
    assert len({d.m for d in draws if d.l == depth - 1}) > 1  # m is drawn per pair, not fixed


# -- what the pass leaves behind ------------------------------------------------------------

def test_no_weight_gradient_and_flags_restored():
    model = make_model(dtype=torch.float32)
    model.patch_embed.proj.weight.requires_grad_(False)  # a user-frozen weight stays frozen
    model.train()
    model.blocks[1].eval()  # mixed modes come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    images, targets = make_batches(model.arch, [2], seed=5)[0]
    for method in (2, 3):
        scorer = PruningScorer(model, soft_cross_entropy, method=method, need_hessian=True)
        scorer.score_batch(images, targets, 0)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(p.requires_grad for p in model.gate_parameters())
    assert [m.training for m in model.modules()] == modes and model.training and not model.blocks[1].training
    # no hooks left on the gates
    assert all(not g._forward_hooks for g in model.head_gates() + model.mlp_gates() + [model.res_gate])


def test_weights_get_no_gradient_graph(monkeypatch):
    """Autograd is never asked for a weight: every `autograd.grad` input is a gate."""
    model = make_model(dtype=torch.float32)
    gate_ids = {id(p) for p in model.gate_parameters()}
    seen = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        seen.extend(id(x) for x in inputs)
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    images, targets = make_batches(model.arch, [2], seed=6)[0]
    PruningScorer(model, soft_cross_entropy, need_hessian=True).score_batch(images, targets, 0)
    assert seen and set(seen) <= gate_ids
    assert len(seen) == len(gate_ids) + 3 * 3  # 1 backward over all gates + 3 rows of 3


def test_non_finite_loss_names_the_batch():
    model = make_model(dtype=torch.float32)
    images, targets = make_batches(model.arch, [2], seed=7)[0]

    def nan_loss(outputs, targets):
        return soft_cross_entropy(outputs, targets) * float("nan")

    scorer = PruningScorer(model, nan_loss)
    with pytest.raises(UserError, match="non-finite loss.*batch 5"):
        scorer.score_batch(images, targets, 5)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.gate_parameters())


def test_bad_method_and_too_few_batches():
    model = make_model(dtype=torch.float32)
    with pytest.raises(UserError, match="must be one of") as err:
        PruningScorer(model, soft_cross_entropy, method=5)
    assert err.value.field == "pruning_method"
    scorer = PruningScorer(model, soft_cross_entropy)
    with pytest.raises(UserError, match="only 1"):
        scorer.score_batches(make_batches(model.arch, [2], seed=8), 2, log=None)
    with pytest.raises(UserError, match="no batch"):
        PruningScorer(model, soft_cross_entropy).finalize()


def test_progress_lines():
    model = make_model(dtype=torch.float32)
    lines = []
    scorer = PruningScorer(model, soft_cross_entropy)
    scorer.score_batches(make_batches(model.arch, [2] * 5, seed=9), 5, log=lines.append, log_every=2)
    assert len(lines) == 3 and "[5/5]" in lines[-1] and "eta" in lines[0] and "samples/s" in lines[0]


# -- many processes -------------------------------------------------------------------------

@pytest.mark.parametrize("method", [2, 4])
def test_state_of_two_halves_sums_to_the_whole(method):
    model = make_model(dtype=torch.float32)
    batches = make_batches(model.arch, [2, 3, 2, 1], seed=10)
    kwargs = dict(method=method, need_hessian=True, seed=3)
    whole = PruningScorer(model, soft_cross_entropy, **kwargs)
    whole.score_batches(batches, 4, log=None)
    halves = []
    for first in (0, 2):
        scorer = PruningScorer(model, soft_cross_entropy, **kwargs)
        scorer.score_batches(batches[first:first + 2], 2, first_index=first, log=None)
        halves.append(scorer.state())
    criteria, C = whole.finalize()
    criteria2, C2 = whole.finalize(sum_states(halves))
    for c in criteria:
        torch.testing.assert_close(criteria2[c], criteria[c], rtol=1e-6, atol=0)
    torch.testing.assert_close(C2, C, rtol=1e-6, atol=0)


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model(dtype=torch.float32)
        batches = make_batches(model.arch, [2, 3, 2, 1], seed=11)
        scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, seed=3)
        # interleaved shard: rank r scores global batches r, r + world, ...
        scorer.score_batches(batches[rank::world], len(batches[rank::world]), first_index=rank,
                             index_stride=world, log=None)
        criteria, C = scorer.finalize(all_reduce_state(scorer.state()))
        if rank == 0:
            torch.save({"criteria": criteria, "C": C}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "two.pt")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    two = torch.load(out)
    model = make_model(dtype=torch.float32)
    scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, seed=3)
    scorer.score_batches(make_batches(model.arch, [2, 3, 2, 1], seed=11), 4, log=None)
    criteria, C = scorer.finalize(all_reduce_state(scorer.state()))  # no process group: unchanged
    for c in criteria:
        torch.testing.assert_close(two["criteria"][c], criteria[c], rtol=1e-5, atol=0)
    torch.testing.assert_close(two["C"], C, rtol=1e-5, atol=0)


# -- pickles --------------------------------------------------------------------------------

def test_pickles_round_trip_and_validation(tmp_path):
    model = make_model(dtype=torch.float32)
    arch = model.arch
    scorer = PruningScorer(model, soft_cross_entropy, method=3, need_hessian=True)
    scorer.score_batches(make_batches(arch, [2, 2], seed=12), 2, log=None)
    criteria, C = scorer.finalize()
    paths = save_pickles(str(tmp_path), 3, criteria, C)
    assert sorted(os.listdir(tmp_path)) == sorted(
        [criteria_filename(3, layer) for layer in range(3)] + ["hessian.pickle"])
    with open(tmp_path / criteria_filename(3, 1), "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw, np.ndarray) and raw.shape == (arch.depth, arch.mlp_hidden)
    loaded, C2 = load_pickles(str(tmp_path), 3, arch)
    for c in criteria:
        assert torch.equal(loaded[c], criteria[c])
    assert torch.equal(C2, C)
    assert load_pickles(str(tmp_path), 3, arch, need_hessian=False)[1] is None
    assert len(paths) == 4

    other = arch_of("deit_small_patch16_224")
    with pytest.raises(UserError, match=r"criteria_m3l0_final\.pickle.*another model"):
        load_pickles(str(tmp_path), 3, other)
    with pytest.raises(UserError, match=r"not found.*criteria_m2l0_final\.pickle"):
        load_pickles(str(tmp_path), 2, arch)
    os.remove(tmp_path / "hessian.pickle")
    with pytest.raises(UserError, match=r"not found.*hessian\.pickle"):
        load_pickles(str(tmp_path), 3, arch)
    (tmp_path / criteria_filename(3, 2)).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"criteria_m3l2_final\.pickle.*not a readable"):
        load_pickles(str(tmp_path), 3, arch, need_hessian=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
