"""--round_to: hardware-aligned widths (kept MLP width of every block and kept embedding width
multiples of N), the FLOPs target still met, N = 1 the unaligned selection bit for bit."""
import io
import os
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch

from models import arch_of
from pruning.flops import analytic_macs
from pruning.pickles import save_pickles
from pruning.search import ACCEPT_TOLERANCE, SearchOptions, check_target_reachable, prune
from pruning.selection import protected_count
from utils import UserError

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
TINY = "deit_test_patch8_32"  # embed 64, MLP 256, depth 3
FAST = dict(population=20, children=10, generations=20)  # a small evolution strategy: the alignment is what is tested


def random_criteria(arch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(arch.depth, arch.num_heads, generator=g, dtype=torch.float64),
            "mlp": torch.rand(arch.depth, arch.mlp_hidden, generator=g, dtype=torch.float64) * 1e-3,
            "embed": torch.rand(arch.embed_dim, generator=g, dtype=torch.float64) * 0.1}


def random_interactions(seed):
    return torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).abs()


def reduction(arch, mask):
    """Exact reduction counted from the mask's structure (closed-form count, written out here)."""
    return 1 - analytic_macs(arch, len(mask.embed), [len(h) for h in mask.heads],
                             [len(m) for m in mask.mlp])["total"] / analytic_macs(arch)["total"]


def check_aligned(arch, mask, crit, n, protect=True):
    """Widths are multiples of n; within each block (and the embedding) the pruned units are the
    lowest by criterion; protected units stay."""
    assert len(mask.embed) % n == 0 and len(mask.embed) > 0
    assert all(len(m) % n == 0 for m in mask.mlp), [len(m) for m in mask.mlp]
    rows = [(crit["mlp"][b].numpy(), mask.mlp[b]) for b in range(arch.depth)] + [(crit["embed"].numpy(), mask.embed)]
    for scores, kept in rows:
        pruned = np.setdiff1d(np.arange(len(scores)), kept)
        if protect:
            top = np.argsort(-scores, kind="stable")[:protected_count(len(scores))]
            assert set(top.tolist()) <= set(kept)
        if len(pruned) and len(kept):
            assert scores[pruned].max() <= scores[kept].min()


@pytest.mark.parametrize("name", DEIT)
@pytest.mark.parametrize("n", [8, 32, 64])
@pytest.mark.parametrize("mode", ["first-order", "interactions"])
def test_deit_widths_are_multiples_and_target_met(name, n, mode):
    arch = arch_of(name)
    for seed, target in ((1, 0.3), (2, 0.5)):
        crit = random_criteria(arch, seed)
        C = random_interactions(seed) if mode == "interactions" else None
        mask, report = prune(crit, C, arch, SearchOptions(target, use_interactions=C is not None, seed=seed,
                                                          round_to=n, **FAST))
        assert report["mode"] == mode and report["round_to"] == n
        check_aligned(arch, mask, crit, n)
        assert abs(reduction(arch, mask) - target) <= ACCEPT_TOLERANCE
        assert report["achieved_reduction"] == pytest.approx(reduction(arch, mask), abs=1e-12)
        kept, total = mask.kept_counts(), mask.total_counts()
        assert report["counts"] == {c: total[c] - kept[c] for c in total}


@pytest.mark.parametrize("n", [8, 32, 64])
def test_tiny_model_widths_are_multiples(n):
    arch = arch_of(TINY)
    assert arch.embed_dim % n == 0 and arch.mlp_hidden % n == 0
    for seed in range(3):
        crit = random_criteria(arch, seed)
        mask, _ = prune(crit, None, arch, SearchOptions(0.3, use_interactions=False, round_to=n))
        check_aligned(arch, mask, crit, n)
        assert abs(reduction(arch, mask) - 0.3) <= ACCEPT_TOLERANCE


