"""Compensation of the kept weights (pruning/compensate.py, main.py --compensate) against
independent computations: torch.linalg.lstsq, a hand-computed mean contribution, the unpruned
model when the pruned units are copies of kept ones, and the deploy model."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import images, randomize_, random_subset_mask
from models import PruneMask, arch_of, build_deploy_model, build_gated_model, load_pruned
from pruning.compensate import branch_outputs, compensate, input_moments, refit
from pruning.flops import mask_macs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "deit_test_patch8_32"


def moments_of(z: torch.Tensor) -> torch.Tensor:
    z1 = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1).double()
    return z1.T @ z1


def linear_problem(seed: int, tokens: int = 400, n: int = 12, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(out, n, generator=g, dtype=torch.float64), torch.randn(out, generator=g, dtype=torch.float64)
    kept = torch.rand(n, generator=g) < 0.5
    kept[0], kept[-1] = True, False
    return z, weight, bias, kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ls_with_ridge_zero_equals_lstsq_on_the_activations(seed):
    z, weight, bias, kept = linear_problem(seed)
    y = z @ weight.T + bias
    design = torch.cat([z[:, kept], torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    expected = torch.linalg.lstsq(design, y).solution.T
    new_w, new_b = refit(weight, bias, moments_of(z), kept, "ls", ridge=0.0)
    torch.testing.assert_close(new_w[:, kept], expected[:, :-1], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(new_b, expected[:, -1], atol=1e-9, rtol=1e-9)
    assert torch.equal(new_w[:, ~kept], weight[:, ~kept])  # pruned columns are not touched


def test_ls_reproduces_the_output_when_pruned_inputs_are_combinations_of_kept_ones():
    z, weight, bias, kept = linear_problem(3)
    mix = torch.randn(int(kept.sum()), int((~kept).sum()), dtype=torch.float64)
    z[:, ~kept] = z[:, kept] @ mix + 0.5  # affine combinations: the constant column covers the offset
    new_w, new_b = refit(weight, bias, moments_of(z), kept, "ls", ridge=0.0)
    torch.testing.assert_close(z[:, kept] @ new_w[:, kept].T + new_b, z @ weight.T + bias, atol=1e-9, rtol=1e-9)


def test_bias_moves_the_mean_contribution_and_ridge_shrinks_the_weights():
    z, weight, bias, kept = linear_problem(4)
    new_w, new_b = refit(weight, bias, moments_of(z), kept, "bias")
    torch.testing.assert_close(new_b, bias + weight[:, ~kept] @ z[:, ~kept].mean(0))
    assert torch.equal(new_w, weight)
    free = refit(weight, bias, moments_of(z), kept, "ls", ridge=0.0)[0][:, kept]
    shrunk = refit(weight, bias, moments_of(z), kept, "ls", ridge=10.0)[0][:, kept]
    assert shrunk.norm() < free.norm()


def tiny_gated(seed: int = 0, name: str = TINY):
    return randomize_(build_gated_model(arch_of(name)), seed=seed).eval()


def batches(arch, n: int = 4):
    return [images(arch, n=6, seed=s) for s in range(n)]


def test_bias_on_a_tiny_model_equals_the_hand_computed_mean():
    model = tiny_gated()
    mlp = model.blocks[0].mlp
    pruned = [1, 5, 9, 40]
    mlp.hidden_gate1.weight[pruned] = 0.0
    seen = []
    handle = model.blocks[0].norm2.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    data = batches(model.arch)
    with torch.no_grad():
        for x in data:
            model(x)
    handle.remove()
    hidden = torch.cat([F.gelu(mlp.fc1(u)).reshape(-1, mlp.fc1.out_features) for u in seen]).double()
    expected = mlp.fc2.bias.double() + mlp.fc2.weight.double()[:, pruned] @ hidden[:, pruned].mean(0)
    records = compensate(model, data, "bias")
    assert [r["layer"] for r in records] == ["blocks.0.mlp.fc2"]
    torch.testing.assert_close(mlp.fc2.bias.double(), expected, atol=1e-6, rtol=1e-6)


def test_ls_makes_a_model_with_copied_units_equal_the_unpruned_model():
    model = tiny_gated(1)
    data = batches(model.arch)
    hd = model.blocks[0].attn.head_dim
    dim = model.arch.embed_dim
    with torch.no_grad():
        for block in model.blocks:  # head 3 = head 0 and neuron 2k+1 = neuron 2k, in q, k and v
            w, b = block.attn.qkv.weight, block.attn.qkv.bias
            for part in range(3):
                rows = slice(part * dim, (part + 1) * dim)
                w[rows][3 * hd:4 * hd] = w[rows][0:hd]
                b[rows][3 * hd:4 * hd] = b[rows][0:hd]
            block.mlp.fc1.weight[1::2] = block.mlp.fc1.weight[0::2]
            block.mlp.fc1.bias[1::2] = block.mlp.fc1.bias[0::2]
        unpruned = [model(x) for x in data]
        for block in model.blocks:
            block.attn.attn_gate.weight[3] = 0.0
            block.mlp.hidden_gate1.weight[1::2] = 0.0
        pruned = [model(x) for x in data]
    assert max((a - b).abs().max() for a, b in zip(pruned, unpruned)) > 1e-2
    records = compensate(model, data, "ls", ridge=0.0)
    assert len(records) == 2 * model.arch.depth and all(r["relative_error_after"] < 1e-5 for r in records)
    with torch.no_grad():
        for x, ref in zip(data, unpruned):
            torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", [TINY, "swin_test_patch2_window4_32"])
@pytest.mark.parametrize("method", ["bias", "ls"])
def test_compensated_model_keeps_its_mask_and_deploys_exactly(name, method):
    model = tiny_gated(2, name)
    arch = model.arch
    mask = random_subset_mask(arch, seed=5, embed=True, empty=[(1, "heads")])
    mask.apply_to(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = compensate(model, batches(arch), method, ridge=1e-2)
    assert records and all(r["relative_error_after"] <= r["relative_error_before"] + 1e-9 for r in records)
    state = model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    refit_layers = {name for name, *_ in branch_outputs(model)}
    assert changed and all(k.rsplit(".", 1)[0] in refit_layers for k in changed)
    after = type(mask).from_gate_state_dict(state)
    assert after == mask and mask_macs(arch, after) == mask_macs(arch, mask)
    model.mask_aware_norm = True
    deploy = build_deploy_model(arch, mask, weights=state).eval()
    x = images(arch, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), atol=1e-4, rtol=1e-4)


def test_moments_see_the_pruned_units_and_restore_the_gate():
    model = tiny_gated(3)
    gate = model.blocks[0].mlp.hidden_gate1
    gate.weight[:10] = 0.0
    saved = gate.weight.clone()
    S = input_moments(model, gate, model.blocks[0].mlp.fc2, batches(model.arch, 1), torch.device("cpu"))
    assert torch.equal(gate.weight, saved)
    assert (S.diagonal()[:10] > 0).all()  # the gated-off neurons' activations were captured


def run_main(out, *extra, processes: int = 1):
    flags = ["--model", TINY, "--data-set", "DIGITS", "--input-size", "32", "--num_workers", "0",
             "--batch-size", "32", "--aa", "", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--hflip", "0",
             "--seed", "0", "--device", "cpu", "--pruning_feed_percent", "0.1", "--pruning_flops_percentage", "0.5",
             "--output_dir", str(out), *extra]
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*launch, os.path.join(ROOT, "main.py"), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.e2e
def test_main_compensate_writes_an_ordinary_pruned_checkpoint(tmp_path):
    plain = run_main(tmp_path / "none")
    assert plain.returncode == 0, plain.stderr
    done = run_main(tmp_path / "ls", "--compensate", "ls", "--compensation_batches", "3",
                    "--pruning_pickle_from", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr
    for name in ("mask.json",):
        assert (tmp_path / "none" / name).read_bytes() == (tmp_path / "ls" / name).read_bytes()
    report = json.loads((tmp_path / "ls" / "pruning_report.json").read_text())
    plain_report = json.loads((tmp_path / "none" / "pruning_report.json").read_text())
    assert report["compensation"]["method"] == "ls" and report["compensation"]["batches"] == 3
    assert report["deploy_ptflops_macs"] == plain_report["deploy_ptflops_macs"]
    ckpt = torch.load(tmp_path / "ls" / "checkpoint_pruned_00.pth", weights_only=True)
    assert ckpt["compensation"]["method"] == "ls" and ckpt["compensation"]["ridge"] == 1e-2
    assert "compensation" not in torch.load(tmp_path / "none" / "checkpoint_pruned_00.pth", weights_only=True)
    deployed = load_pruned(str(tmp_path / "ls" / "checkpoint_pruned_00.pth"))
    assert deployed.structure() == PruneMask.load(str(tmp_path / "ls" / "mask.json")).structure()


@pytest.mark.e2e
@pytest.mark.parametrize("flag, value", [("--compensation_batches", "0"), ("--compensation_ridge", "-1"),
                                         ("--compensate", "lstsq")])
def test_bad_compensation_flags_are_one_line_errors(tmp_path, flag, value):
    done = run_main(tmp_path / "bad", flag, value)
    assert done.returncode != 0 and flag in done.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.e2e
def test_two_processes_give_the_one_process_compensation(tmp_path):
    plain = run_main(tmp_path / "none")
    assert plain.returncode == 0, plain.stderr
    extra = ["--compensate", "ls", "--compensation_batches", "5", "--pruning_pickle_from", str(tmp_path / "none")]
    one = run_main(tmp_path / "one", *extra)
    two = run_main(tmp_path / "two", *extra, processes=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a = torch.load(tmp_path / "one" / "checkpoint_pruned_00.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "checkpoint_pruned_00.pth", weights_only=True)["model"]
    base = torch.load(tmp_path / "none" / "checkpoint_pruned_00.pth", weights_only=True)["model"]
    assert any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
