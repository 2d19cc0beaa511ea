"""End-to-end tests of main_deploy.py: the smaller DeiT built from a mask, fine-tuned,
distilled, distributed, resumed, evaluated and timed, on tiny DeiTs and DIGITS on the CPU.

Module fixtures: a gated checkpoint with an explicit mask (pruned heads, neurons and channels
chosen here) and seeded weights; a tiny teacher trained here in-process, and masks made by
main.py (called in-process) from it and from a distilled gated model. Which units such a
data-driven run prunes depends on the CPU's round-off, so only the explicit mask's units
are asserted. Runs that need their own processes (torchrun / torch.distributed.launch, a
run killed mid-epoch) are subprocesses with one thread each, marked `e2e` like the other
training runs; the rest call `main_deploy.main` in-process, which goes through the same
`cli_entry` (UserError -> one `error:` line on stderr, exit 2) as the command line.
Every result is checked against an independent computation: accuracies recomputed from
the saved weights (up to near-ties, which round-off may flip), parameter counts by summing
tensors, GMACs from the analytic count, resumed weights against an uninterrupted run.
"""
import hashlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import main as prune_main
import main_deploy
from args import DistributedConfig, data_config
from conftest import assert_accuracy, assert_same, images, randomize_
from datasets import DigitsDataset, build_transform
from models import DeployViT, arch_of, create_model, load_pruned
from pruning.flops import mask_macs, mask_params
from models.mask import PruneMask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu"]
MODEL = "deit_test_patch8_32_deploy"
NUM_CLASSES = 10


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest on a busy machine
    return env


def _run(argv, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _deploy(argv) -> None:
    """main_deploy.py's entry point in this process."""
    main_deploy.main(main_deploy.get_args_parser().parse_args(argv))


def _read_log(out) -> list:
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def _text_log(out) -> str:
    logs = [n for n in os.listdir(out) if re.fullmatch(r"\d{8}_\d{6}\.log", n)]
    assert len(logs) == 1, logs
    with open(os.path.join(out, logs[0])) as f:
        return f.read()


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _deploy_model(checkpoint: dict, model_name: str = MODEL) -> DeployViT:
    """The network a main_deploy.py checkpoint describes, rebuilt from its mask and weights."""
    arch = arch_of(model_name, img_size=32, num_classes=NUM_CLASSES)
    net = DeployViT(arch, **PruneMask.from_dict(checkpoint["mask"]).structure())
    net.load_state_dict(checkpoint["model"])
    return net.eval()


def data_settings(argv):
    return data_config(main_deploy.get_args_parser().parse_args(argv))


# ---------------------------------------------------------------------------
# Fixtures: data, a trained tiny teacher, masks from main.py
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def val_set():
    """DIGITS validation images with main_deploy.py's evaluation transform, as one tensor."""
    ns = data_settings(DATA)
    ds = DigitsDataset(False, 32, build_transform(False, ns))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def teacher(work):
    """A `deit_test_patch8_32_deploy` trained briefly on DIGITS (far above chance), saved as a state dict."""
    ns = data_settings(DATA)
    ds = DigitsDataset(True, 32, build_transform(False, ns))
    x, y = torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)
    torch.manual_seed(0)
    net = create_model(MODEL, num_classes=NUM_CLASSES)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(6):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - 63, 64):
            idx = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = str(work / "teacher.pth")
    torch.save(net.state_dict(), path)
    return path


def _prune(model_name, out, *extra) -> str:
    prune_main.main(prune_main.get_args_parser().parse_args(
        ["--model", model_name, *DATA, "--batch-size", "16", "--num_workers", "0", "--pruning_feed_percent", "0.1",
         "--need_hessian", "--finetune_op", "2", "--pruning_flops_percentage", "0.5", "--output_dir", str(out),
         *extra]))
    return str(out / "checkpoint_pruned_00.pth")


# the explicit mask of deit_test_patch8_32 (embed 64, depth 3, 4 heads, MLP 256): kept units
EXPLICIT = {"heads": [[0, 2], [1, 2, 3], [3]],
            "mlp": [list(range(0, 256, 2)), list(range(64, 256)), list(range(0, 256, 4))],
            "embed": [c for c in range(64) if c % 4 != 1]}


