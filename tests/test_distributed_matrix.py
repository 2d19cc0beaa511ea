"""The distributed paths under `torchrun --nproc_per_node 2 --standalone` (gloo, CPU): a pairwise
matrix of fine-tuning runs of main_deploy.py and the pruning pass of main.py.

Axes of the fine-tuning matrix (`COMBOS`; every value appears, most pairs do): student (plain
DeiT, distilled DeiT, two non-DeiT families: DeiT III and registers + average pooling), pruned
(`--masked_model` of a mask that empties whole branches) or unpruned, distillation none / soft /
hard, EMA on / off, `--dist-eval` on / off, mixup + cutmix on / off, repeated augmentation on / off.
Each run is two short epochs on an ImageFolder tree of DIGITS images (300 training images: 4 steps
of 2 x 32 an epoch; 99 validation images, an odd count) and is checked against independent
computations:

* both ranks hold bit-identical weights (and EMA) after each epoch (a spy saves each rank's);
* `log.txt`'s test_acc1 (and test_ema_acc1) is the single-process accuracy of those weights on
  the 99 validation images (up to near-ties), and every logged evaluation counts 99 images,
  with or without `--dist-eval` (not world size x 99);
* `--auto_resume` in a second launch from the folder as it was right after epoch 0 gives the
  same final checkpoint (weights, EMA, optimiser, scheduler) and the same log.txt as the run
  without the stop; for the distilled student the first launch really ends right after epoch
  0's checkpoint.pth is written (both ranks `os._exit(0)`).

main.py's scoring under torchrun (with `--need_hessian`, without, and with
`--pruning_micro_batch`) gives the criteria and C of the one-process run, up to summation order.

Cost: a torchrun launch spends ~10-25 s importing (torch, timm, torchvision) per process on this
2-core machine, so the runs share launches: one wrapper (`WRAPPER`) joins the process group
once and calls `main_deploy.main` / `main.main` for job after job (their `init_distributed`
returns the joined group; everything else, DDP, samplers, EMA, checkpoints, runs per job as in
a launch of its own). Launch A: every full run, the scoring jobs and the distilled student's
stopped run; launch B: the resumed runs and two `--eval` runs.
"""
import json
import os
import pickle
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main as prune_main
import main_deploy
from args import data_config
from conftest import assert_accuracy, assert_same, mask_case, randomize_
from datasets import DigitsDataset, build_dataset
from models import DeployViT, arch_of, create_model, load_pruned
from models.mask import PruneMask

pytestmark = pytest.mark.e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
TRAIN_IMAGES, VAL_IMAGES = 300, 99  # the first DIGITS images of each split, as an ImageFolder tree
TEACHER = "deit_test_patch8_32_deploy"
DATA = ["--data-set", "DIGITS", "--input-size", "32", "--device", "cpu"]
FINETUNE = ["--batch-size", "32", "--num_workers", "0", "--epochs", "2", "--warmup-epochs", "0",
            "--cooldown-epochs", "0", "--aa", "", "--reprob", "0", "--log_period", "100", "--seed", "0"]
HAS_EMA_EVAL = "--model-ema-eval" in main_deploy.get_args_parser()._option_string_actions

# name -> (student (gated name), pruned, distillation, EMA, dist-eval, mixup, repeated augmentation)
COMBOS = {
    "distilled_pruned_none": ("deit_test_distilled_patch8_32", True, "none", True, False, True, True),
    "distilled_soft": ("deit_test_distilled_patch8_32", False, "soft", False, True, False, False),
    "plain_pruned_hard": ("deit_test_patch8_32", True, "hard", False, False, False, True),
    "plain_none": ("deit_test_patch8_32", False, "none", True, True, True, False),
    "registers_pruned_soft": ("vit_test_reg4_gap_patch8_32", True, "soft", True, False, True, False),
    "deit3_hard": ("deit3_test_patch8_32", False, "hard", True, True, False, True),
}
STOPPED = "distilled_pruned_none"  # resumed after a launch that really ended after epoch 0

# main.py scoring: name -> (extra flags, the one-process reference it must equal)
PRUNE_BASE = ["--model", "deit_test_patch8_32", *DATA, "--batch-size", "16", "--num_workers", "0",
              "--pruning_feed_percent", "0.06", "--log_period", "1", "--finetune_op", "2",
              "--pruning_flops_percentage", "0.5", "--seed", "3"]  # 5 batches: 3 on rank 0, 2 on rank 1
