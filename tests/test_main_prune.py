"""End-to-end runs of main.py (the SAViT pruning entry point): on the command line as a user runs
it (`python main.py ...` twice, two at a time, and `torchrun --nproc_per_node 2 main.py ...`), and
the runs that test a method or a flag rather than the process by `main.main` in this process (the
same `cli_entry` path, without the interpreter start-up).

Tiny DeiT (`deit_test_patch8_32`) on scikit-learn's digits (DIGITS, offline) or a tiny
ImageFolder tree, one thread per process. The achieved FLOPs reduction, the parameter
counts and the accuracy are recomputed here from the saved files (ptflops and a deploy
model), not read back from main.py's report. Every bad-input case calls `main.main` in this
process; one also runs as a subprocess.
Which units a data-driven run prunes depends on the CPU's round-off: the tests assert what
any mask meeting the target must satisfy, never the units one machine picked.
Runs of the pass are marked `e2e`; the in-process bad-input cases are the fast subset.
"""
import glob
import io
import json
import os
import pickle
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_accuracy
from models import arch_of, create_model, load_pruned
from models.vit_gated import GatedViT
from pruning.flops import mask_macs, ptflops_macs
from pruning.pickles import load_pickles
from models.mask import PruneMask
from pruning.search import prune
from utils import atomic_torch_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "deit_test_patch8_32"  # embed 64, depth 3, 4 heads of 16, MLP 256, 17 tokens
ARCH = arch_of(MODEL, num_classes=10, img_size=32)
CHECKPOINT = "checkpoint_pruned_00.pth"
# 1500 training digits // 16 = 93 batches; 6% of them = 5 batches (uneven over 2 processes)
DIGITS = ["--model", MODEL, "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "16",
          "--num_workers", "0", "--pruning_feed_percent", "0.06", "--log_period", "1", "--finetune_op", "2"]
# mixup/cutmix and RandAugment stay at their defaults (on)
SAVIT = DIGITS + ["--need_hessian", "--pruning_flops_percentage", "0.5", "--seed", "3"]


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest, and results do not depend on it
    return env


