"""The scoring pass (pruning/scoring.py) beyond the fidelity tests of tests/test_importance.py
and tests/test_interactions_estimator.py: the embedding row of C is drawn at block 0 and equals
plain autograd there, and the pass prints its progress on a timer."""
import re

import torch
import torch.nn.functional as F

from conftest import TimedItems, randomize_
from models import create_model
from pruning import scoring
from pruning.interactions import block_draw, interaction_normalisers
from pruning.scoring import PruningScorer

NAME = "deit_test_patch8_32"  # 3 blocks, 4 heads, width 64


def soft_cross_entropy(outputs, targets):
    return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()


def soft_batch(arch, batch: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, arch.in_chans, arch.img_size, arch.img_size, generator=g, dtype=dtype)
    labels = torch.randint(0, arch.num_classes, (2, batch), generator=g)
    targets = 0.7 * F.one_hot(labels[0], arch.num_classes) + 0.3 * F.one_hot(labels[1], arch.num_classes)
    return images, targets.to(dtype)


# -- the embedding row of C ----------------------------------------------------------------

def test_block_draws_use_block_zero_for_the_embedding_row():
    draws = [block_draw(3, k, 12) for k in range(300)]
    assert all(d.m[2] == (0, 0) for d in draws)
    assert any(d.m[0] != (0, 0) or d.m[1] != (0, 0) for d in draws)  # heads/mlp rows still drawn in [0, l]


def test_embedding_row_of_C_equals_brute_force_at_block_zero():
    seed = 5
    model = randomize_(create_model(NAME), 1, scale=0.3).double().eval()
    arch = model.arch
    depth = arch.depth
    # a batch whose block l is the last one: block 0 and block l differ
    k = next(i for i in range(100) if block_draw(seed, i, depth).l == depth - 1)
    images, targets = soft_batch(arch, 3, seed=2)
    scorer = PruningScorer(model, soft_cross_entropy, method=2, need_hessian=True, hessian_embed=6.0, seed=seed)
    scorer.score_batch(images, targets, k)
    _, C = scorer.finalize()

    # brute force: d/dg_j (sum of dL/dg_embed) by plain autograd on the gates
    gates = [g.requires_grad_() for g in model.gate_parameters()]  # gates are frozen by default
    loss = soft_cross_entropy(model(images), targets)
    d_embed, = torch.autograd.grad(loss, gates[-1], create_graph=True)
    wrt = [gates[0], gates[depth], gates[depth - 1], gates[2 * depth - 1]]  # heads, mlp at block 0, then at l
    rows = torch.autograd.grad(d_embed.sum(), wrt)
    n = interaction_normalisers(arch, 6.0)
    expected = [rows[0].sum() / n[2, 0], rows[1].sum() / n[2, 1]]
    at_block_l = [rows[2].sum() / n[2, 0], rows[3].sum() / n[2, 1]]
    torch.testing.assert_close(C[2, :2], torch.stack(expected), rtol=1e-8, atol=1e-16)
    # the check can tell block 0 from block l (the old draws in [0, l])
    assert not torch.allclose(torch.stack(expected), torch.stack(at_block_l), rtol=1e-3)


# -- progress on a timer -------------------------------------------------------------------

def test_pruning_pass_prints_on_a_timer(monkeypatch):
    clock = [50.0]
    monkeypatch.setattr(scoring.time, "time", lambda: clock[0])
    model = randomize_(create_model(NAME), 0, scale=0.3)
    batch = soft_batch(model.arch, 2, seed=1, dtype=torch.float32)
    lines = []
    scorer = PruningScorer(model, soft_cross_entropy)
    # 12 s a batch, a line at least every 30 s: after batches 3 and 6 (72 s, also the last); log_every never fires
    scorer.score_batches(TimedItems(clock, 6, 12.0, batch), 6, log=lines.append, log_every=100)
    assert [re.search(r"\[(\d)/6\]", line).group(1) for line in lines] == ["3", "6"], lines
    assert "eta 0:00:36" in lines[0] and f"{6 / 36:.1f} samples/s" in lines[0]
    lines.clear()
    PruningScorer(model, soft_cross_entropy).score_batches(TimedItems(clock, 3, 0.0, batch), 3, log=lines.append,
                                                           log_every=100, log_seconds=30.0)
    assert len(lines) == 1 and "[3/3]" in lines[0]