@pytest.mark.parametrize("layers", [1, 2])
def test_single_component_aligned_and_others_whole(layers):
    arch = arch_of("deit_small_patch16_224")
    crit = random_criteria(arch, 4)
    target = 0.2 if layers == 1 else 0.23  # embedding alone: steps of 32 channels (~7.7% of the FLOPs)
    mask, _ = prune(crit, None, arch, SearchOptions(target, layers=layers, round_to=32))
    check_aligned(arch, mask, crit, 32)
    assert all(len(h) == arch.num_heads for h in mask.heads)
    if layers == 1:
        assert len(mask.embed) == arch.embed_dim
    else:
        assert all(len(m) == arch.mlp_hidden for m in mask.mlp)
    assert abs(reduction(arch, mask) - target) <= ACCEPT_TOLERANCE


@pytest.mark.parametrize("case", range(6))
def test_round_to_1_is_the_unaligned_selection(case):
    rng = np.random.default_rng(case)
    name = [TINY, "deit_tiny_patch16_224", "deit_small_patch16_224"][case % 3]
    arch = arch_of(name)
    crit = random_criteria(arch, 10 + case)
    C = random_interactions(case) if case % 2 else None
    kwargs = dict(flops_percentage=float(rng.uniform(0.2, 0.5)), use_interactions=C is not None, seed=case,
                  protect=bool(case % 3 != 2), **FAST)
    plain, plain_report = prune(crit, C, arch, SearchOptions(**kwargs))
    ones, ones_report = prune(crit, C, arch, SearchOptions(round_to=1, **kwargs))
    assert ones.to_dict() == plain.to_dict()
    assert ones_report == plain_report


@pytest.mark.parametrize("bad", [0, -8, 1024, 48, 2.5, True])
def test_bad_round_to_is_one_line_error(bad):
    arch = arch_of("deit_tiny_patch16_224")  # embed 192, MLP 768: 1024 is larger, 48 divides 192 and 768
    if bad == 48:
        arch = arch_of(TINY)  # 48 does not divide 64
    with pytest.raises(UserError, match=f"{bad}") as err:
        check_target_reachable(arch, 0.3, round_to=bad)
    assert err.value.field == "round_to" and "\n" not in str(err.value)
    with pytest.raises(UserError, match=f"{bad}") as err:
        prune(random_criteria(arch, 0), None, arch, SearchOptions(0.3, use_interactions=False, round_to=bad))
    assert err.value.field == "round_to"


def run_main_in_process(argv):
    import main as prune_main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            prune_main.main(prune_main.get_args_parser().parse_args(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


COMMON = ["--model", TINY, "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "16", "--num_workers", "0",
          "--finetune_op", "2", "--pruning_flops_percentage", "0.3"]


def test_main_bad_round_to_before_any_data(tmp_path):
    out = tmp_path / "out"
    code, _, err = run_main_in_process(COMMON + ["--round_to", "0", "--data-set", "IMNET", "--data-path",
                                                 str(tmp_path / "nowhere"), "--output_dir", str(out)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--round_to" in lines[0], err
    assert not out.exists()


def test_main_round_to_from_pickles(tmp_path):
    """main.py --round_to 8 from criteria pickles: the saved mask has aligned widths."""
    from models.mask import PruneMask

    arch = arch_of(TINY)
    pickles = tmp_path / "pickles"
    crit = random_criteria(arch, 7)
    save_pickles(str(pickles), 2, crit, None)
    out = tmp_path / "out"
    code, _, err = run_main_in_process(COMMON + ["--round_to", "8", "--pruning_pickle_from", str(pickles),
                                                 "--output_dir", str(out)])
    assert code in (0, None), err
    mask = PruneMask.load(str(out / "mask.json"))
    check_aligned(arch, mask, crit, 8)
    assert abs(reduction(arch, mask) - 0.3) <= ACCEPT_TOLERANCE
    assert os.path.isfile(out / "checkpoint_pruned_00.pth")
