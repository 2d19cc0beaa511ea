"""FLOPs (MACs) and params of the Swins: the analytic count == ptflops on the deploy model (pruned and
unpruned, exactly), the analytic params == the deploy model's and timm's, Swin-T..B against their
published counts, and the command (`python -m pruning.flops`) on a Swin and its mask."""
import re

import pytest

from models import DeploySwin, arch_of
from models.swin_deploy import merge_bias_stages
from pruning.flops import analytic_macs, mask_macs, mask_param_parts, mask_params, ptflops_macs
from conftest import MASK_CASES, mask_case, one_error_line, random_subset_mask
from test_flops import run_main  # the command's entry, as `__main__` calls it

TINY = "swin_test_patch2_window4_32"
FULL_SIZE = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
             "swin_base_patch4_window12_384"]
# blocks 2 and 4 open stages 1 and 2 of the tiny Swin (depths 2, 2, 2, 2): emptying their heads gives
# those stages' patch mergings a bias
MERGE_BIAS_EMPTY = ((2, "heads"), (4, "heads"), (3, "mlp"), (7, "mlp"))


def assert_counts_agree(arch, mask) -> dict:
    """Analytic MACs == ptflops on the deploy model; analytic params == the model's, per branch too."""
    model = DeploySwin(arch, **(mask.structure() if mask is not None else {})).eval()
    analytic, counted = mask_macs(arch, mask), ptflops_macs(model, arch)
    print(f"{arch.img_size}px {mask.structure() if mask is not None else 'unpruned'}: "
          f"analytic {analytic['total']} ptflops {counted['total']} MACs")
    assert analytic["total"] == counted["total"], (analytic, counted)
    params = sum(p.numel() for p in model.parameters())
    assert mask_params(arch, mask) == params == counted["params"]
    parts = mask_param_parts(arch, mask)
    for part, prefixes in {"attn": ("norm1", "attn"), "mlp": ("norm2", "mlp")}.items():
        numel = sum(p.numel() for n, p in model.named_parameters()
                    if ".blocks." in n and n.split(".")[4] in prefixes)
        assert parts[part] == numel, part
    return analytic


@pytest.mark.parametrize("case", ["unpruned", *MASK_CASES, "merge_bias"])
def test_analytic_matches_ptflops_tiny(case):
    arch = arch_of(TINY)
    if case == "unpruned":
        mask = None
    elif case == "merge_bias":
        mask = random_subset_mask(arch, 5, embed=True, empty=MERGE_BIAS_EMPTY)
        assert merge_bias_stages(arch, mask.structure()["heads"]) == [False, True, True, False]
    else:
        mask = mask_case(arch, case, embed=case != "random2")  # random2: every channel kept
    assert_counts_agree(arch, mask)


def test_shift_mask_costs_one_add_per_logit():
    """Blocks 0 (windows) and 1 (shifted windows) of a stage differ by the shift mask alone."""
    arch = arch_of(TINY)
    hidden = [0] * arch.depth
    only = [[arch.num_heads[0] if b == i else 0 for b in range(arch.depth)] for i in (0, 1)]
    plain, shifted = (analytic_macs(arch, None, h, hidden)["attn"] for h in only)
    tokens, window = arch.resolutions[0] ** 2, arch.stage_window(0)
    assert arch.stage_shift(0) and shifted - plain == arch.num_heads[0] * tokens * window ** 2


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE)
def test_analytic_matches_ptflops_full_size(name):
    import timm

    arch = arch_of(name)
    assert_counts_agree(arch, None)
    assert mask_params(arch) == sum(p.numel() for p in timm.create_model(name).parameters())


@pytest.mark.slow
def test_analytic_matches_ptflops_pruned_swin_tiny():
    arch = arch_of(FULL_SIZE[0])
    empty = ((2, "heads"), (0, "mlp"), (10, "heads"), (11, "mlp"))  # blocks 2, 4 open stages 1, 2
    mask = random_subset_mask(arch, 7, embed=True, empty=empty)
    assert merge_bias_stages(arch, mask.structure()["heads"])[1]
    assert_counts_agree(arch, mask)


@pytest.mark.parametrize("name, gflops, mparams", [
    (FULL_SIZE[0], 4.5, 28.3), (FULL_SIZE[1], 8.7, 49.6), (FULL_SIZE[2], 15.4, 87.8), (FULL_SIZE[3], 47.0, 87.9),
])
def test_unpruned_totals_match_the_paper(name, gflops, mparams):
    """Swin paper, table 1 (its "FLOPs" are MACs; fvcore, without norms and softmax, gives 4.36e9 for Swin-T)."""
    arch = arch_of(name)
    total = mask_macs(arch)["total"]
    print(f"{name}: {total / 1e9:.4f} GMACs (paper {gflops}), {mask_params(arch) / 1e6:.3f} M params")
    assert abs(total / 1e9 / gflops - 1) < 0.015, total
    assert abs(mask_params(arch) / 1e6 / mparams - 1) < 0.002
    if name == FULL_SIZE[0]:
        assert 4.36e9 <= total <= 4.6e9


# -- the command ---------------------------------------------------------------------------------------------

def test_flops_command_on_a_swin_mask(tmp_path, capsys):
    arch = arch_of(TINY)
    mask = random_subset_mask(arch, 5, embed=True, empty=MERGE_BIAS_EMPTY)
    path = tmp_path / "mask.json"
    mask.save_json(str(path))
    code, out, err = run_main(capsys, "--model", TINY, "--mask", str(path), "--ptflops")
    assert code == 0, err
    before, after = mask_macs(arch)["total"] / 1e6, mask_macs(arch, mask)["total"] / 1e6
    assert re.search(rf"total MMACs\s+{before:.3f}\s+{after:.3f}", out), out
    p_before, p_after = mask_params(arch) / 1e6, mask_params(arch, mask) / 1e6
    assert re.search(rf"total params \(M\)\s+{p_before:.3f}\s+{p_after:.3f}", out), out
    counted = re.search(r"ptflops: ([0-9.]+) GMACs", out)
    assert counted and abs(float(counted.group(1)) * 1e3 - after) <= 0.05, out


def test_flops_command_on_swin_tiny(capsys):
    code, out, err = run_main(capsys, "--model", FULL_SIZE[0])
    assert code == 0, err
    total = mask_macs(arch_of(FULL_SIZE[0]))["total"] / 1e9
    assert re.search(rf"total GMACs\s+{total:.3f}\s+{total:.3f}\s+0.00%", out), out


@pytest.mark.parametrize("argv, words", [
    (["--model", TINY, "--input-size", "48"], ["--input-size 48", "6x6", "window 4"]),
    (["--model", TINY, "--input-size", "36"], ["--input-size 36", "2^(stages-1) = 16"]),
    (["--model", TINY, "--input-size", "31"], ["--input-size", "patch size 2", "got 31"]),
])
def test_flops_command_swin_input_size(argv, words, capsys):
    code, _, err = run_main(capsys, *argv)
    line = one_error_line(err)
    assert code == 2 and all(w in line for w in words), line


def test_flops_command_mask_of_the_other_family(tmp_path, capsys):
    path = tmp_path / "mask.json"
    mask_case(arch_of("deit_test_patch8_32"), "random0").save_json(str(path))
    code, _, err = run_main(capsys, "--model", TINY, "--mask", str(path))
    line = one_error_line(err)
    assert code == 2 and line.startswith("error: --mask") and "ViT mask" in line, line
