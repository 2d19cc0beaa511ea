"""End to end on timm ViTs other than DeiT and on the Swin: timm weights in a `.safetensors` file -> `main.py`
(SAViT, 50% FLOPs) -> `main_deploy.py --eval` of the physically smaller model, on the DIGITS data
at 32x32: the first family as a user runs them (subprocesses, one thread each), the others
meanwhile through the same entry points (and `cli_entry`) called in this process.

Families: plain ViT (AugReg layout), DeiT III (no_embed_class + LayerScale), a register ViT
without class token (avg pool + fc_norm) and the tiny Swin (4 stages, shifted windows). Each starts from timm's own tiny model trained here
for two short epochs (above chance, so that the accuracies compared below mean something).
Every result is checked against an independent computation: the timm model's logits, the
FLOPs counted by ptflops on the deploy model, the accuracy recomputed from the saved weights
(up to near-ties that round-off may flip). Which units a data-driven run prunes depends on
the CPU's round-off: only what any mask meeting the target satisfies is asserted.

A model SAViT cannot prune (Swin V2, EVA, ResPostBlock, parallel blocks, ...) is refused by both
entry points in one line naming --model, before any data is read.
"""
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from typing import Dict, List

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import main as prune_main
import main_deploy
from args import data_config
from conftest import assert_accuracy, topk_accuracy_bounds
from datasets import DigitsDataset, build_transform
from models import arch_of, build_gated_model, create_model, load_pruned
from models.registry import build_timm_test_model
from pruning.flops import ptflops_macs
from models.mask import PruneMask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["vit_test_patch8_32", "deit3_test_patch8_32", "vit_test_reg4_gap_patch8_32", "swin_test_patch2_window4_32"]
CHECKPOINT = "checkpoint_pruned_00.pth"
TARGET = 0.5
DATA = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu", "--batch-size", "16", "--num_workers", "0"]
# SAViT: method 2 with interactions; 5 of the 93 training batches keep the pass short
PRUNE = DATA + ["--pruning_method", "2", "--need_hessian", "--pruning_flops_percentage", str(TARGET),
                "--pruning_feed_percent", "0.06", "--seed", "0"]
VAL_IMAGES = 297


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest on a busy machine
    return env


