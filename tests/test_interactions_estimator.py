"""The interaction estimators (`--hessian_estimator reference|rb`, `--hessian_blocks K`) against the
exact expectation over the block draws, computed from the full gate Hessian of
`torch.autograd.functional.hessian` (float64, a narrow tiny model with 214 gates).
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from models import create_model
from pruning import scoring
from pruning.scoring import PruningScorer
from pruning.interactions import BlockDraw, block_draw
from conftest import randomize_
from utils import UserError

NAME = "deit_test_patch8_32"
NARROW = dict(embed_dim=16, num_heads=2, img_size=16)  # depth 3: 3 * (2 + 64) + 16 = 214 gates
HESSIAN_EMBED = 6.0


def soft_cross_entropy(outputs, targets):
    return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()


def make_model(**kwargs):
    return randomize_(create_model(NAME, **NARROW, **kwargs), 0, scale=0.3).to(torch.float64)


def make_batch(arch, size: int = 3, seed: int = 4):
    """Seeded images with soft (mixup-like) targets, float64."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, arch.in_chans, arch.img_size, arch.img_size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, arch.num_classes, (2, size), generator=g)
    targets = 0.7 * F.one_hot(labels[0], arch.num_classes) + 0.3 * F.one_hot(labels[1], arch.num_classes)
    return images, targets.to(torch.float64)


def scored_C(model, batch, monkeypatch, draws, **kwargs):
    """C of the real pass on one batch, its draws forced: `draws[k]` for the batch's k-th draw."""
    monkeypatch.setattr(scoring, "block_draw", lambda seed, index, depth, draw=0: draws[draw])
    scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, hessian_embed=HESSIAN_EMBED,
                           hessian_blocks=len(draws), **kwargs)
    scorer.score_batch(*batch, 0)
    return scorer.finalize()[1]


def exact_expectation(model, batch):
    """E[C] over l ~ U{0..depth-1}, m ~ U{0..l} (embedding row: block 0), from the full gate Hessian."""
    arch = model.arch
    depth, D = arch.depth, arch.embed_dim
    model = copy.deepcopy(model).eval()  # functional_call leaves the shared res_gate swapped otherwise
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for p in model.gate_parameters()]
    sizes = [p.numel() for p in model.gate_parameters()]
    images, targets = batch

    def loss_of(flat):
        return soft_cross_entropy(functional_call(model, dict(zip(names, flat.split(sizes))), (images,)), targets)

    H = torch.autograd.functional.hessian(loss_of, torch.ones(sum(sizes), dtype=torch.float64), vectorize=True)
    offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]

    def block(component: int, b: int) -> slice:  # gate_parameters() order: heads, mlp per block, embed
        index = [b, depth + b, 2 * depth][component]
        return slice(offsets[index], offsets[index + 1])

    n = torch.tensor([D, 4 * D, D * depth * HESSIAN_EMBED], dtype=torch.float64)
    E = torch.zeros(3, 3, dtype=torch.float64)
    for l in range(depth):
        for i in range(2):
            for j in range(2):
                E[i, j] += sum(H[block(i, l), block(j, m)].sum() for m in range(l + 1)) / (l + 1) / depth
            E[i, 2] += H[block(i, l), block(2, 0)].sum() / depth
    for j in range(3):
        E[2, j] = H[block(2, 0), block(j, 0)].sum()
    return E / (n[:, None] * n[None, :])