@pytest.fixture(scope="module")
def explicit(work):
    """A gated checkpoint as main.py writes it (see main.write_outputs) of the EXPLICIT mask, with seeded
    weights (logits of a visible size, no training), and its mask.json beside it."""
    folder = work / "explicit"
    folder.mkdir()
    arch = arch_of("deit_test_patch8_32", img_size=32, num_classes=NUM_CLASSES)
    mask = PruneMask(embed_dim=64, depth=3, num_heads=4, head_dim=16, mlp_hidden=256, model="deit_test_patch8_32",
                     **EXPLICIT)
    model = randomize_(create_model("deit_test_patch8_32", num_classes=NUM_CLASSES, img_size=32), seed=5, scale=0.2)
    mask.apply_to(model)
    mask.save_json(str(folder / "mask.json"))
    torch.save({"model": model.state_dict(), "mask": mask.to_dict(), "arch": arch.to_dict(),
                "args": {"model": "deit_test_patch8_32"}, "format_version": 1}, folder / "checkpoint_pruned_00.pth")
    return str(folder / "checkpoint_pruned_00.pth")


@pytest.fixture(scope="module")
def pruned(work, teacher):
    """main.py's gated checkpoint (50% FLOPs) of the trained teacher's weights."""
    return _prune("deit_test_patch8_32", work / "prune", "--finetune", teacher)


@pytest.fixture(scope="module")
def pruned_distilled(work):
    """main.py's gated checkpoint of a (freshly initialised) distilled tiny DeiT."""
    return _prune("deit_test_distilled_patch8_32", work / "prune_distilled")


# ---------------------------------------------------------------------------
# 1. Two processes (gloo) with hard distillation: torchrun and torch.distributed.launch
# ---------------------------------------------------------------------------

SPY_WRAPPER = """
import os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import engine.training
import main_deploy

real_evaluate = engine.training.evaluate


def spy_evaluate(loader, model, device, *args, header="Test:", **kwargs):
    # every rank records the weights it evaluates (the model after each epoch, and its EMA)
    stats = real_evaluate(loader, model, device, *args, header=header, **kwargs)
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    kind = "ema" if "EMA" in header else "model"
    torch.save({{"state": net.state_dict(), "stats": stats}},
               os.path.join({spy!r}, kind + "_rank" + str(dist.get_rank()) + ".pth"))
    return stats


engine.training.evaluate = spy_evaluate  # the training loop, engine.fit, evaluates each epoch
main_deploy.main(main_deploy.get_args_parser().parse_args())
"""


def _finetune_flags(teacher, out, *extra):
    return ["--model", MODEL, *DATA, "--batch-size", "32", "--num_workers", "0", "--epochs", "1",
            "--warmup-epochs", "0", "--teacher-model", MODEL, "--teacher-path", teacher, "--distillation-type", "hard",
            "--dist-eval", "--output_dir", str(out), *extra]


def _check_rank0_outputs(out, teacher, val_set) -> dict:
    """One writer: one text log, one log.txt line, one TensorBoard file, no temporary files."""
    names = sorted(os.listdir(out))
    assert [n for n in names if not n.endswith(".log")] == ["best_checkpoint.pth", "checkpoint.pth", "log.txt",
                                                            "tensorboard"], names
    assert len(os.listdir(out / "tensorboard")) == 1
    text = _text_log(out)
    assert f"distillation: teacher {MODEL} from {teacher}, hard loss" in text
    assert "total batch of 64" in text  # 2 processes x 32
    (record,) = _read_log(out)
    assert record["epoch"] == 0
    checkpoint = _load(out / "checkpoint.pth")
    x, y = val_set
    with torch.no_grad():
        # --dist-eval shards the 297 images without padding: the single-process accuracy (up to near-ties)
        assert_accuracy(record["test_acc1"], _deploy_model(checkpoint)(x), y)
    return checkpoint


@pytest.mark.e2e
def test_torchrun_two_processes_hard_distillation_ranks_agree(work, teacher, val_set):
    out, spy = work / "ddp_torchrun", work / "ddp_spy"
    spy.mkdir()
    wrapper = work / "spy_main_deploy.py"
    wrapper.write_text(SPY_WRAPPER.format(repo=REPO, spy=str(spy)))
    # from scratch (no --masked_model): each rank initialises differently, DDP must make them agree
    proc = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(wrapper),
                 *_finetune_flags(teacher, out, "--model-ema-decay", "0.9", "--model-ema-eval")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " rank1]" not in proc.stdout  # rank 1 logs warnings only
    checkpoint = _check_rank0_outputs(out, teacher, val_set)
    (record,) = _read_log(out)
    for kind, saved in (("model", checkpoint["model"]), ("ema", checkpoint["model_ema"])):
        rank0, rank1 = _load(spy / f"{kind}_rank0.pth"), _load(spy / f"{kind}_rank1.pth")
        assert_same(rank0["state"], saved, kind)
        assert_same(rank1["state"], saved, kind)
        assert rank0["stats"] == rank1["stats"]
        prefix = "test_" if kind == "model" else "test_ema_"
        assert record[prefix + "acc1"] == rank0["stats"]["acc1"]
    # the EMA (decay 0.9) really moved away from the weights
    assert any(not torch.equal(checkpoint["model"][k], checkpoint["model_ema"][k]) for k in checkpoint["model"])


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.launch") is None,
                    reason="torch.distributed.launch is gone from this torch")