SCORING = {
    "hessian": (["--need_hessian"], "hessian"),
    "first_order": ([], "first_order"),
    "hessian_micro_batch": (["--need_hessian", "--pruning_micro_batch", "6"], "hessian"),  # chunks 6, 6, 4
}

WRAPPER = r'''
"""Every rank: join the process group once, then run the jobs of the plan one after another."""
import json, os, shutil, sys, time
sys.path.insert(0, {repo!r})
import torch
import torch.distributed as dist
import engine.training
import main as prune_main
import main_deploy
from utils import barrier, cleanup_distributed
from utils.distributed import init_distributed_mode

with open(sys.argv[1]) as f:
    plan = json.load(f)
group = init_distributed_mode("cpu")
rank = group.rank
for module in (main_deploy, prune_main):
    module.init_distributed = lambda ns: group  # the group joined above
    module.cleanup_distributed = barrier  # left at the very end
JOB, SEEN = {{}}, {{}}

real_evaluate = engine.training.evaluate


def spy_evaluate(loader, model, device, *args, header="Test:", **kwargs):
    stats = real_evaluate(loader, model, device, *args, header=header, **kwargs)
    net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    kind = "ema" if "EMA" in header else "model"
    SEEN[kind] = {{k: v.detach().clone() for k, v in net.state_dict().items()}}
    SEEN[kind + "_stats"] = stats
    return stats


EMA_NAME = next(n for n in ("ModelEmaV2", "ModelEmaV3", "ModelEma") if hasattr(engine.training, n))
RealEma = getattr(engine.training, EMA_NAME)


class SpyEma(RealEma):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        SEEN["ema_object"] = self


real_append = engine.training.append_json_line


def hooked_append(path, line):
    real_append(path, line)  # rank 0 writes log.txt; fit calls this on every rank after the epoch's checkpoint
    epoch = line["epoch"]
    if JOB.get("spy"):
        ema = SEEN.get("ema_object")
        torch.save({{"model": SEEN.get("model"), "stats": SEEN.get("model_stats"), "ema_stats": SEEN.get("ema_stats"),
                    "ema": None if ema is None else ema.module.state_dict()}},
                   os.path.join(JOB["spy"], f"e{{epoch}}_rank{{rank}}.pth"))
    if JOB.get("snapshot") and epoch == 0 and rank == 0:  # the folder as a run stopped here would leave it
        shutil.copytree(os.path.dirname(path), JOB["snapshot"])
    if JOB.get("exit_after_epoch") == epoch:  # the process ends right after the checkpoint is written
        barrier()
        sys.stdout.flush()
        os._exit(0)


engine.training.evaluate = spy_evaluate
setattr(engine.training, EMA_NAME, SpyEma)
engine.training.append_json_line = hooked_append
for job in plan:
    JOB.clear(); JOB.update(job); SEEN.clear()
    if job.get("spy"):
        os.makedirs(job["spy"], exist_ok=True)
    print(f"@@job {{job['name']}}", flush=True)
    start = time.time()
    script = main_deploy if job["script"] == "deploy" else prune_main
    script.main(script.get_args_parser().parse_args(job["argv"]))
    barrier()
    print(f"@@done {{job['name']}} {{time.time() - start:.1f}}", flush=True)
cleanup_distributed()
'''


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(work, name: str, plan: list) -> subprocess.Popen:
    wrapper, plan_path = work / "wrapper.py", work / f"plan_{name}.json"
    wrapper.write_text(WRAPPER.format(repo=REPO))
    plan_path.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(wrapper),
           str(plan_path)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> dict:
    """Wait for a launch; its output, and each job's text and seconds."""
    start = time.time()
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    jobs = {}
    for chunk in out.split("@@job ")[1:]:
        name, _, text = chunk.partition("\n")
        done = re.search(rf"@@done {re.escape(name)} ([\d.]+)", text)
        jobs[name] = {"text": text, "seconds": float(done.group(1)) if done else None}
    return {"output": out, "jobs": jobs, "wait": time.time() - start}


def _load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_log(out) -> list:
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def _text_logs(out) -> str:
    names = sorted(n for n in os.listdir(out) if re.fullmatch(r"\d{8}_\d{6}\.log", n))
    assert names, os.listdir(out)
    return "".join(open(os.path.join(out, n)).read() for n in names)


# ---------------------------------------------------------------------------
# Inputs: a tiny teacher, gated checkpoints of emptying masks, a DeiT checkpoint to score
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed_matrix")


