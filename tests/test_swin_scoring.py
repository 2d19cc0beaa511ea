"""The pruning pass and the search on `GatedSwin` against independent computations: gate gradients
of `torch.func.grad`, per-sample gradients, per-position gate leaves with plain autograd, the full
gate Hessian of `torch.autograd.functional.hessian` (float64, a narrow tiny Swin: 108 gates), and
the embedding order over all stages (docs/METHOD.md, "Swin").
"""
import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from models import arch_of, create_model
from pruning import scoring
from pruning.interactions import BlockDraw
from pruning.flops import mask_macs
from pruning.mask import criteria_shapes, group_sizes
from pruning.scoring import PruningScorer
from pruning.search import SearchOptions, check_target_reachable, prune
from pruning.selection import mask_from_counts, max_prunable, normalize_by_layer
from conftest import randomize_
from utils import UserError

NAME = "swin_test_patch2_window4_32"
# stage 0: 8x8 grid, 4x4 windows (block 1 shifted by 2); stage 1: 4x4 grid, one window; head dim 4
NARROW = dict(depths=(2, 2), widths=(8, 16), num_heads=(2, 4), window_sizes=(4, 4), mlp_ratio=1.5, img_size=16,
              num_classes=5)
STAGE = [0, 0, 1, 1]         # stage of each block
TOKENS = [64, 64, 16, 16]    # H * W of each block's stage
GATE_TOKENS = TOKENS * 2 + [64, 16]  # ... of each gate's stage, `gate_parameters()` order
N_HEADS = [8, 8, 16, 16]     # interaction n of a block's heads: its stage's width
N_MLP = [12, 12, 24, 24]     # ... of its MLP: its hidden width
HESSIAN_EMBED = 6.0
N_EMBED = (8 + 8 + 16 + 16) * HESSIAN_EMBED  # every block's stage width, summed


def soft_cross_entropy(outputs, targets):
    return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()


def make_model(seed: int = 0, random_gates: bool = True):
    model = randomize_(create_model(NAME, **NARROW), seed, scale=0.3).to(torch.float64)
    if random_gates:  # g != 1 checks the g factors
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in model.gate_parameters():
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64))
    return model