def test_torch_distributed_launch_use_env_runs_the_seed_command(work, teacher, pruned, val_set):
    out = work / "ddp_launch"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the seed README's fine-tuning command, with tiny paths
    proc = _run(["-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={port}", "--use_env",
                 "main_deploy.py", *_finetune_flags(teacher, out, "--resume=", f"--masked_model={pruned}",
                                                    "--pruning_flops_percentage=0", "--finetune_op=1",
                                                    "--cooldown-epochs=0")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = _check_rank0_outputs(out, teacher, val_set)
    assert PruneMask.from_dict(checkpoint["mask"]) == PruneMask.from_checkpoint(_load(pruned))


# ---------------------------------------------------------------------------
# 2, 3, 8. Resume after a kill mid-epoch == uninterrupted run; empty --resume; outputs
# ---------------------------------------------------------------------------

def _resume_flags(pruned, out, num_workers, epochs):
    # the full DeiT recipe (RandAugment, mixup/cutmix, random erasing, repeated augmentation, drop path),
    # warm-up then cosine, and an EMA that moves
    return ["--model", MODEL, *DATA, "--batch-size", "32", "--num_workers", str(num_workers),
            "--epochs", str(epochs), "--warmup-epochs", "1", "--model-ema-decay", "0.9", "--masked_model", pruned,
            "--log_period", "1", "--save_freq", "1", "--output_dir", str(out)]


def _run_killed_in_epoch(argv, epoch: int) -> str:
    """Start `main_deploy.py argv` and SIGKILL it (with its loader workers) at its first progress line of `epoch`."""
    proc = subprocess.Popen([sys.executable, "main_deploy.py", *argv], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"Epoch: [{epoch}]" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
        proc.wait(timeout=60)
    return "".join(seen)


@pytest.mark.e2e
@pytest.mark.parametrize("num_workers", [0, 1])
def test_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_run(work, pruned, num_workers, capsys):
    """The killed run is a process of its own; the uninterrupted run (meanwhile) and the resumed one call
    main_deploy.main in this process. Three epochs with --num_workers 0 (their outputs are checked too), two
    with a loader worker (killed in its last epoch: the same resume path, with the worker's seeding)."""
    epochs = 3 if num_workers == 0 else 2
    full, cut = work / f"full_w{num_workers}", work / f"cut_w{num_workers}"
    with ThreadPoolExecutor(1) as pool:
        killed = pool.submit(_run_killed_in_epoch, _resume_flags(pruned, cut, num_workers, epochs), 1)
        # uninterrupted, with the seed scripts' "--resume=" (no checkpoint yet): a fresh run
        _deploy(_resume_flags(pruned, full, num_workers, epochs) + ["--resume="])
        seen = killed.result()
    text = capsys.readouterr().out
    assert f"training for {epochs} epochs (from epoch 0)" in text and "resumed" not in text

    assert "Epoch: [1]" in seen and "Epoch: [1] Total time" not in seen
    assert _load(cut / "checkpoint.pth")["epoch"] == 0 and len(_read_log(cut)) == 1  # killed during epoch 1
    _deploy(_resume_flags(pruned, cut, num_workers, epochs) + ["--resume", str(cut / "checkpoint.pth")])
    assert "next epoch 1" in capsys.readouterr().out

    a, b = _load(full / "checkpoint.pth"), _load(cut / "checkpoint.pth")
    for key in ("model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "max_accuracy", "mask"):
        assert_same(a[key], b[key], key)
    assert a["epoch"] == epochs - 1
    with open(full / "log.txt") as fa, open(cut / "log.txt") as fb:
        assert fa.read() == fb.read()  # same losses, learning rates and accuracies, epoch by epoch
    if num_workers == 0:
        _check_run_outputs(full, a)


def _check_run_outputs(out, last: dict) -> None:
    """log.txt, checkpoints, summary line and TensorBoard scalars of a 3-epoch run with --save_freq 1."""
    records = _read_log(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    net = _deploy_model(last)
    mask = PruneMask.from_dict(last["mask"])
    arch = arch_of(MODEL, img_size=32, num_classes=NUM_CLASSES)
    for r in records:
        assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss", "epoch", "n_parameters",
                "gmacs"} <= set(r)
        assert r["n_parameters"] == sum(p.numel() for p in net.parameters())
        assert r["gmacs"] == pytest.approx(mask_macs(arch, mask)["total"] / 1e9, rel=1e-12)
    assert records[0]["train_lr"] == pytest.approx(1e-6)  # warm-up epoch
    assert records[1]["train_lr"] > records[2]["train_lr"] > 0  # cosine
    names = set(os.listdir(out))
    assert {"checkpoint.pth", "best_checkpoint.pth", "checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_2.pth",
            "log.txt", "tensorboard"} <= names
    assert not [n for n in names if n.startswith(".tmp_")]
    for epoch in range(3):
        assert _load(out / f"checkpoint_{epoch}.pth")["epoch"] == epoch
    accs = [r["test_acc1"] for r in records]
    best = max(accs)
    assert _load(out / "best_checkpoint.pth")["epoch"] == accs.index(best)
    assert last["max_accuracy"] == best
    assert f"done: best top-1 {best:.2f}%" in _text_log(out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test/acc1")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("test/acc1")] == pytest.approx(accs, abs=1e-4)
    assert len(events.Scalars("train/loss")) == 3 * 40  # 1280 of 1500 images per epoch (DeiT's RASampler), 32 a batch


# ---------------------------------------------------------------------------
# 4. Distilled student, soft distillation
# ---------------------------------------------------------------------------

@pytest.mark.e2e
def test_distilled_student_soft_distillation_and_two_head_evaluation(work, teacher, pruned_distilled, val_set,
                                                                      capsys):
    out = work / "distilled"
    name = "deit_test_distilled_patch8_32_deploy"
    _deploy(["--model", name, *DATA, "--batch-size", "32", "--num_workers", "0", "--epochs", "1",
             "--warmup-epochs", "0", "--masked_model", pruned_distilled, "--teacher-model", MODEL,
             "--teacher-path", teacher, "--distillation-type", "soft", "--distillation-tau", "2",
             "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert "soft loss, alpha 0.5, tau 2.0; dist head of the student is distilled" in text
    checkpoint = _load(out / "checkpoint.pth")
    mask = PruneMask.from_dict(checkpoint["mask"])
    assert mask == PruneMask.from_checkpoint(_load(pruned_distilled))
    assert checkpoint["model"]["dist_token"].shape[-1] == len(mask.embed)
    net = _deploy_model(checkpoint, name)
    x, y = val_set
    with torch.no_grad():
        tokens = net.forward_features(x)
        averaged = (net.head(tokens[:, 0]) + net.head_dist(tokens[:, 1])) / 2
    (record,) = _read_log(out)
    assert_accuracy(record["test_acc1"], averaged, y)


# ---------------------------------------------------------------------------
# 5, 6, 7. --eval, mask JSON + --finetune, --throughput
# ---------------------------------------------------------------------------

def _printed_accuracy(text: str, what: str):
    match = re.search(rf"accuracy of the {what}.* top-1 ([\d.]+)%  top-5 ([\d.]+)%", text)
    assert match, text[-2000:]
    (summary,) = re.findall(r"\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) images\)", text)
    return match.groups(), summary


def test_eval_of_deploy_model_equals_gated_model_with_mask_aware_norm(explicit, val_set, capsys):
    flags = [*DATA, "--batch-size", "32", "--num_workers", "0", "--eval", "--output_dir", ""]
    _deploy(["--model", MODEL, "--masked_model", explicit, *flags])
    deploy = _printed_accuracy(capsys.readouterr().out, "deploy model")
    prune_main.main(prune_main.get_args_parser().parse_args(
        ["--model", "deit_test_patch8_32", "--finetune", explicit, "--mask_aware_norm", *flags]))
    gated = _printed_accuracy(capsys.readouterr().out, "gated model \\(mask-aware LayerNorm\\)")
    # independent: the deploy network of the checkpoint on all 297 images in one batch
    x, y = val_set
    arch = arch_of(MODEL, img_size=32, num_classes=NUM_CLASSES)
    with torch.no_grad():
        logits = load_pruned(explicit, arch)(x)
        reference = create_model("deit_test_patch8_32", num_classes=NUM_CLASSES, img_size=32)  # LayerNorm over all D
        reference.load_state_dict(_load(explicit)["model"])
        reference_logits = reference.eval()(x)
    loss = torch.nn.functional.cross_entropy(logits.double(), y).item()
    # deploy == gated: both print the deploy network's results (batches of 32 may flip near-ties only)
    for (top1, top5), (acc1, acc5, printed_loss, count) in (deploy, gated):
        assert count == "297"
        for value, k, slack in ((top1, 1, 0.005), (top5, 5, 0.005), (acc1, 1, 5e-4), (acc5, 5, 5e-4)):
            assert_accuracy(float(value), logits, y, k=k, slack=slack)
        assert float(printed_loss) == pytest.approx(loss, abs=6e-4)
    # the check has teeth: with channels pruned, the reference LayerNorm is another network, of another loss
    reference_loss = torch.nn.functional.cross_entropy(reference_logits.double(), y).item()
    assert abs(reference_loss - loss) > 5e-3


def test_mask_json_plus_finetune_weights_build_the_checkpoint_model(explicit):
    arch = arch_of(MODEL, img_size=32, num_classes=NUM_CLASSES)
    parser = main_deploy.get_args_parser()
    mask_json = os.path.join(os.path.dirname(explicit), "mask.json")
    cpu = DistributedConfig(device="cpu")
    from_ckpt = main_deploy.build_student(
        main_deploy.settings(parser.parse_args(["--model", MODEL, "--masked_model", explicit]), cpu), arch, None)
    from_json = main_deploy.build_student(main_deploy.settings(
        parser.parse_args(["--model", MODEL, "--masked_model", mask_json, "--finetune", explicit]), cpu), arch, None)
    assert from_ckpt[0] == from_json[0] == PruneMask.from_dict(_load(explicit)["mask"])
    assert_same(from_ckpt[1].state_dict(), from_json[1].state_dict())
    # exactly the explicit mask's units, counted on the deploy model's tensors
    net = from_ckpt[1].eval()
    assert net.pos_embed.shape[-1] == len(EXPLICIT["embed"]) == 48
    for block, heads, neurons in zip(net.blocks, EXPLICIT["heads"], EXPLICIT["mlp"]):
        assert block.attn.qkv.weight.shape == (3 * 16 * len(heads), 48)
        assert block.mlp.fc1.weight.shape == (len(neurons), 48)
    assert sum(p.numel() for p in net.parameters()) == mask_params(arch, from_ckpt[0])
    # deploy == gated: the checkpoint's gated model with the mask-aware LayerNorm computes the same logits
    gated = create_model("deit_test_patch8_32", num_classes=NUM_CLASSES, img_size=32, mask_aware_norm=True)
    gated.load_state_dict(_load(explicit)["model"])
    x = images(arch, n=4)
    with torch.no_grad():
        torch.testing.assert_close(net(x), gated.eval()(x), atol=1e-5, rtol=0)


def test_throughput_prints_images_per_second_for_unpruned_and_deploy(explicit, capsys):
    _deploy(["--model", MODEL, *DATA, "--batch-size", "8", "--throughput", "--masked_model", explicit,
             "--output_dir", ""])
    text = capsys.readouterr().out
    arch = arch_of(MODEL, img_size=32, num_classes=NUM_CLASSES)
    expected_ratio = mask_macs(arch)["total"] / mask_macs(arch, PruneMask.load(explicit))["total"]
    for kind in ("inference", "training step"):
        match = re.search(rf"throughput \({kind}, batch 8, cpu\): unpruned ([\d.]+) images/s, deploy ([\d.]+) "
                          rf"images/s; speedup ([\d.]+)x \(FLOPs ratio ([\d.]+)x\)", text)
        assert match, text
        unpruned, deploy, speedup, flops_ratio = map(float, match.groups())
        assert unpruned > 0 and deploy > 0
        # the speedup of the unrounded rates: within what rounding the printed rates to 0.1 allows
        assert (deploy - 0.05) / (unpruned + 0.05) - 0.005 <= speedup <= (deploy + 0.05) / (unpruned - 0.05) + 0.005
        assert flops_ratio == pytest.approx(expected_ratio, abs=0.005 + 1e-9)


def test_throughput_takes_the_class_count_of_the_masked_model(tmp_path, capsys):
    """--throughput reads no data set: a checkpoint trained for 3 classes (the model's default is
    another count) is measured as it is, not refused for a class-count mismatch."""
    arch = arch_of("deit_test_patch8_32", num_classes=3)
    model = create_model("deit_test_patch8_32", num_classes=3)
    mask = PruneMask(embed_dim=64, depth=3, num_heads=4, head_dim=16, mlp_hidden=256, model="deit_test_patch8_32",
                     **EXPLICIT)
    mask.apply_to(model)
    path = tmp_path / "checkpoint_pruned_00.pth"
    torch.save({"model": model.state_dict(), "mask": mask.to_dict(), "arch": arch.to_dict()}, path)
    _deploy(["--model", MODEL, "--input-size", "32", "--batch-size", "4", "--throughput", "--masked_model", str(path),
             "--output_dir", ""])
    assert re.search(r"throughput \(inference, batch 4, cpu\): unpruned [\d.]+ images/s", capsys.readouterr().out)


# ---------------------------------------------------------------------------
# 9. Bad input: exit 2, one error line naming the flag, nothing written
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def previous_run(work):
    """An output folder holding an earlier run's files, and a training checkpoint of the unpruned model."""
    out = work / "previous"
    out.mkdir()
    arch = arch_of(MODEL, img_size=32, num_classes=NUM_CLASSES)
    torch.save({"model": DeployViT(arch).state_dict(), "mask": PruneMask.full(arch).to_dict(), "epoch": 0},
               out / "checkpoint.pth")
    (out / "log.txt").write_text('{"epoch": 0}\n')
    return out


@pytest.fixture(scope="module")
def plain_weights(work):
    """A plain state dict of the deploy model (as timm saves a checkpoint or a teacher)."""
    path = str(work / "plain.pth")
    torch.save(create_model(MODEL, num_classes=NUM_CLASSES).state_dict(), path)
    return path


def _snapshot(folder) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


BAD_INPUTS = {
    "masked_model missing": (["--masked_model", "{work}/nope.pth"], "--masked_model"),
    "masked_model of another model": (["--masked_model", "{explicit}", "--model", "deit_demo_patch8_32_deploy"],
                                      "--masked_model"),
    "mask JSON without weights": (["--masked_model", "{prune_dir}/mask.json"], "--masked_model"),
    "finetune beside a checkpoint": (["--masked_model", "{explicit}", "--finetune", "{weights}"], "--finetune"),
    "distillation without teacher": (["--masked_model", "{explicit}", "--distillation-type", "hard"],
                                     "--teacher-path"),
    "teacher of another model": (["--masked_model", "{explicit}", "--distillation-type", "soft", "--teacher-model",
                                  "deit_demo_patch8_32_deploy", "--teacher-path", "{weights}"], "--teacher-path"),
    "resume of another mask": (["--masked_model", "{explicit}", "--resume", "{out}/checkpoint.pth"], "--resume"),
    "resume of a plain state dict": (["--resume", "{weights}"], "--resume"),
    "not a deploy model": (["--model", "deit_test_patch8_32"], "--model"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, work, explicit, plain_weights, previous_run,
                                                           capsys):
    extra, flag = BAD_INPUTS[case]
    paths = {"work": work, "explicit": explicit, "prune_dir": os.path.dirname(explicit), "weights": plain_weights,
             "out": previous_run}
    extra = [a.format(**paths) for a in extra]
    before = _snapshot(previous_run)
    argv = ["--model", MODEL, *DATA, "--batch-size", "32", "--num_workers", "0", "--epochs", "1",
            "--output_dir", str(previous_run), *extra]
    with pytest.raises(SystemExit) as exit_info:
        _deploy(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], captured.err
    assert _snapshot(previous_run) == before  # nothing overwritten, nothing added


@pytest.mark.e2e
def test_bad_input_on_the_command_line_gives_no_traceback(work, explicit, previous_run):
    before = _snapshot(previous_run)
    proc = _run(["main_deploy.py", "--model", "deit_demo_patch8_32_deploy", *DATA, "--num_workers", "0",
                 "--masked_model", explicit, "--output_dir", str(previous_run)], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --masked_model") and "Traceback" not in proc.stderr
    assert "(64, 3, 4, 16, 256)" in lines[0] and "(96, 6, 6, 16, 384)" in lines[0]  # what it is, what was expected
    assert _snapshot(previous_run) == before