@pytest.fixture(scope="module")
def inputs(work) -> dict:
    torch.manual_seed(0)
    paths = {"teacher": str(work / "teacher.pth"), "pretrained": str(work / "deit_test.pth"),
             "images": str(work / "digits")}
    for split, train, n in (("train", True, TRAIN_IMAGES), ("val", False, VAL_IMAGES)):
        digits = DigitsDataset(train, 32)
        for i in range(n):
            image, label = digits[i]
            os.makedirs(os.path.join(paths["images"], split, str(label)), exist_ok=True)
            image.save(os.path.join(paths["images"], split, str(label), f"{i}.png"))
    torch.save(create_model(TEACHER, num_classes=NUM_CLASSES).state_dict(), paths["teacher"])
    plain = create_model("deit_test_patch8_32", num_classes=NUM_CLASSES, img_size=32).state_dict()
    torch.save({"model": {k: v for k, v in plain.items() if "gate" not in k}}, paths["pretrained"])
    for name in {student for student, pruned, *_ in COMBOS.values() if pruned}:
        # as main.py writes it: gated weights, the mask (whole branches emptied, channels pruned), the arch
        arch = arch_of(name, img_size=32, num_classes=NUM_CLASSES)
        mask = mask_case(arch, "emptied", embed=True)
        mask.model = name
        model = randomize_(create_model(name, num_classes=NUM_CLASSES, img_size=32), seed=5, scale=0.2)
        mask.apply_to(model)
        paths[name] = str(work / f"{name}_pruned.pth")
        torch.save({"model": model.state_dict(), "mask": mask.to_dict(), "arch": arch.to_dict(),
                    "args": {"model": name}, "format_version": 1}, paths[name])
    return paths


def _folder(inputs: dict) -> list:
    """The data flags of the ImageFolder tree of DIGITS images."""
    return ["--data-set", "IMNET", "--data-path", inputs["images"], "--input-size", "32", "--device", "cpu"]


def _flags(combo: str, inputs: dict, out) -> list:
    student, pruned, distillation, ema, dist_eval, mixup, repeated = COMBOS[combo]
    argv = ["--model", student + "_deploy", *_folder(inputs), *FINETUNE, "--output_dir", str(out)]
    if pruned:
        argv += ["--masked_model", inputs[student]]
    if distillation != "none":
        argv += ["--distillation-type", distillation, "--teacher-model", TEACHER, "--teacher-path", inputs["teacher"],
                 "--distillation-tau", "2"]
    if ema:  # an EMA that moves (and is evaluated, where the flag exists)
        argv += ["--model-ema-decay", "0.9"] + (["--model-ema-eval"] if HAS_EMA_EVAL else [])
    else:
        argv += ["--no-model-ema"]
    argv += ["--dist-eval"] if dist_eval else []
    argv += [] if mixup else ["--mixup", "0", "--cutmix", "0"]
    argv += ["--repeated-aug" if repeated else "--no-repeated-aug"]
    return argv


def _one_process_scoring(work, inputs) -> dict:
    """The references of the scoring jobs: main.py in this process (no launcher)."""
    dirs = {}
    for ref, extra in (("hessian", ["--need_hessian"]), ("first_order", [])):
        dirs[ref] = str(work / f"score1_{ref}")
        prune_main.main(prune_main.get_args_parser().parse_args(
            PRUNE_BASE + extra + ["--finetune", inputs["pretrained"], "--output_dir", dirs[ref]]))
    return dirs


@pytest.fixture(scope="module")
def launch_a(work, inputs) -> dict:
    """Every full run (with its spy and its epoch-0 snapshot), the scoring jobs, then the stopped run."""
    plan = []
    for combo in COMBOS:
        plan.append({"name": combo, "script": "deploy", "argv": _flags(combo, inputs, work / combo),
                     "spy": str(work / f"{combo}_spy"),
                     "snapshot": None if combo == STOPPED else str(work / f"{combo}_resumed")})
    for name, (extra, _) in SCORING.items():
        plan.append({"name": "score_" + name, "script": "prune",
                     "argv": PRUNE_BASE + extra + ["--finetune", inputs["pretrained"],
                                                   "--output_dir", str(work / f"score2_{name}")]})
    plan.append({"name": STOPPED + "_stopped", "script": "deploy",
                 "argv": _flags(STOPPED, inputs, work / f"{STOPPED}_resumed"), "exit_after_epoch": 0})
    start = time.time()
    proc = _start(work, "a", plan)
    try:
        references = _one_process_scoring(work, inputs)  # meanwhile, in this process
    except BaseException:
        proc.kill()
        raise
    result = _finish(proc)
    result["references"] = references
    result["seconds"] = time.time() - start
    return result


