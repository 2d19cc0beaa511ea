"""The ablation's statistics: the t quantiles against numerical integration, the paired verdicts
against a direct computation, and the plain answer on made-up results whose outcome is known."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ablation_report import BASELINES, Paired, answer, t975, target_verdict, wins  # noqa: E402


def _t_central_mass(t: float, df: int, steps: int = 200001) -> float:
    """P(|T| <= t) for Student's t with `df` degrees of freedom, by Simpson's rule on its density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = np.linspace(0.0, t, steps)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0]
    simpson = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    return 2 * simpson


@pytest.mark.parametrize("df", list(range(1, 31)) + [50, 200])
def test_t_quantiles_hold_95_percent(df):
    assert _t_central_mass(t975(df), df) == pytest.approx(0.95, abs=2e-4)


def test_t_quantiles_match_the_printed_table_and_tend_to_the_normal_one():
    # Student's table, t(0.975, df) to 3 decimals
    assert [round(t975(df), 3) for df in (1, 2, 3, 4, 10, 30)] == [12.706, 4.303, 3.182, 2.776, 2.228, 2.042]
    assert 1.96 < t975(200) < 1.973 and t975(10 ** 7) == pytest.approx(1.95996, abs=1e-5)
    with pytest.raises(ValueError):
        t975(0)


def _paired_direct(a, b):
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    half = t975(n - 1) * d.std(ddof=1) / math.sqrt(n)
    return d.mean(), half


@pytest.mark.parametrize("seed", range(20))
def test_paired_interval_and_verdict_match_a_direct_computation(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    a = rng.normal(80, 3, n)
    b = a - rng.normal(rng.normal(0, 2), rng.uniform(0.1, 3), n)
    pair = Paired(dict(enumerate(a)), dict(enumerate(b)))
    mean, half = _paired_direct(a, b)
    assert pair.mean == pytest.approx(mean) and pair.half_width == pytest.approx(half)
    expected = "ahead" if mean - half > 0 else "behind" if mean + half < 0 else "within"
    assert pair.verdict == expected
    assert pair.ahead == int(((a - b) > 0).sum())


def test_paired_uses_only_common_seeds_and_one_seed_is_never_a_win():
    pair = Paired({0: 90.0, 1: 91.0, 5: 99.0}, {0: 80.0, 1: 80.0, 7: 0.0})
    assert pair.n == 2 and pair.mean == pytest.approx(10.5)
    assert Paired({0: 99.0}, {0: 1.0}).verdict == "within"
    same = Paired({0: 90.0, 1: 91.0, 2: 92.0}, {0: 89.0, 1: 90.0, 2: 91.0})  # always +1: no spread at all
    assert same.verdict == "ahead" and same.std == 0.0


def _rows(values, seeds=range(5)):
    return [{"seed": s, "acc_pruned": v[0], "acc_finetuned": v[1], "counts": {"heads": 0, "mlp": 0, "embed": 0},
             "reduction": 0.5, "acc_best": v[1]} for s, v in zip(seeds, values)]


def _results(savit_gap_pruned, savit_gap_ft, noise=0.3, seed=0):
    """SAViT ahead of every baseline by the given gaps (points), with per-seed noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(60, 90, (5, 2))
    out = {}
    for m in BASELINES:
        out[m] = _rows(base + rng.normal(0, noise, (5, 2)))
    best = np.max([[[r["acc_pruned"], r["acc_finetuned"]] for r in out[m]] for m in BASELINES], axis=0)
    out["savit"] = _rows(best + np.array([savit_gap_pruned, savit_gap_ft]))
    out["savit_rb"] = _rows(best - 5)
    return out


def test_answer_names_exactly_where_savit_wins():
    by_target = {0.3: _results(-2.0, -2.0, seed=1), 0.7: _results(3.0, -2.0, seed=2)}
    assert wins(by_target[0.7], "savit", "acc_pruned") is True
    assert not wins(by_target[0.7], "savit", "acc_finetuned")
    assert not wins(by_target[0.7], "savit_rb", "acc_pruned")
    text = "\n".join(answer(by_target))
    assert "70% with the reference estimator of C, right after pruning" in text
    assert "30%" not in text.splitlines()[0] and "after fine-tune" not in text.splitlines()[0]
    lines = target_verdict(by_target[0.7])
    assert lines[0].startswith("- SAViT, reference estimator of C, right after pruning: **wins**")
    assert "behind beyond the noise: first_order" in lines[2]  # rb, 5 points below the best baseline


def test_answer_says_no_win_when_there_is_none():
    text = answer({0.5: _results(-1.0, -1.0)})[0]
    assert "at no target" in text
