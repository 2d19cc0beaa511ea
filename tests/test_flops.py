"""FLOPs (MACs) and params: analytic count vs ptflops on the deploy model, the paper's numbers, the CLI
(`python -m pruning.flops`) and its one-line flag errors."""
import os
import re
import subprocess
import sys

from dataclasses import replace

import pytest

from models import DeployViT, arch_of
from models.registry import TEST_CONFIGS
from pruning import flops
from pruning.flops import analytic_macs, mask_macs, mask_param_parts, mask_params, ptflops_macs
from models.mask import PruneMask
from conftest import MASK_CASES, mask_case, one_error_line
from utils import cli_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deploy_of(arch, mask) -> DeployViT:
    return DeployViT(arch, **mask.structure()).eval()


def assert_counts_agree(arch, mask) -> None:
    """Analytic MACs within 0.5% of ptflops on the deploy model; analytic params exact, per branch too."""
    model = deploy_of(arch, mask)
    analytic, counted = mask_macs(arch, mask), ptflops_macs(model, arch)
    assert abs(analytic["total"] / counted["total"] - 1) < 0.005, (analytic, counted)
    params = sum(p.numel() for p in model.parameters())
    assert mask_params(arch, mask) == params == counted["params"]
    parts = mask_param_parts(arch, mask)
    branch = {"attn": ("norm1", "attn", "ls1"), "mlp": ("norm2", "mlp", "ls2")}
    for part, prefixes in branch.items():
        numel = sum(p.numel() for n, p in model.named_parameters()
                    if n.startswith("blocks.") and n.split(".")[2] in prefixes)
        assert parts[part] == numel, part


@pytest.mark.parametrize("embed", [False, True], ids=["blocks_only", "with_embed"])
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("name", list(TEST_CONFIGS))
def test_analytic_matches_ptflops_tiny(name, case, embed):
    arch = arch_of(name)
    assert_counts_agree(arch, mask_case(arch, case, embed=embed))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["random0", "emptied"])
def test_analytic_matches_ptflops_deit_small(case):
    arch = arch_of("deit_small_patch16_224")
    assert_counts_agree(arch, mask_case(arch, case, embed=True))


# one full-size model per family, each with one pruned mask (embedding channels pruned as well)
FULL_SIZE_FAMILIES = [
    ("vit_base_patch16_224", "random1"),            # ViT (AugReg)
    ("deit3_small_patch16_224", "emptied"),         # LayerScale, no_embed_class
    ("vit_base_patch16_reg4_gap_256", "random2"),   # registers, avg pool + fc_norm
    ("vit_medium_patch16_gap_256", "emptied"),      # avg pool, no fc_norm
    ("vit_base_patch16_clip_224", "random0"),       # norm_pre, patch conv without bias
]


@pytest.mark.slow
@pytest.mark.parametrize("name, case", FULL_SIZE_FAMILIES)
def test_analytic_matches_ptflops_full_size_families(name, case):
    arch = arch_of(name)
    assert_counts_agree(arch, mask_case(arch, case, embed=True))


def test_unpruned_family_counts_follow_the_options():
    """Each option adds exactly its own term (independent closed forms of the differences)."""
    base = arch_of("vit_test_patch8_32")
    n, d, h, hd, depth = base.num_tokens, base.embed_dim, base.num_heads, base.head_dim, base.depth
    full = mask_macs(base)["total"]
    p = base.num_patches
    assert mask_macs(replace(base, init_values=1e-5))["total"] - full == depth * 2 * n * d
    assert mask_macs(replace(base, qkv_bias=False))["total"] - full == -depth * 3 * n * d
    assert mask_macs(replace(base, qk_norm=True))["total"] - full == depth * 2 * n * h * hd
    assert mask_macs(replace(base, pre_norm=True))["total"] - full == n * d - p * d  # norm_pre, no conv bias
    assert mask_macs(replace(base, global_pool="avg", fc_norm=True))["total"] - full == p * d + d - n * d
    params = mask_params(base)
    assert mask_params(replace(base, init_values=1e-5)) - params == depth * 2 * d
    assert mask_params(replace(base, qk_norm=True)) - params == depth * 4 * hd
    assert mask_params(replace(base, pre_norm=True)) - params == 2 * d - d
    assert mask_params(replace(base, reg_tokens=4)) - params == 4 * d + 4 * d  # tokens and pos_embed rows
    assert mask_params(replace(base, reg_tokens=4, no_embed_class=True)) - params == 4 * d - d  # no class row