@pytest.fixture(scope="module")
def launch_b(work, inputs, launch_a) -> dict:
    """A second launch: every run resumed (--auto_resume) from its folder as it was after epoch 0, and
    --eval of a pruned checkpoint with and without --dist-eval."""
    plan = [{"name": combo + "_resumed", "script": "deploy",
             "argv": _flags(combo, inputs, work / f"{combo}_resumed") + ["--auto_resume"]} for combo in COMBOS]
    for dist_eval in (False, True):
        plan.append({"name": f"eval_dist{int(dist_eval)}", "script": "deploy",
                     "argv": ["--model", "deit_test_distilled_patch8_32_deploy", *_folder(inputs),
                              "--batch-size", "32", "--num_workers", "0", "--eval", "--output_dir", "",
                              "--masked_model", inputs["deit_test_distilled_patch8_32"]]
                     + (["--dist-eval"] if dist_eval else [])})
    start = time.time()
    result = _finish(_start(work, "b", plan))
    result["seconds"] = time.time() - start
    return result


@pytest.fixture(scope="module")
def val_set(inputs):
    """The validation images with main_deploy.py's evaluation transform, as one tensor."""
    ns = data_config(main_deploy.get_args_parser().parse_args(_folder(inputs)))
    ds, _ = build_dataset(False, ns)
    assert len(ds) == VAL_IMAGES
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


def _logits(student: str, mask: PruneMask, state: dict, x: torch.Tensor) -> torch.Tensor:
    """The single-process logits of `state` (eval mode: a distilled student averages its two heads)."""
    net = DeployViT(arch_of(student, img_size=32, num_classes=NUM_CLASSES), **mask.structure())
    net.load_state_dict(state)
    with torch.no_grad():
        return net.eval()(x)


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

def test_matrix_covers_every_axis_value():
    axes = list(zip(*COMBOS.values()))
    students, pruned, distillation, ema, dist_eval, mixup, repeated = axes
    assert {"deit_test_patch8_32", "deit_test_distilled_patch8_32"} < set(students)
    assert set(students) - {"deit_test_patch8_32", "deit_test_distilled_patch8_32"}  # a non-DeiT family
    assert set(distillation) == {"none", "soft", "hard"}
    for values in (pruned, ema, dist_eval, mixup, repeated):
        assert set(values) == {True, False}
    # pairwise where it matters most: EMA x dist-eval, mixup x repeated augmentation
    assert set(zip(ema, dist_eval)) == set(zip(mixup, repeated)) == {(a, b) for a in (0, 1) for b in (0, 1)}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_two_ranks_agree_and_log_the_single_process_accuracy(combo, work, launch_a, val_set):
    student, pruned, distillation, ema, dist_eval, mixup, repeated = COMBOS[combo]
    out, spy = work / combo, work / f"{combo}_spy"
    text = launch_a["jobs"][combo]["text"]
    assert " rank1]" not in text  # rank 1 logs warnings only
    if student == "deit_test_distilled_patch8_32" and distillation == "none":
        assert "both heads of the distilled student learn the labels" in text
    assert "total batch of 64" in text
    checkpoint = _load(out / "checkpoint.pth")
    mask = PruneMask.from_dict(checkpoint["mask"])
    assert (mask.kept_counts() != mask.total_counts()) == pruned
    if pruned:
        assert 0 in mask.structure()["heads"] and 0 in mask.structure()["hidden"]
    records = _read_log(out)
    assert [r["epoch"] for r in records] == [0, 1]
    x, y = val_set
    for epoch, record in enumerate(records):
        rank0, rank1 = _load(spy / f"e{epoch}_rank0.pth"), _load(spy / f"e{epoch}_rank1.pth")
        assert_same(rank0["model"], rank1["model"], f"epoch {epoch} model")
        assert rank0["stats"] == rank1["stats"]
        assert record["test_acc1"] == rank0["stats"]["acc1"]
        assert_accuracy(record["test_acc1"], _logits(student, mask, rank0["model"], x), y)
        assert_accuracy(record["test_acc5"], _logits(student, mask, rank0["model"], x), y, k=5)
        if ema:
            assert_same(rank0["ema"], rank1["ema"], f"epoch {epoch} EMA")
            if HAS_EMA_EVAL:
                assert rank0["ema_stats"] == rank1["ema_stats"]
                assert_accuracy(record["test_ema_acc1"], _logits(student, mask, rank0["ema"], x), y)
        else:
            assert rank0["ema"] is None and rank1["ema"] is None
    assert_same(checkpoint["model"], rank0["model"], "checkpoint")
    if ema:
        assert_same(checkpoint["model_ema"], rank0["ema"], "checkpoint EMA")
        assert any(not torch.equal(checkpoint["model"][k], checkpoint["model_ema"][k]) for k in checkpoint["model"])
    else:
        assert checkpoint["model_ema"] is None
    # every evaluation counts the validation images once, sharded (--dist-eval) or not
    counts = re.findall(r"\* Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+ \((\d+) images\)", _text_logs(out))
    assert counts == [str(VAL_IMAGES)] * (2 * (2 if ema and HAS_EMA_EVAL else 1)), counts