def test_both_estimators_have_the_exact_expectation(monkeypatch):
    model = make_model()
    depth = model.arch.depth
    batch = make_batch(model.arch)
    exact = exact_expectation(model, batch)
    assert exact.abs().min() > 0

    # reference: every joint draw (l, m[0][0], m[0][1], m[1][0], m[1][1]) through the real code
    reference = torch.zeros(3, 3, dtype=torch.float64)
    draws = 0
    for l in range(depth):
        for m in itertools.product(range(l + 1), repeat=4):
            draw = BlockDraw(l, ((m[0], m[1]), (m[2], m[3]), (0, 0)))
            reference += scored_C(model, batch, monkeypatch, [draw]) / depth / (l + 1) ** 4
            draws += 1
    assert draws == 1 + 2 ** 4 + 3 ** 4
    # rb: l only (its m is ignored: any value gives the same C)
    rb = sum(scored_C(model, batch, monkeypatch, [BlockDraw(l, ((l, 0), (0, l), (0, 0)))], estimator="rb")
             for l in range(depth)) / depth
    torch.testing.assert_close(reference, exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(rb, exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(rb, reference, rtol=1e-6, atol=0)


def test_rb_is_the_mean_over_m_of_the_reference(monkeypatch):
    """Per draw of l, rb's heads and MLP columns = the reference's averaged over m; the rest identical."""
    model = make_model()
    batch = make_batch(model.arch, seed=9)
    l = model.arch.depth - 1
    rb = scored_C(model, batch, monkeypatch, [BlockDraw(l, ((0, 0), (0, 0), (0, 0)))], estimator="rb")
    mean = sum(scored_C(model, batch, monkeypatch, [BlockDraw(l, ((m, m), (m, m), (0, 0)))])
               for m in range(l + 1)) / (l + 1)
    torch.testing.assert_close(rb, mean, rtol=1e-9, atol=0)


def test_rb_equals_reference_on_one_block(monkeypatch):
    model = make_model(depth=1)
    batch = make_batch(model.arch)
    draw = BlockDraw(0, ((0, 0), (0, 0), (0, 0)))
    assert torch.equal(scored_C(model, batch, monkeypatch, [draw], estimator="rb"),
                       scored_C(model, batch, monkeypatch, [draw], estimator="reference"))
    # and through the real draws of the pass, several batches
    results = []
    for estimator in ("reference", "rb"):
        monkeypatch.setattr(scoring, "block_draw", block_draw)
        scorer = PruningScorer(model, soft_cross_entropy, need_hessian=True, seed=5, estimator=estimator)
        for k in range(3):
            scorer.score_batch(*make_batch(model.arch, seed=k), k)
        results.append(scorer.finalize()[1])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("estimator", ["reference", "rb"])
def test_two_blocks_average_the_two_single_draws(monkeypatch, estimator):
    model = make_model()
    batch = make_batch(model.arch, seed=6)
    a = BlockDraw(2, ((1, 0), (2, 1), (0, 0)))
    b = BlockDraw(1, ((0, 1), (1, 1), (0, 0)))
    both = scored_C(model, batch, monkeypatch, [a, b], estimator=estimator)
    single = [scored_C(model, batch, monkeypatch, [d], estimator=estimator) for d in (a, b)]
    torch.testing.assert_close(both, (single[0] + single[1]) / 2, rtol=1e-12, atol=0)
    assert not torch.allclose(single[0], single[1])


def test_the_extra_draws_are_keyed_by_seed_batch_and_draw(monkeypatch):
    depth = 12
    # draw 0 is the reference's draw, unchanged
    assert block_draw(7, 3, depth) == block_draw(7, 3, depth, draw=0)
    extra = [[block_draw(7, k, depth, draw=d) for d in range(1, 4)] for k in range(200)]
    assert extra == [[block_draw(7, k, depth, draw=d) for d in range(1, 4)] for k in range(200)]
    assert [e[0] for e in extra] != [block_draw(7, k, depth) for k in range(200)]
    assert [e[0] for e in extra] != [e[1] for e in extra]
    assert {e[0].l for e in extra} == set(range(depth))
    # the scorer asks for draws 0..K-1 of the batch's GLOBAL index
    asked = []
    monkeypatch.setattr(scoring, "block_draw",
                        lambda seed, index, d, draw=0: asked.append((seed, index, draw)) or block_draw(seed, index, d))
    model = make_model()
    scorer = PruningScorer(model, soft_cross_entropy, need_hessian=True, seed=11, hessian_blocks=3)
    scorer.score_batch(*make_batch(model.arch), 42)
    assert asked == [(11, 42, 0), (11, 42, 1), (11, 42, 2)]


def test_rb_micro_batches_give_the_whole_batch_result():
    model = make_model()
    batch = make_batch(model.arch, size=4, seed=2)
    Cs = []
    for micro_batch in (None, 1):
        scorer = PruningScorer(model, soft_cross_entropy, need_hessian=True, seed=1, estimator="rb",
                               hessian_blocks=2, micro_batch=micro_batch)
        scorer.score_batch(*batch, 0)
        Cs.append(scorer.finalize()[1])
    torch.testing.assert_close(Cs[1], Cs[0], rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize("kwargs, field, words", [(dict(estimator="exact"), "hessian_estimator", "got 'exact'"),
                                                  (dict(hessian_blocks=0), "hessian_blocks", ">= 1, got 0"),
                                                  (dict(hessian_blocks=1.5), "hessian_blocks", ">= 1, got 1.5")])
def test_bad_estimator_flags(kwargs, field, words):
    with pytest.raises(UserError, match=words) as err:
        PruningScorer(make_model(), soft_cross_entropy, need_hessian=True, **kwargs)
    assert err.value.field == field