@pytest.mark.slow
@pytest.mark.parametrize("name, gmacs, mparams", [
    ("deit_tiny_patch16_224", 1.25, 5.7),
    ("deit_small_patch16_224", 4.60, 22.1),
    ("deit_base_patch16_224", 17.57, 86.6),
])
def test_unpruned_totals_match_the_papers(name, gmacs, mparams):
    arch = arch_of(name)
    total = mask_macs(arch)["total"]
    assert abs(total / 1e9 / gmacs - 1) < 0.01, total
    assert abs(mask_params(arch) / 1e6 / mparams - 1) < 0.01  # DeiT paper: 5.7 / 22 / 86 M
    assert mask_params(arch) == sum(p.numel() for p in DeployViT(arch).parameters())


def test_split_and_emptied_branches_cost_nothing():
    arch = arch_of("deit_demo_patch8_32")
    full = mask_macs(arch)
    assert full["attn"] + full["mlp"] + full["other"] == full["total"]
    empty = mask_case(arch, "all_emptied")
    counted = mask_macs(arch, empty)
    assert counted["attn"] == 0 and counted["mlp"] == 0 and counted["other"] == full["other"]
    # independent closed form of one unpruned block (N tokens, width D, hidden 4D, h heads, h*d = D):
    # attention: norm1 ND + qkv 3ND^2+3ND + q k^T and attn v 2N^2 D + softmax hN^2 + proj ND^2+ND
    # MLP: norm2 ND + fc1 4ND^2+4ND + GELU 4ND + fc2 4ND^2+ND
    n, d, h = arch.num_tokens, arch.embed_dim, arch.num_heads
    block = 12 * n * d * d + 15 * n * d + 2 * n * n * d + h * n * n
    assert full["attn"] + full["mlp"] == arch.depth * block
    # the cost of a mask depends only on its counts, not on which units are kept
    mask = PruneMask(embed_dim=96, depth=6, num_heads=6, head_dim=16, mlp_hidden=384, heads=[[0, 2, 5]] * 6,
                     mlp=[list(range(100, 200))] * 6, embed=list(range(50, 90)))
    assert mask_macs(arch, mask) == analytic_macs(arch, 40, [3] * 6, [100] * 6)


# -- the command: one subprocess (the command line's exit status), the rest in this process -------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pruning.flops", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def run_main(capsys, *argv: str):
    """(exit status, stdout, stderr) of the command's entry (`cli_entry(_main)`, as `__main__` calls it)."""
    try:
        cli_entry(flops._main)(list(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, words", [
    (["--input-size", "0"], ["--input-size", "got 0"]),
    (["--model", "deit_test_patch8_32", "--input-size", "31"], ["--input-size", "patch size 8", "got 31"]),
    (["--nb-classes", "0"], ["--nb-classes", "got 0"]),
    (["--mask", "/nowhere/mask.json"], ["--mask", "/nowhere/mask.json", "not found"]),
])
def test_flops_cli_flags(argv, words, capsys):
    code, _, err = run_main(capsys, *argv)
    line = one_error_line(err)
    assert code == 2 and all(w in line for w in words), line


@pytest.mark.e2e
def test_flops_cli_input_size_zero_on_the_command_line():
    proc = run_cli("--input-size", "0")
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("error: --input-size")
    assert proc.stdout == ""


@pytest.mark.slow
def test_flops_command_prints_before_and_after(tmp_path, capsys):
    arch = arch_of("deit_small_patch16_224")
    mask = mask_case(arch, "random1", embed=True)
    path = tmp_path / "mask.json"
    mask.save_json(str(path))
    code, out, err = run_main(capsys, "--model", "deit_small_patch16_224", "--mask", str(path), "--ptflops")
    assert code == 0, err
    assert re.search(r"before\s+after", out)
    before, after = mask_macs(arch)["total"] / 1e9, mask_macs(arch, mask)["total"] / 1e9
    assert re.search(rf"total GMACs\s+{before:.3f}\s+{after:.3f}", out), out
    p_before, p_after = mask_params(arch) / 1e6, mask_params(arch, mask) / 1e6
    assert re.search(rf"params \(M\)\s+{p_before:.3f}\s+{p_after:.3f}", out), out
    counted = re.search(r"ptflops: ([0-9.]+) GMACs", out)
    assert counted and abs(float(counted.group(1)) - after) <= 0.0015, out


def test_flops_command_unknown_model_is_one_clean_line(capsys):
    code, _, err = run_main(capsys, "--model", "nope")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "'nope'" in lines[0] and "deit_small_patch16_224" in lines[0]


def test_flops_command_mask_of_another_model(tmp_path, capsys):
    path = tmp_path / "mask.json"
    mask_case(arch_of("deit_test_patch8_32"), "random0").save_json(str(path))
    code, _, err = run_main(capsys, "--model", "deit_demo_patch8_32", "--mask", str(path))
    assert code == 2 and "Traceback" not in err
    assert str(path) in err and "mask is for" in err