@pytest.mark.parametrize("combo", list(COMBOS))
def test_auto_resume_after_epoch_0_ends_like_the_uninterrupted_run(combo, work, launch_a, launch_b):
    full, resumed = work / combo, work / f"{combo}_resumed"
    text = launch_b["jobs"][combo + "_resumed"]["text"]
    assert "--auto_resume: resuming from" in text and "next epoch 1" in text, text[-3000:]
    if combo == STOPPED:  # the first launch ended right after epoch 0's checkpoint: no line of epoch 1
        stopped = launch_a["jobs"][STOPPED + "_stopped"]["text"]
        assert "epoch 0: top-1" in stopped and "Epoch: [1]" not in stopped
    a, b = _load(full / "checkpoint.pth"), _load(resumed / "checkpoint.pth")
    assert a["epoch"] == 1
    for key in ("model", "model_ema", "optimizer", "lr_scheduler", "scaler", "epoch", "max_accuracy", "mask"):
        assert_same(a[key], b[key], key)
    with open(full / "log.txt") as fa, open(resumed / "log.txt") as fb:
        assert fa.read() == fb.read()  # same losses, learning rates and accuracies, epoch by epoch


@pytest.mark.parametrize("dist_eval", [False, True])
def test_eval_under_torchrun_counts_each_image_once(dist_eval, inputs, launch_b, val_set):
    text = launch_b["jobs"][f"eval_dist{int(dist_eval)}"]["text"]
    (count,) = re.findall(r"\((\d+) images\)", text)
    assert count == str(VAL_IMAGES)
    top1 = float(re.search(rf"accuracy of the deploy model on {VAL_IMAGES} images: top-1 ([\d.]+)%", text).group(1))
    arch = arch_of("deit_test_distilled_patch8_32", img_size=32, num_classes=NUM_CLASSES)
    x, y = val_set
    with torch.no_grad():
        logits = load_pruned(inputs["deit_test_distilled_patch8_32"], arch)(x)
    assert_accuracy(top1, logits, y, slack=0.005)


@pytest.mark.parametrize("name", list(SCORING))
def test_scoring_two_processes_equals_one_process(name, work, launch_a):
    _, reference = SCORING[name]
    text = launch_a["jobs"]["score_" + name]["text"]
    assert "3 on this process" in text  # rank 0 scores global batches 0, 2, 4 of 5
    one, two = launch_a["references"][reference], str(work / f"score2_{name}")
    files = [f"criteria_m2l{layer}_final.pickle" for layer in range(3)]
    if "--need_hessian" in SCORING[name][0]:
        files.append("hessian.pickle")
    else:
        assert not os.path.exists(os.path.join(two, "hessian.pickle"))
    for file in files:
        a, b = (np.asarray(_load_pickle(os.path.join(d, file))) for d in (two, one))
        # the same sums in another order: equal up to round-off of the largest terms
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * np.abs(b).max(), err_msg=f"{name} {file}")


def _load_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def test_report_times(launch_a, launch_b, capsys):
    """The seconds of each job (in the launch's processes) and of each launch, for the record."""
    with capsys.disabled():
        for launch, result in (("A", launch_a), ("B", launch_b)):
            jobs = ", ".join(f"{n} {'stopped' if j['seconds'] is None else str(j['seconds']) + 's'}"
                             for n, j in result["jobs"].items())
            print(f"\nlaunch {launch}: {result['seconds']:.1f}s in all; {jobs}")