def make_batches(arch, sizes, seed: int):
    """Seeded float64 images with soft (mixup-like) targets, one batch per entry of `sizes`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        images = torch.randn(b, arch.in_chans, arch.img_size, arch.img_size, generator=g, dtype=torch.float64)
        labels = torch.randint(0, arch.num_classes, (2, b), generator=g)
        targets = 0.7 * F.one_hot(labels[0], arch.num_classes) + 0.3 * F.one_hot(labels[1], arch.num_classes)
        out.append((images, targets.to(torch.float64)))
    return out


def flat(per_gate):
    """{component: flat vector} of a list in `gate_parameters()` order (heads, MLP per block, stages)."""
    return {"heads": torch.cat(per_gate[:4]), "mlp": torch.cat(per_gate[4:8]), "embed": torch.cat(per_gate[8:])}


def test_narrow_model_layout():
    model = make_model()
    arch = model.arch
    assert arch.resolutions == [8, 4] and [b.shift for b in model.all_blocks()] == [0, 2, 0, 0]
    assert [p.numel() for p in model.gate_parameters()] == [2, 2, 4, 4, 12, 12, 24, 24, 8, 16]
    assert arch.stage_of_block() == STAGE
    assert criteria_shapes(arch) == {"heads": (12,), "mlp": (72,), "embed": (24,)}


# -- independent references ---------------------------------------------------------------

def gate_names(model):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in model.gate_parameters()]


def gate_gradients(model, images, targets):
    """(dL/dg, g) per gate, `gate_parameters()` order, by torch.func.grad of a functional call."""
    model = copy.deepcopy(model).eval()
    names = gate_names(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    grads = torch.func.grad(lambda gates: soft_cross_entropy(functional_call(model, gates, (images,)), targets))(params)
    return [grads[n] for n in names], [params[n] for n in names]


def taylor_terms(model, images, targets):
    """t per gate (`gate_parameters()` order) as [positions, units]: one gate LEAF per position the
    gate multiplies (a head's: per window token, over its head_dim channels), t = leaf * dL/dleaf.
    A stage's embedding leaf is shared by all the gate's applications (its gradient sums them)."""
    model = copy.deepcopy(model).eval()
    gates = model.head_gates() + model.mlp_gates() + model.embed_gates()
    leaves = {}

    def forward(self, x):
        shape = list(x.shape)
        if self.dim != -1:  # heads: (B * windows, heads, N_window, head_dim), one leaf per head and token
            shape[-1] = 1
        view = [1] * x.dim()
        view[self.dim] = -1
        if id(self) not in leaves:
            leaves[id(self)] = (self.dim, self.weight.detach().view(view).expand(shape).clone().requires_grad_())
        return x * leaves[id(self)][1]

    for gate in gates:
        gate.forward = types.MethodType(forward, gate)
    try:
        loss = soft_cross_entropy(model(images), targets)
    finally:
        for gate in gates:
            del gate.forward
    dims, tensors = zip(*(leaves[id(g)] for g in gates))
    grads = torch.autograd.grad(loss, tensors)
    return [(leaf.detach() * g).movedim(d, -1).reshape(-1, leaf.shape[d]) for d, leaf, g in zip(dims, tensors, grads)]


def per_sample_token_sums(model, images, targets):
    """sum_n t[b, n, u] = g_u * dL/dg_u of sample b's share l_b / B of the loss, per gate: [B, units]."""
    B = images.shape[0]
    rows = []
    for b in range(B):
        grads, gates = gate_gradients(model, images[b:b + 1], targets[b:b + 1])
        rows.append([g * d / B for g, d in zip(gates, grads)])
    return [torch.stack([r[k] for r in rows]) for k in range(len(rows[0]))]


# -- first order ----------------------------------------------------------------------------

def test_method2_equals_squared_gate_gradients_per_batch_and_accumulated():
    model = make_model()
    batches = make_batches(model.arch, [3, 2], seed=1)
    scorer = PruningScorer(model, soft_cross_entropy, method=2)
    total = None
    for k, (images, targets) in enumerate(batches):
        before = scorer.state()
        scorer.score_batch(images, targets, k)
        after = scorer.state()
        grads, gates = gate_gradients(model, images, targets)
        expected = flat([(g * d) ** 2 for g, d in zip(gates, grads)])
        for c in expected:
            torch.testing.assert_close(after[c] - before[c], expected[c], rtol=1e-9, atol=1e-16)
            assert expected[c].min() > 0
        total = expected if total is None else {c: total[c] + expected[c] for c in total}
    criteria, interactions = scorer.finalize()
    assert interactions is None
    for c, shape in criteria_shapes(model.arch).items():
        assert criteria[c].shape == shape and criteria[c].dtype == torch.float64
        torch.testing.assert_close(criteria[c], total[c] / len(batches), rtol=1e-9, atol=1e-16)


def test_taylor_terms_sum_to_the_gate_gradients():
    """Sanity of the references: per-position t and per-sample sums both add up to g * dL/dg."""
    model = make_model()
    images, targets = make_batches(model.arch, [2], seed=3)[0]
    grads, gates = gate_gradients(model, images, targets)
    t = taylor_terms(model, images, targets)
    per_sample = per_sample_token_sums(model, images, targets)
    for k, (g, d) in enumerate(zip(gates, grads)):
        torch.testing.assert_close(t[k].sum(0), g * d, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(per_sample[k].sum(0), g * d, rtol=1e-9, atol=1e-15)
        assert t[k].shape[0] == 2 * GATE_TOKENS[k]  # every position of each image


@pytest.mark.parametrize("method", [1, 3, 4])
def test_methods_1_3_4_match_hand_computation(method):
    model = make_model()
    batches = make_batches(model.arch, [3, 1, 2], seed=2)  # unequal sizes matter for 4
    scorer = PruningScorer(model, soft_cross_entropy, method=method)
    sums, samples = None, 0
    for k, (images, targets) in enumerate(batches):
        scorer.score_batch(images, targets, k)
        B = images.shape[0]
        if method == 3:    # sum over samples of (sum over the image's tokens)^2
            per_batch = flat([s.pow(2).sum(0) for s in per_sample_token_sums(model, images, targets)])
        else:              # |t| summed over samples and tokens, divided by the unit's own stage tokens
            t = taylor_terms(model, images, targets)
            per_batch = flat([v.abs().sum(0) / n for v, n in zip(t, GATE_TOKENS)])
            if method == 1:  # mean over batch and tokens
                per_batch = {c: v / B for c, v in per_batch.items()}
        samples += B
        sums = per_batch if sums is None else {c: sums[c] + per_batch[c] for c in sums}
    divisor = samples if method == 4 else len(batches)
    criteria, _ = scorer.finalize()
    for c in sums:
        torch.testing.assert_close(criteria[c], sums[c] / divisor, rtol=1e-9, atol=1e-16)
        assert criteria[c].min() > 0


# -- interactions ---------------------------------------------------------------------------

# per batch index, its K = 2 draws; blocks 2, 3 are in stage 1: l in stage 1 with m in stage 0
DRAWS = {0: [BlockDraw(3, ((0, 2), (1, 3), (0, 0))), BlockDraw(1, ((1, 0), (0, 1), (0, 0)))],
         1: [BlockDraw(2, ((2, 1), (0, 0), (0, 0))), BlockDraw(0, ((0, 0), (0, 0), (0, 0)))]}


@pytest.fixture(scope="module")
def hessian_case():
    """The narrow model (gates 1: the pass's point), two batches and their full gate Hessians."""
    model = make_model(random_gates=False)
    batches = make_batches(model.arch, [3, 2], seed=4)
    twin = copy.deepcopy(model).eval()
    names = gate_names(twin)
    sizes = [p.numel() for p in twin.gate_parameters()]
    hessians = []
    for images, targets in batches:
        def loss_of(flat_gates, images=images, targets=targets):
            gates = dict(zip(names, flat_gates.split(sizes)))
            return soft_cross_entropy(functional_call(twin, gates, (images,)), targets)

        hessians.append(torch.autograd.functional.hessian(loss_of, torch.ones(sum(sizes), dtype=torch.float64),
                                                          vectorize=True))
    return model, batches, hessians, np.cumsum([0] + sizes)


def expected_C(hessians, offsets, estimator: str, K: int) -> torch.Tensor:
    """C by the definition: rows at block l (embedding: all stage gates), columns at m (rb: the
    mean over m <= l; embedding: all stage gates; the embedding row's heads/MLP: block 0), each
    term over n_i(l) n_j(m), heads/MLP rows averaged over the K draws, C over the batches."""
    n = [N_HEADS, N_MLP]

    def span(component: int, block: int) -> slice:  # gate_parameters() order
        index = [block, 4 + block][component]
        return slice(int(offsets[index]), int(offsets[index + 1]))

    embed = slice(int(offsets[8]), int(offsets[10]))
    C = torch.zeros(3, 3, dtype=torch.float64)
    for k, H in enumerate(hessians):
        for draw in DRAWS[k][:K]:
            l = draw.l
            for i in range(2):
                for j in range(2):
                    ms = [draw.m[i][j]] if estimator == "reference" else range(l + 1)
                    C[i, j] += sum(H[span(i, l), span(j, m)].sum() / (n[i][l] * n[j][m]) for m in ms) / len(ms) / K
                C[i, 2] += H[span(i, l), embed].sum() / (n[i][l] * N_EMBED) / K
        for j in range(2):
            C[2, j] += H[embed, span(j, 0)].sum() / (N_EMBED * n[j][0])
        C[2, 2] += H[embed, embed].sum() / N_EMBED ** 2
    return C / len(hessians)


@pytest.mark.parametrize("estimator", ["reference", "rb"])
@pytest.mark.parametrize("K", [1, 2])
def test_interactions_equal_sums_of_the_full_gate_hessian(monkeypatch, hessian_case, estimator, K):
    model, batches, hessians, offsets = hessian_case
    monkeypatch.setattr(scoring, "block_draw", lambda seed, index, depth, draw=0: DRAWS[index][draw])
    scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, hessian_embed=HESSIAN_EMBED,
                           estimator=estimator, hessian_blocks=K)
    for k, (images, targets) in enumerate(batches):
        scorer.score_batch(images, targets, k)
    _, C = scorer.finalize()
    expected = expected_C(hessians, offsets, estimator, K)
    assert expected.abs().min() > 0
    torch.testing.assert_close(C, expected, rtol=1e-8, atol=1e-16)


def test_the_per_block_normalisers_matter(hessian_case):
    """With one n per component (block 0's) the heads/MLP rows of a stage-1 draw would differ."""
    _, _, hessians, offsets = hessian_case
    exact = expected_C(hessians, offsets, "reference", 1)
    saved = N_HEADS[:], N_MLP[:]
    try:
        N_HEADS[:], N_MLP[:] = [8] * 4, [12] * 4
        flat_n = expected_C(hessians, offsets, "reference", 1)
    finally:
        N_HEADS[:], N_MLP[:] = saved
    assert not torch.allclose(exact[:2], flat_n[:2], rtol=1e-3)
    torch.testing.assert_close(exact[2], flat_n[2], rtol=1e-12, atol=0)


@pytest.mark.parametrize("method, estimator, K", [(2, "reference", 1), (4, "rb", 2)])
def test_micro_batches_give_the_whole_batch_results(method, estimator, K):
    model = make_model()
    batches = make_batches(model.arch, [3, 2], seed=13)
    results = []
    for micro_batch in (None, 1, 2):
        scorer = PruningScorer(model, soft_cross_entropy, method=method, need_hessian=True, seed=3,
                               micro_batch=micro_batch, estimator=estimator, hessian_blocks=K)
        losses = [scorer.score_batch(images, targets, k) for k, (images, targets) in enumerate(batches)]
        results.append((scorer.finalize(), losses))
    (criteria, C), losses = results[0]
    assert C.abs().min() > 0
    for (criteria2, C2), losses2 in results[1:]:
        for c in criteria:
            torch.testing.assert_close(criteria2[c], criteria[c], rtol=1e-9, atol=1e-18)
        torch.testing.assert_close(C2, C, rtol=1e-9, atol=1e-18)
        assert losses2 == pytest.approx(losses, rel=1e-12)


# -- the search on Swin criteria ------------------------------------------------------------

WIDTHS = [32, 64, 128, 256]  # the default tiny Swin's stages
PROTECTED = [1, 3, 6, 12]    # max(1, int(0.05 * width))


def swin_criteria(arch, zero_stage=None, seed: int = 0):
    """Random positive criteria (flat, per component); `zero_stage`'s embedding criteria all 0."""
    g = torch.Generator().manual_seed(seed)
    crit = {c: 0.1 + torch.rand(shape, generator=g, dtype=torch.float64) for c, shape in criteria_shapes(arch).items()}
    if zero_stage is not None:
        start = sum(WIDTHS[:zero_stage])
        crit["embed"][start:start + WIDTHS[zero_stage]] = 0.0
    return crit


def kept_widths(mask):
    return [len(kept) for kept in mask.embed]


def test_default_tiny_swin_layout():
    arch = arch_of(NAME)
    assert list(arch.widths) == WIDTHS
    assert criteria_shapes(arch)["embed"] == (sum(WIDTHS),)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_stage_scoring_0_loses_all_its_unprotected_channels_first(stage):
    arch = arch_of(NAME)
    crit = swin_criteria(arch, zero_stage=stage)
    unprotected = WIDTHS[stage] - PROTECTED[stage]
    for k in (unprotected // 2, unprotected):
        mask = mask_from_counts(crit, arch, {"embed": k})
        assert kept_widths(mask) == [w - (k if s == stage else 0) for s, w in enumerate(WIDTHS)]
    # one more: that stage is at its protection, the channel comes from another stage
    widths = kept_widths(mask_from_counts(crit, arch, {"embed": unprotected + 1}))
    assert widths[stage] == PROTECTED[stage] and sum(widths) == sum(WIDTHS) - unprotected - 1


@pytest.mark.parametrize("stage, target", [(1, 0.1), (3, 0.3)])
def test_the_embedding_search_prunes_the_zero_stage_most(stage, target):
    arch = arch_of(NAME)
    mask, report = prune(swin_criteria(arch, zero_stage=stage), None, arch,
                         SearchOptions(flops_percentage=target, layers=2))
    widths = kept_widths(mask)
    pruned = [1 - w / n for w, n in zip(widths, WIDTHS)]
    assert report["counts"]["embed"] > 0 and pruned[stage] == max(pruned)
    if any(w < n for s, (w, n) in enumerate(zip(widths, WIDTHS)) if s != stage):
        assert widths[stage] == PROTECTED[stage]  # the others lose channels only once it is exhausted
    assert mask.heads == [list(range(h)) for h in arch.block_heads()]
    assert mask.mlp == [list(range(m)) for m in arch.block_hidden()]


def test_protection_keeps_the_top_channels_of_every_stage():
    arch = arch_of(NAME)
    crit = swin_criteria(arch, seed=5)
    k = max_prunable(arch)["embed"]
    assert k == sum(WIDTHS) - sum(PROTECTED)
    mask = mask_from_counts(crit, arch, {"embed": k})
    assert kept_widths(mask) == PROTECTED
    for s, kept in enumerate(mask.embed):  # by identity: the stage's highest criteria
        scores = crit["embed"][sum(WIDTHS[:s]):sum(WIDTHS[:s + 1])]
        assert sorted(kept) == sorted(torch.argsort(scores, descending=True)[:PROTECTED[s]].tolist())
    with pytest.raises(UserError, match="cannot prune"):
        mask_from_counts(crit, arch, {"embed": k + 1})


@pytest.mark.parametrize("target", [0.2, 0.4])
def test_embedding_only_search_meets_its_target(target):
    from pruning.flops import mask_macs

    arch = arch_of(NAME)
    mask, report = prune(swin_criteria(arch, seed=7), None, arch, SearchOptions(flops_percentage=target, layers=2))
    achieved = 1 - mask_macs(arch, mask)["total"] / mask_macs(arch)["total"]
    assert abs(achieved - target) <= 0.005
    assert report["achieved_reduction"] == pytest.approx(achieved, abs=1e-12)
    assert all(w >= p for w, p in zip(kept_widths(mask), PROTECTED)) and sum(kept_widths(mask)) < sum(WIDTHS)


@pytest.mark.parametrize("norm_type", [1, 2])
def test_normalize_by_layer_normalises_each_block_and_stage_of_flat_criteria(norm_type):
    arch = arch_of(NAME)
    crit = swin_criteria(arch, seed=4)
    out = normalize_by_layer(crit, norm_type, arch)
    for c, sizes in group_sizes(arch).items():
        for group in out[c].split(sizes):  # every block (heads, MLP) and every stage (embedding): norm 1
            assert float(group.abs().sum() if norm_type == 1 else group.pow(2).sum().sqrt()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="need the `arch`"):
        normalize_by_layer(crit, norm_type)


def test_largest_reachable_reduction_is_the_one_of_every_group_at_its_limit():
    """A heads-only target: what check_target_reachable calls reachable is what the mask pruning every
    prunable head (each block keeping its protected ones) removes, exactly."""
    arch = arch_of("swin_tiny_patch4_window7_224")
    best = check_target_reachable(arch, 0.05, layers=0)
    scores = {c: torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
              for c, shape in criteria_shapes(arch).items()}
    mask = mask_from_counts(scores, arch, {"heads": max_prunable(arch)["heads"], "mlp": 0, "embed": 0})
    assert best == pytest.approx(1 - mask_macs(arch, mask)["total"] / mask_macs(arch)["total"], abs=1e-12)
    assert all(len(h) >= 1 for h in mask.heads)  # protection keeps a head in every block