def run_main(args: List[str], output_dir: Optional[str], launcher: Optional[List[str]] = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["main.py"] + list(args)
    if output_dir is not None:
        cmd += ["--output_dir", str(output_dir)]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def run_in_process(args: List[str], output_dir) -> subprocess.CompletedProcess:
    import main as prune_main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            prune_main.main(prune_main.get_args_parser().parse_args(list(args) + ["--output_dir", str(output_dir)]))
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def load_pickle(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        return np.asarray(pickle.load(f))


def gate_tensors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if "gate" in k}


def deploy_counts(out_dir: str, arch=ARCH) -> Dict[str, float]:
    """Independent count from the saved checkpoint: ptflops and parameters of the deploy model vs the unpruned one."""
    deploy = load_pruned(os.path.join(out_dir, CHECKPOINT), arch)
    mask = deploy.mask
    full = create_model(MODEL + "_deploy", num_classes=arch.num_classes, img_size=arch.img_size)
    before, after = ptflops_macs(full.eval(), arch)["total"], ptflops_macs(deploy.eval(), arch)["total"]
    return {"mask": mask, "deploy": deploy, "macs_before": before, "macs_after": after,
            "reduction": 1 - after / before, "params_before": sum(p.numel() for p in full.parameters()),
            "params_after": sum(p.numel() for p in deploy.parameters())}


def printed_reduction(stdout: str) -> float:
    m = re.search(r"FLOPs reduction \(deploy model, ptflops\): ([\d.]+)% \(target ([\d.]+)%\)", stdout)
    assert m, stdout[-2000:]
    return float(m.group(1)) / 100


# -- shared runs --------------------------------------------------------------------------------

def digits_tensors(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The DIGITS split by hand, as datasets.py documents it (a permutation with seed 0: 1500 training images,
    then 297 validation images; 0..16 grey -> 0..255, bilinear to 32x32, RGB, ImageNet mean/std), no augmentation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    order = order[:1500] if split == "train" else order[1500:]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images = []
    for k in order:
        grey = np.clip(np.rint(digits.images[k] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        rgb = np.array(Image.fromarray(grey, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB"))
        images.append((torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(images), torch.from_numpy(digits.target[order])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """A DeiT checkpoint without gates (as timm/DeiT save them), random weights."""
    torch.manual_seed(1)
    sd = {k: v for k, v in create_model(MODEL, num_classes=10, img_size=32).state_dict().items() if "gate" not in k}
    path = str(tmp_path_factory.mktemp("ckpt") / "deit_test.pth")
    torch.save({"model": sd}, path)
    return path


EVAL = ["--model", MODEL, "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "16", "--num_workers", "0",
        "--eval", "--mask_aware_norm"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained) -> Dict[str, Tuple[str, subprocess.CompletedProcess]]:
    """The one-process SAViT run (method 2, interactions, mixup and RandAugment on) and the same again, on the
    command line; then, in this process, the same from its pickles and the evaluation of its checkpoint:
    name -> (output dir, finished run)."""
    dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("savit", "again", "from_pickles", "eval")}
    savit = SAVIT + ["--finetune", pretrained]
    with ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(run_main, savit, dirs[name]) for name in ("savit", "again")}
        done = {name: (dirs[name], ok(job.result())) for name, job in jobs.items()}
    done["from_pickles"] = (dirs["from_pickles"], ok(run_in_process(
        savit + ["--pruning_pickle_from", dirs["savit"]], dirs["from_pickles"])))
    done["eval"] = (dirs["eval"], ok(run_in_process(
        EVAL + ["--finetune", os.path.join(dirs["savit"], CHECKPOINT)], dirs["eval"])))
    return done


# -- 1. outputs ---------------------------------------------------------------------------------

@pytest.mark.e2e
def test_outputs_files_checkpoint_and_log(runs, pretrained):
    out, proc = runs["savit"]
    names = sorted(os.listdir(out))
    logs = [n for n in names if n.endswith(".log")]
    assert len(logs) == 1 and re.fullmatch(r"\d{8}_\d{6}\.log", logs[0])
    expected = {CHECKPOINT, "mask.json", "pruning_report.json", "hessian.pickle"} | {
        f"criteria_m2l{layer}_final.pickle" for layer in range(3)}
    assert set(names) - set(logs) == expected  # no temporary files left over
    assert not [n for n in names if n.startswith(".tmp_")]

    # checkpoint: the reference's {'model': gated state dict with 0/1 gates}, the mask beside it
    ckpt = torch.load(os.path.join(out, CHECKPOINT), map_location="cpu", weights_only=False)
    sd = ckpt["model"]
    assert set(sd) == set(create_model(MODEL, num_classes=10, img_size=32).state_dict())
    for key, gate in gate_tensors(sd).items():
        assert torch.all((gate == 0) | (gate == 1)), key
    weights = torch.load(pretrained, map_location="cpu")["model"]
    for key, value in weights.items():  # pruning changes gates only
        assert torch.equal(sd[key], value), key
    mask = PruneMask.load(os.path.join(out, "mask.json"))
    assert PruneMask.from_gate_state_dict(sd, model=MODEL) == mask
    assert PruneMask.from_dict(ckpt["mask"]) == mask
    assert sum(mask.kept_counts().values()) < sum(mask.total_counts().values())

    # pickles: the reference's names, one float64 array per component, and the 3x3 interactions
    shapes = {0: (3, 4), 1: (3, 256), 2: (64,)}
    for layer, shape in shapes.items():
        crit = load_pickle(os.path.join(out, f"criteria_m2l{layer}_final.pickle"))
        assert crit.shape == shape and crit.dtype == np.float64 and np.isfinite(crit).all() and (crit >= 0).all()
    hess = load_pickle(os.path.join(out, "hessian.pickle"))
    assert hess.shape == (3, 3) and np.isfinite(hess).all() and np.abs(hess).sum() > 0

    # achieved reduction, counted on the deploy model: within +-0.5% of the target, and printed
    counts = deploy_counts(out)
    assert counts["mask"] == mask
    assert abs(counts["reduction"] - 0.5) <= 0.005
    assert printed_reduction(proc.stdout) == pytest.approx(counts["reduction"], abs=1e-6)

    # the log: configuration, per-block pruned/total, FLOPs (attn, mlp, total) and params before/after
    log = open(os.path.join(out, logs[0])).read()
    config = json.loads(re.search(r"configuration: (\{.*\})", log).group(1))
    assert config["pruning_flops_percentage"] == 0.5 and config["model"] == MODEL and config["need_hessian"]
    for i in range(3):
        assert (f"block {i:2d}: heads pruned {4 - len(mask.heads[i])}/4, "
                f"mlp pruned {256 - len(mask.mlp[i])}/256") in log
    assert f"pruned embed: {64 - len(mask.embed)}/64" in log
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"(attn MMACs|mlp MMACs|total MMACs|params \(M\))\s+([\d.]+)\s+([\d.]+)", log)}
    assert set(rows) == {"attn MMACs", "mlp MMACs", "total MMACs", "params (M)"}
    assert rows["total MMACs"] == pytest.approx((counts["macs_before"] / 1e6, counts["macs_after"] / 1e6), abs=6e-4)
    assert rows["params (M)"] == pytest.approx((counts["params_before"] / 1e6, counts["params_after"] / 1e6),
                                               abs=6e-4)
    # attention / MLP rows: the analytic count of this mask, and smaller exactly where the mask prunes
    full, ours = mask_macs(ARCH), mask_macs(ARCH, mask)
    kept, total = mask.kept_counts(), mask.total_counts()
    embed_pruned = kept["embed"] < total["embed"]
    for part, pruned in (("attn", kept["heads"] < total["heads"] or embed_pruned),
                         ("mlp", kept["mlp"] < total["mlp"] or embed_pruned)):
        before, after = rows[f"{part} MMACs"]
        assert (before, after) == pytest.approx((full[part] / 1e6, ours[part] / 1e6), abs=6e-4), part
        assert (after < before) == pruned, part
    assert printed_reduction(log) == pytest.approx(counts["reduction"], abs=1e-6)


# -- 7. progress --------------------------------------------------------------------------------

@pytest.mark.e2e
def test_progress_lines_while_scoring(runs):
    _, proc = runs["savit"]
    found = re.findall(r"pruning pass: \[\s*(\d+)/(\d+)\]\s+eta (\d+:\d\d:\d\d)\s+([\d.]+) samples/s", proc.stdout)
    assert [(int(i), int(n)) for i, n, _, _ in found] == [(i, 5) for i in range(1, 6)]  # --log_period 1
    assert all(float(rate) > 0 for *_, rate in found)


# -- 3. determinism and --pruning_pickle_from ---------------------------------------------------

@pytest.mark.e2e
def test_same_seed_same_mask_bit_for_bit(runs):
    (a, _), (b, _) = runs["savit"], runs["again"]
    assert open(os.path.join(a, "mask.json"), "rb").read() == open(os.path.join(b, "mask.json"), "rb").read()
    ga, gb = (gate_tensors(torch.load(os.path.join(d, CHECKPOINT), map_location="cpu")["model"]) for d in (a, b))
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    for name in ["hessian.pickle"] + [f"criteria_m2l{layer}_final.pickle" for layer in range(3)]:
        assert np.array_equal(load_pickle(os.path.join(a, name)), load_pickle(os.path.join(b, name)))


@pytest.mark.e2e
def test_pickle_from_reproduces_mask_without_data_pass(runs):
    src, _ = runs["savit"]
    out, proc = runs["from_pickles"]
    assert "pruning pass" not in proc.stdout and "no data pass" in proc.stdout
    assert open(os.path.join(src, "mask.json")).read() == open(os.path.join(out, "mask.json")).read()
    # the pickles are read and copied as they are, so this folder can serve as --pruning_pickle_from
    copied = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.pickle")))
    assert copied == sorted(os.path.basename(p) for p in glob.glob(os.path.join(src, "*.pickle")))
    for name in copied:
        assert open(os.path.join(src, name), "rb").read() == open(os.path.join(out, name), "rb").read()


# -- 2. many processes --------------------------------------------------------------------------

def search_on_pickles(directory) -> PruneMask:
    """The mask main.py's search makes from the criteria and C saved in `directory` (SAVIT's flags)."""
    import main as prune_main
    from args import prune_config

    options = prune_config(prune_main.get_args_parser().parse_args(SAVIT)).search
    criteria, interactions = load_pickles(str(directory), 2, ARCH)
    return prune(criteria, interactions, ARCH, options, model_name=MODEL)[0]


@pytest.mark.e2e
def test_two_processes_equal_one_process(runs, pretrained, tmp_path):
    """torchrun, 2 CPU processes (gloo), each with a loader worker: the same criteria as 1 process (summed in
    another order, so equal up to round-off), and the mask the search makes of them."""
    one, _ = runs["savit"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = ok(run_main(SAVIT + ["--finetune", pretrained, "--num_workers", "1"], tmp_path, launcher=launcher))
    assert "3 on this process" in proc.stdout  # rank 0 scores global batches 0, 2, 4 of 5

    def outputs(directory) -> set:
        return {n for n in os.listdir(directory) if not n.endswith(".log")}

    assert len(glob.glob(str(tmp_path / "*.log"))) == 1  # rank 0 alone writes
    assert outputs(tmp_path) == outputs(one)
    for name in ["hessian.pickle"] + [f"criteria_m2l{layer}_final.pickle" for layer in range(3)]:
        np.testing.assert_allclose(load_pickle(tmp_path / name), load_pickle(os.path.join(one, name)),
                                   rtol=1e-5, atol=0, err_msg=name)
    # criteria equal up to round-off give the same mask unless two units nearly tie: check that the saved
    # mask is the search's on these criteria, and that it meets the target like the one-process mask
    mask = PruneMask.load(str(tmp_path / "mask.json"))
    assert mask == search_on_pickles(tmp_path)
    assert PruneMask.load(os.path.join(one, "mask.json")) == search_on_pickles(one)
    assert abs(deploy_counts(str(tmp_path))["reduction"] - 0.5) <= 0.005


# -- 4. methods, components, first-order mode ---------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    """A tiny ImageFolder tree: 3 classes, 8 training and 2 validation images each, 32x32 RGB."""
    root = tmp_path_factory.mktemp("imnet")
    rng = np.random.RandomState(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("cat", "dog", "fox"):
            os.makedirs(root / split / c)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def component_runs(tmp_path_factory, image_folder):
    """Methods 1, 3, 4 each pruning one component with interactions on; method 2 first-order on an ImageFolder."""
    cases = {(1, 0): 0.2, (3, 1): 0.3, (4, 2): 0.3}
    jobs = []
    for (method, layers), target in cases.items():
        args = DIGITS + ["--need_hessian", "--pruning_method", str(method), "--pruning_layers", str(layers),
                         "--pruning_flops_percentage", str(target), "--mixup", "0", "--cutmix", "0"]
        jobs.append((f"m{method}l{layers}", target, args))
    first_order = ["--model", MODEL, "--data-set", "IMNET", "--data-path", image_folder, "--input-size", "32",
                   "--batch-size", "8", "--num_workers", "0", "--pruning_feed_percent", "1", "--finetune_op", "2",
                   "--pruning_flops_percentage", "0.4", "--aa", "", "--reprob", "0"]
    jobs.append(("first_order", 0.4, first_order))
    dirs = {name: str(tmp_path_factory.mktemp(name)) for name, _, _ in jobs}
    # in this process: what they test is the method, not the process (the command line is the runs above)
    return {name: (dirs[name], target, ok(run_in_process(args, dirs[name]))) for name, target, args in jobs}


@pytest.mark.e2e
@pytest.mark.parametrize("method,layers", [(1, 0), (3, 1), (4, 2)])
def test_single_component_prunes_only_it(component_runs, method, layers):
    out, target, proc = component_runs[f"m{method}l{layers}"]
    for layer in range(3):
        assert os.path.isfile(os.path.join(out, f"criteria_m{method}l{layer}_final.pickle"))
    mask = PruneMask.load(os.path.join(out, "mask.json"))
    kept, total = mask.kept_counts(), mask.total_counts()
    component = ("heads", "mlp", "embed")[layers]
    for c in kept:
        if c == component:
            assert kept[c] < total[c]
        else:
            assert kept[c] == total[c], c
    counts = deploy_counts(out)
    assert abs(counts["reduction"] - target) <= 0.005
    assert printed_reduction(proc.stdout) == pytest.approx(counts["reduction"], abs=1e-6)


@pytest.mark.e2e
def test_first_order_mode_on_image_folder(component_runs):
    out, target, proc = component_runs["first_order"]
    assert not os.path.exists(os.path.join(out, "hessian.pickle"))
    assert "interactions off" in proc.stdout
    ckpt = torch.load(os.path.join(out, CHECKPOINT), map_location="cpu")
    assert ckpt["model"]["head.weight"].shape[0] == 3  # classes counted from train/
    counts = deploy_counts(out, arch_of(MODEL, num_classes=3, img_size=32))
    assert abs(counts["reduction"] - target) <= 0.005


# -- 5. evaluation: mask-aware gated model == deploy model --------------------------------------

def _scores(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> List[float]:
    """Top-1 %, top-5 % and mean cross-entropy, computed here."""
    with torch.no_grad():
        logits = model.eval()(images)
    top5 = logits.topk(5, -1).indices
    return [100.0 * (top5[:, 0] == labels).double().mean().item(),
            100.0 * (top5 == labels[:, None]).any(-1).double().mean().item(),
            torch.nn.functional.cross_entropy(logits.double(), labels).item()]


@pytest.mark.e2e
def test_eval_mask_aware_gated_equals_deploy(runs):
    src, _ = runs["savit"]
    _, proc = runs["eval"]
    line = re.search(r"accuracy of the gated model \(mask-aware LayerNorm\) on 297 images: "
                     r"top-1 ([\d.]+)%  top-5 ([\d.]+)%  loss ([\d.]+)", proc.stdout)
    printed = [float(v) for v in line.groups()]
    # independent: the validation digits by hand through the deploy model built from the checkpoint
    images, labels = digits_tensors("val")
    ckpt = os.path.join(src, CHECKPOINT)
    deploy = load_pruned(ckpt, ARCH)
    with torch.no_grad():
        logits = deploy.eval()(images)
    # batches of 16 round off otherwise than one batch: top-1/top-5 up to near-ties, loss to its 4 decimals
    assert_accuracy(printed[0], logits, labels, k=1, slack=0.006)
    assert_accuracy(printed[1], logits, labels, k=5, slack=0.006)
    assert printed[2] == pytest.approx(_scores(deploy, images, labels)[2], abs=6e-4)
    # the reference LayerNorm (statistics over all D channels) is another network exactly when channels are pruned
    reference = GatedViT(ARCH)
    reference.load_state_dict(torch.load(ckpt, map_location="cpu")["model"])
    with torch.no_grad():
        differs = (reference.eval()(images) - logits).abs().max().item() > 1e-3
    assert differs == (len(PruneMask.load(ckpt).embed) < ARCH.embed_dim)


# -- 6. bad input -------------------------------------------------------------------------------

def _bad_cases(root, pretrained: str) -> Dict[str, tuple]:
    """name -> (arguments, words the error line must contain)."""
    root.mkdir()
    nan_sd = torch.load(pretrained, map_location="cpu")["model"]
    nan_sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save({"model": nan_sd}, root / "nan.pth")
    torch.save(create_model("deit_demo_patch8_32", num_classes=10, img_size=32).state_dict(), root / "other_size.pth")
    torch.save({"conv1.weight": torch.randn(8, 3, 3, 3), "bn1.weight": torch.ones(8), "fc.weight": torch.randn(10, 8),
                "fc.bias": torch.zeros(10)}, root / "resnet.pth")
    (root / "no_pickles").mkdir()
    other = root / "other_pickles"  # pickles of deit_demo_patch8_32 (embed 96, depth 6, 6 heads)
    other.mkdir()
    for layer, shape in enumerate([(6, 6), (6, 384), (96,)]):
        with open(other / f"criteria_m2l{layer}_final.pickle", "wb") as f:
            pickle.dump(np.ones(shape), f)
    with open(other / "hessian.pickle", "wb") as f:
        pickle.dump(np.eye(3), f)
    empty = root / "empty_train"  # IMNET with an empty train/
    (empty / "train").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    no_images = root / "no_images"
    (no_images / "train" / "cat").mkdir(parents=True)
    (no_images / "val" / "cat").mkdir(parents=True)
    imnet = ["--data-set", "IMNET", "--data-path"]
    missing_data = imnet + [str(root / "nowhere")]  # a data error would come second: the flag must be checked first
    return {
        "target_one": (SAVIT + ["--pruning_flops_percentage", "1.0"] + missing_data, ["--pruning_flops_percentage"]),
        "target_zero": (SAVIT + ["--pruning_flops_percentage", "0"] + missing_data, ["--pruning_flops_percentage"]),
        "target_negative": (SAVIT + ["--pruning_flops_percentage=-0.2"] + missing_data,
                            ["--pruning_flops_percentage"]),
        "unreachable": (SAVIT + ["--pruning_layers", "0", "--pruning_flops_percentage", "0.9"] + missing_data,
                        ["--pruning_flops_percentage", "--pruning_layers 0", "unreachable"]),
        "finetune_missing": (SAVIT + ["--finetune", str(root / "missing.pth")], ["--finetune", "missing.pth"]),
        "finetune_resnet": (SAVIT + ["--finetune", str(root / "resnet.pth")], ["--finetune", "resnet.pth"]),
        "finetune_other_size": (SAVIT + ["--finetune", str(root / "other_size.pth")],
                                ["--finetune", "other_size.pth"]),
        "pickles_missing": (SAVIT + ["--pruning_pickle_from", str(root / "no_pickles")],
                            ["--pruning_pickle_from", "criteria_m2l0_final.pickle"]),
        "pickles_other_model": (SAVIT + ["--pruning_pickle_from", str(other)],
                                ["--pruning_pickle_from", "criteria_m2l0_final.pickle"]),
        "imnet_empty_train": (SAVIT + imnet + [str(empty)], ["--data-path", "train"]),
        "imnet_no_images": (SAVIT + imnet + [str(no_images)], ["--data-path", "train"]),
        "imnet_missing": (SAVIT + missing_data, ["--data-path", "nowhere"]),
        "nonfinite_loss": (SAVIT + ["--finetune", str(root / "nan.pth")], ["non-finite", "batch 0"]),
        "deploy_model": (SAVIT + ["--model", MODEL + "_deploy"], ["--model", MODEL + "_deploy"]),
        "unknown_model": (SAVIT + ["--model", "deit_x_deploy"], ["--model", "deit_x_deploy"]),
        "resume": (SAVIT + ["--resume", str(root / "resnet.pth")], ["--resume", "main_deploy.py"]),
        "mask_aware_while_pruning": (SAVIT + ["--mask_aware_norm"], ["--mask_aware_norm", "--eval"]),
    }


# this one also runs as a real subprocess (an error in the middle of the pass, with the log open): what the
# command line adds (exit status, stderr, no traceback) does not depend on the error. Every case, this one
# too, calls main.main in this process (the same code path, wrapped by cli_entry).
BAD_SUBPROCESS = ("nonfinite_loss",)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, pretrained):
    """name -> (arguments, words of the error line, output folder: not created beforehand)."""
    base = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(base / "inputs", pretrained)
    return {name: (argv, words, base / "out" / name) for name, (argv, words) in cases.items()}


BAD_CASES = ["target_one", "target_zero", "target_negative", "unreachable", "finetune_missing", "finetune_resnet",
             "finetune_other_size", "pickles_missing", "pickles_other_model", "imnet_empty_train", "imnet_no_images",
             "imnet_missing", "nonfinite_loss", "deploy_model", "unknown_model", "resume",
             "mask_aware_while_pruning"]


def _check_bad_run(proc: subprocess.CompletedProcess, name: str, words: List[str], out) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    written = sorted(os.listdir(out)) if out.exists() else []
    if name == "nonfinite_loss":  # stops during the pass: only the log, which records the error
        assert len(written) == 1 and written[0].endswith(".log"), written
        assert "non-finite loss" in open(out / written[0]).read()
    else:  # checked before anything is written
        assert written == []


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_one_line_exit_2_nothing_written(bad_inputs, name):
    argv, words, out = bad_inputs[name]
    _check_bad_run(run_in_process(argv, out), name, words, out)


@pytest.mark.e2e
@pytest.mark.parametrize("name", BAD_SUBPROCESS)
def test_bad_input_on_the_command_line_one_line_exit_2_nothing_written(bad_inputs, name, tmp_path):
    argv, words, _ = bad_inputs[name]
    out = tmp_path / "out"  # not the in-process case's folder
    _check_bad_run(run_main(argv, out), name, words, out)


def test_bad_cases_all_listed(bad_inputs):
    assert sorted(bad_inputs) == sorted(BAD_CASES) and set(BAD_SUBPROCESS) <= set(BAD_CASES)


def test_atomic_save_never_leaves_half_written_file(tmp_path):
    """A save that fails midway (an unpicklable entry after a large tensor) keeps the old file, no temp files."""
    path = str(tmp_path / CHECKPOINT)
    atomic_torch_save({"model": {"w": torch.ones(3)}}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"model": {"w": torch.zeros(1 << 16)}, "bad": lambda: None}, path)
    assert os.listdir(tmp_path) == [CHECKPOINT]
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(3))