def _run(script: str, argv: List[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _in_process(entry, argv: List[str]) -> subprocess.CompletedProcess:
    """An entry point's `main` in this process (the same `cli_entry` as the command line)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            entry.main(entry.get_args_parser().parse_args(argv))
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def _digits(train: bool):
    """A DIGITS split with the evaluation transform of both entry points, as (images, labels)."""
    cfg = data_config(main_deploy.get_args_parser().parse_args(DATA))
    ds = DigitsDataset(train, 32, build_transform(False, cfg))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


# ---------------------------------------------------------------------------
# Fixtures: timm weights in .safetensors files, and the three runs per family
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def val_set():
    return _digits(False)


@pytest.fixture(scope="module")
def timm_models(tmp_path_factory) -> Dict[str, tuple]:
    """name -> (path of its .safetensors file, timm's model in eval mode): timm's own tiny model of
    each family, trained two short epochs on the DIGITS training split (no augmentation)."""
    folder = tmp_path_factory.mktemp("timm_weights")
    x, y = _digits(True)
    models = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        net = build_timm_test_model(name)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        for _ in range(2):
            order = torch.randperm(len(x))
            for i in range(0, len(x) - 63, 64):
                idx = order[i:i + 64]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        path = str(folder / f"{name}.safetensors")
        safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        models[name] = (path, net.eval())
    return models


@pytest.fixture(scope="module")
def runs(tmp_path_factory, timm_models) -> Dict[str, dict]:
    """name -> output folder of main.py and the finished runs: `prune` (main.py from the .safetensors
    file), `gated_eval` (main.py --eval --mask_aware_norm of its checkpoint) and `deploy_eval`
    (main_deploy.py --eval --masked_model of the same checkpoint). The first family runs them on the
    command line (subprocesses); the others, meanwhile, call the same entry points in this process
    (their `cli_entry` path is the command line's; only the family differs)."""
    outs = {name: tmp_path_factory.mktemp("prune_" + name) for name in FAMILIES}

    def planned(name):
        """(kind, entry point, argv) of the three runs of `name`, in order."""
        checkpoint = os.path.join(outs[name], CHECKPOINT)
        return [("prune", prune_main, ["--model", name, *PRUNE, "--finetune", timm_models[name][0],
                                       "--output_dir", str(outs[name])]),
                ("gated_eval", prune_main, ["--model", name, *DATA, "--eval", "--output_dir", "", "--mask_aware_norm",
                                            "--finetune", checkpoint]),
                ("deploy_eval", main_deploy, ["--model", name + "_deploy", *DATA, "--eval", "--output_dir", "",
                                              "--masked_model", checkpoint])]

    def on_the_command_line(name):
        (kind, entry, argv), *evals = planned(name)
        result = {kind: _ok(_run(entry.__name__ + ".py", argv))}
        with ThreadPoolExecutor(2) as pool:  # the two evaluations at once
            jobs = {kind: pool.submit(_run, entry.__name__ + ".py", argv) for kind, entry, argv in evals}
            return {**result, **{kind: _ok(job.result()) for kind, job in jobs.items()}}

    results = {}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(on_the_command_line, FAMILIES[0])
        for name in FAMILIES[1:]:
            results[name] = {kind: _ok(_in_process(entry, argv)) for kind, entry, argv in planned(name)}
        results[FAMILIES[0]] = first.result()
    return {name: {"out": str(outs[name]), **results[name]} for name in FAMILIES}


def _printed_accuracy(stdout: str, which: str) -> List[float]:
    """top-1 %, top-5 % and loss of the final accuracy line of `which` ('gated' or 'deploy')."""
    model = r"gated model \(mask-aware LayerNorm\)" if which == "gated" else "deploy model"
    m = re.search(rf"accuracy of the {model} on {VAL_IMAGES} images: top-1 ([\d.]+)%  top-5 ([\d.]+)%  "
                  rf"loss ([\d.]+)", stdout)
    assert m, stdout[-2000:]
    return [float(v) for v in m.groups()]


def _ptflops_reduction(name: str, deploy) -> float:
    """1 - MACs of the deploy model / MACs of the unpruned deploy model, both counted by ptflops."""
    arch = deploy.arch
    full = create_model(name + "_deploy", num_classes=arch.num_classes, img_size=arch.img_size).eval()
    return 1 - ptflops_macs(deploy.eval(), arch)["total"] / ptflops_macs(full, arch)["total"]


# ---------------------------------------------------------------------------
# main.py -> main_deploy.py on each family
# ---------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("name", FAMILIES)
def test_pruning_starts_from_the_safetensors_weights_and_changes_only_gates(name, runs, timm_models, val_set):
    path, timm_model = timm_models[name]
    checkpoint = torch.load(os.path.join(runs[name]["out"], CHECKPOINT), map_location="cpu", weights_only=True)
    sd = checkpoint["model"]
    weights = safetensors.torch.load_file(path)
    assert {k for k in sd if "gate" not in k} == set(weights)
    for key, value in weights.items():
        assert torch.equal(sd[key], value), key
    mask = PruneMask.from_dict(checkpoint["mask"])
    assert sum(mask.kept_counts().values()) < sum(mask.total_counts().values())
    # the gated model with every gate open again is timm's model (logits of order 1-10)
    arch = arch_of(name, num_classes=10, img_size=32)
    gated = build_gated_model(arch)
    gated.load_state_dict({k: (torch.ones_like(v) if "gate" in k else v) for k, v in sd.items()})
    images = val_set[0][:64]
    with torch.no_grad():
        expected = timm_model(images)
        torch.testing.assert_close(gated.eval()(images), expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max()))


def _printed_reductions(run: dict) -> List[float]:
    """main.py's reduction (4 decimals of a %) and main_deploy.py's (2 decimals), as fractions."""
    m = re.search(r"FLOPs reduction \(deploy model, ptflops\): ([\d.]+)% \(target ([\d.]+)%\)", run["prune"].stdout)
    assert m and float(m.group(2)) == pytest.approx(100 * TARGET), run["prune"].stdout[-2000:]
    d = re.search(r"deploy model: [\d.]+ GMACs, [\d.]+ M params; FLOPs reduction ([\d.]+)%", run["deploy_eval"].stdout)
    assert d, run["deploy_eval"].stdout[-2000:]
    return [float(m.group(1)) / 100, float(d.group(1)) / 100]


@pytest.mark.e2e
@pytest.mark.parametrize("name", FAMILIES)
def test_flops_reduction_within_half_a_percent_of_the_target(name, runs):
    deploy = load_pruned(os.path.join(runs[name]["out"], CHECKPOINT))
    reduction = _ptflops_reduction(name, deploy)
    assert abs(reduction - TARGET) <= 0.005, reduction
    pruned, deployed = _printed_reductions(runs[name])
    assert abs(pruned - TARGET) <= 0.005 and abs(deployed - TARGET) <= 0.005, (pruned, deployed)
    assert deployed == pytest.approx(reduction, abs=6e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("name", FAMILIES)
def test_main_prints_the_ptflops_reduction_of_the_deploy_model(name, runs):
    deploy = load_pruned(os.path.join(runs[name]["out"], CHECKPOINT))
    assert _printed_reductions(runs[name])[0] == pytest.approx(_ptflops_reduction(name, deploy), abs=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("name", FAMILIES)
def test_deploy_accuracy_equals_mask_aware_gated_accuracy(name, runs, val_set):
    images, labels = val_set
    checkpoint = os.path.join(runs[name]["out"], CHECKPOINT)
    deploy = load_pruned(checkpoint)
    gated = build_gated_model(deploy.arch, mask_aware_norm=True)
    gated.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    with torch.no_grad():
        logits = deploy.eval()(images)
        gated_logits = gated.eval()(images)
    # the exact pruned network, in two forms: the narrower model and the gated one with mask-aware LayerNorm
    torch.testing.assert_close(gated_logits, logits, rtol=0, atol=1e-5 * max(1.0, logits.abs().max()))
    printed_gated = _printed_accuracy(runs[name]["gated_eval"].stdout, "gated")
    printed_deploy = _printed_accuracy(runs[name]["deploy_eval"].stdout, "deploy")
    for printed in (printed_gated, printed_deploy):
        # batches of 16 round off otherwise than one batch: top-1/top-5 up to near-ties, loss to its 4 decimals
        assert_accuracy(printed[0], logits, labels, k=1, slack=0.006)
        assert_accuracy(printed[1], logits, labels, k=5, slack=0.006)
        assert printed[2] == pytest.approx(F.cross_entropy(logits.double(), labels).item(), abs=6e-4)
    if len(set(topk_accuracy_bounds(logits, labels, k=1))) == 1:  # no near-tie: the same number, printed alike
        assert printed_gated[0] == printed_deploy[0]
    assert printed_gated[0] > 20  # trained above chance (10%): the comparison is not between two constants


# ---------------------------------------------------------------------------
# Models SAViT cannot prune: one line naming --model, before any data is read
# ---------------------------------------------------------------------------

MISSING_DATA = ["--data-set", "IMNET", "--data-path", "{tmp}/no_imagenet_here", "--device", "cpu",
                "--output_dir", "{tmp}/out"]
# (timm name, what the line must name)
UNSUPPORTED = [
    ("swinv2_tiny_window8_256", "cosine attention"),
    ("eva02_tiny_patch14_224", "Eva"),
    ("vit_base_patch16_rpn_224", "ResPostBlock"),
    ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
    ("vit_base_patch16_clip_quickgelu_224", "QuickGELU"),
    ("vit_base_patch16_siglip_224", "global_pool 'map'"),
]


def _check_refused(proc: subprocess.CompletedProcess, name: str, what: str, tmp) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --model: model {name!r} is not supported: "), lines[0]
    assert what in lines[0], lines[0]
    assert "--data-path" not in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    assert not os.path.exists(os.path.join(tmp, "out"))  # nothing written, not even a log


@pytest.mark.parametrize("script", ["main", "main_deploy"])
@pytest.mark.parametrize("name,what", UNSUPPORTED)
def test_unsupported_model_is_refused_in_one_line_before_the_data(script, name, what, tmp_path):
    entry = prune_main if script == "main" else main_deploy
    model = name if script == "main" else name + "_deploy"
    argv = ["--model", model, *[a.format(tmp=tmp_path) for a in MISSING_DATA]]
    _check_refused(_in_process(entry, argv), name, what, tmp_path)


def test_a_supported_model_with_the_same_flags_fails_on_the_data(tmp_path):
    """The control: the flags above do reach the data once the model is accepted."""
    argv = ["--model", "vit_test_patch8_32", *[a.format(tmp=tmp_path) for a in MISSING_DATA]]
    proc = _in_process(prune_main, argv)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --data-path"), proc.stderr


@pytest.mark.e2e
def test_unsupported_model_on_the_command_line(tmp_path):
    name = "swinv2_tiny_window8_256"
    missing_data = [a.format(tmp=tmp_path) for a in MISSING_DATA]
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(_run, script, ["--model", model, *missing_data], 120)
                for script, model in (("main.py", name), ("main_deploy.py", name + "_deploy"))]
        for job in jobs:
            proc = job.result()
            _check_refused(proc, name, "cosine attention", tmp_path)
            assert proc.stdout == ""
