"""engine/ on a tiny DeiT with DIGITS: the loops, `fit` (DDP at world size 1, EMA, checkpoint, resume),
the lr schedule after warm-up and the EMA horizon note; plus the shared flags and utils' logging
(progress lines on a timer) and distributed helpers."""
import copy
import json
import math
import os
import random
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from timm.scheduler import create_scheduler
from torch.utils.data import Subset

import args as flags
import main_deploy
from conftest import TimedItems, assert_accuracy, assert_same, free_port
from datasets import build_dataset, build_loaders, build_mixup
import engine.training
from engine import NonFiniteLossError, ema_horizon_note, evaluate, fit, make_loss_scaler, train_one_epoch
from losses import DistillationLoss, build_base_criterion
from models import arch_of, build_deploy_model, create_model
from models.mask import PruneMask
from utils import (MetricLogger, SmoothedValue, TensorboardLogger, UserError, all_reduce_sum, append_json_line,
                   cleanup_distributed, init_distributed_mode, setup_logging)

CPU = torch.device("cpu")


def make_args(*argv):
    parser = main_deploy.get_args_parser()  # the parser with every shared flag
    return parser.parse_args(["--device", "cpu", "--num_workers", "0", "--data-set", "DIGITS",
                              "--input-size", "32", "--batch-size", "16", *argv])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not stall on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    ns = make_args()
    train, num_classes = build_dataset(True, flags.data_config(ns))
    val, _ = build_dataset(False, flags.data_config(ns))
    return Subset(train, range(64)), Subset(val, range(40)), num_classes  # 4 training steps of 16


def _setup(digits, model_name="deit_test_patch8_32", *argv):
    ns = make_args(*argv)
    train, val, num_classes = digits
    loader_train, loader_val = build_loaders(flags.data_config(ns), train, val, distributed=False)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, drop_path_rate=ns.drop_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mixup = build_mixup(flags.mixup_config(ns), num_classes)
    criterion = DistillationLoss(build_base_criterion(mixup is not None, ns.smoothing), None, "none", 0.5, 1.0)
    return ns, model, optimizer, mixup, criterion, loader_train, loader_val


def _quiet(_line):
    pass


def test_train_and_evaluate_give_finite_numbers_and_exact_metrics(digits):
    ns, model, optimizer, mixup, criterion, loader_train, loader_val = _setup(digits)
    before = copy.deepcopy(model.state_dict())
    stats = train_one_epoch(model, criterion, loader_train, optimizer, CPU, 0, make_loss_scaler(CPU, True),
                            1.0, None, mixup, amp=True, print_fn=_quiet, seed=0)
    assert len(loader_train) == 4 and set(stats) == {"loss", "lr"}
    assert math.isfinite(stats["loss"]) and stats["lr"] == 1e-3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = evaluate(loader_val, model, CPU, print_fn=_quiet)

    # independent: all 40 validation images in one batch, accuracy and CE by NumPy
    model.eval()
    images = torch.stack([digits[1][i][0] for i in range(40)])
    labels = np.array([digits[1][i][1] for i in range(40)])
    with torch.no_grad():
        logits = model(images).double()
    # batches of 32 + 8 round off otherwise than one batch of 40: only near-ties may flip
    assert_accuracy(result["acc1"], logits, torch.from_numpy(labels), k=1)
    assert_accuracy(result["acc5"], logits, torch.from_numpy(labels), k=5)
    logits = logits.numpy()
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    assert result["loss"] == pytest.approx(-log_p[np.arange(40), labels].mean(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_epoch_with_scaler_and_memory_in_progress(digits):
    ns, model, optimizer, mixup, criterion, loader_train, loader_val = _setup(digits)
    device = torch.device("cuda")
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = make_loss_scaler(device, amp=True)
    assert scaler is not None and make_loss_scaler(device, amp=False) is None
    lines = []
    stats = train_one_epoch(model, criterion, loader_train, optimizer, device, 0, scaler, 1.0, None, mixup,
                            amp=True, print_fn=lines.append, print_freq=1, seed=0)
    assert math.isfinite(stats["loss"]) and "max mem" in lines[0]
    result = evaluate(loader_val, model, device, amp=True, print_fn=_quiet)
    reference = evaluate(loader_val, model.cpu(), CPU, print_fn=_quiet)
    assert abs(result["acc1"] - reference["acc1"]) <= 2 * 100 / 40 + 1e-9  # fp16 may flip a near-tie or two


def _train_two_epochs(digits, interrupt: bool, seed):
    """Epochs 0 and 1; with `interrupt`, epoch 1 runs on fresh objects restored from saved state."""
    from timm.utils import ModelEmaV3

    ns, model, optimizer, mixup, criterion, loader_train, _ = _setup(digits, "deit_test_patch8_32",
                                                                    "--drop-path", "0.1")
    ema = ModelEmaV3(model, decay=0.9)
    for epoch in (0, 1):
        if epoch == 1 and interrupt:
            saved = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict(),
                                   "ema": ema.state_dict()})
            torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)  # unrelated RNG history
            ns, model, optimizer, mixup, criterion, loader_train, _ = _setup(digits, "deit_test_patch8_32",
                                                                            "--drop-path", "0.1")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["opt"])
            ema = ModelEmaV3(model, decay=0.9)
            ema.load_state_dict(saved["ema"])
        loader_train.sampler.set_epoch(epoch)
        train_one_epoch(model, criterion, loader_train, optimizer, CPU, epoch, None, None, ema, mixup,
                        print_fn=_quiet, seed=seed)
    return model.state_dict(), ema.state_dict()


def test_epoch_is_reproducible_after_an_interruption(digits):
    """Seeded per epoch, a resumed epoch (other RNG history) ends with bit-identical weights and EMA."""
    straight = _train_two_epochs(digits, interrupt=False, seed=0)
    resumed = _train_two_epochs(digits, interrupt=True, seed=0)
    for a, b in zip(straight, resumed):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # control: without the per-epoch seed the RNG history leaks in (mixup, RandAugment, drop path)
    unseeded = _train_two_epochs(digits, interrupt=True, seed=None)
    assert any(not torch.equal(straight[0][k], unseeded[0][k]) for k in straight[0])


def test_loader_workers_are_seeded_from_the_reseeded_global_rng(digits):
    """With workers, augmentation randomness comes from the global RNG at iterator creation."""
    from utils import derive_seed, set_seed

    ns = make_args("--num_workers", "2")
    loader, _ = build_loaders(flags.data_config(ns), digits[0], None, distributed=False)

    def first_batch(seed):
        set_seed(derive_seed(seed, 1, 0))
        return next(iter(loader))[0]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_non_finite_loss_stops_naming_epoch_and_iteration(digits):
    ns, model, optimizer, mixup, _, loader_train, _ = _setup(digits)

    def nan_on_second(samples, outputs, targets, calls=[]):  # noqa: B006 (counter for this test only)
        calls.append(1)
        loss = outputs.float().logsumexp(1).mean()
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 3, iteration 2/4"):
        train_one_epoch(model, nan_on_second, loader_train, optimizer, CPU, 3, mixup_fn=mixup, print_fn=_quiet)


def test_hard_distillation_of_a_distilled_student(digits):
    ns, model, optimizer, mixup, _, loader_train, loader_val = _setup(digits, "deit_test_distilled_patch8_32")
    teacher = create_model("deit_test_patch8_32", num_classes=10)
    teacher_state = copy.deepcopy(teacher.state_dict())
    criterion = DistillationLoss(build_base_criterion(True, 0.1), teacher, "hard", 0.5, 1.0, num_classes=10)
    stats = train_one_epoch(model, criterion, loader_train, optimizer, CPU, 0, mixup_fn=mixup,
                            print_fn=_quiet, seed=1)
    assert math.isfinite(stats["loss"])
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    result = evaluate(loader_val, model, CPU, print_fn=_quiet)  # eval averages the two heads
    assert 0 <= result["acc1"] <= result["acc5"] <= 100


# ---------------------------------------------------------------- fit: DDP, EMA, checkpoint, resume

@pytest.fixture
def gloo_world_of_one():
    """A gloo process group of one rank in this process (so `fit` wraps the model in DDP), destroyed after."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fit_under_ddp_with_ema_checkpoints_and_resumes_its_state(digits, tmp_path, monkeypatch, gloo_world_of_one):
    ns = make_args("--model-ema-decay", "0.9", "--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0",
                   "--output_dir", str(tmp_path))
    cfg, _ = flags.train_config(ns, 1)
    train, val, num_classes = digits
    loaders = build_loaders(flags.data_config(ns), Subset(train, range(32)), Subset(val, range(16)), distributed=True)
    arch = arch_of("deit_test_patch8_32", num_classes=num_classes, img_size=32)
    mask = PruneMask.full(arch, model="deit_test_patch8_32")
    mixup = build_mixup(cfg.mixup, num_classes)

    def student(state=None):
        torch.manual_seed(0)
        model = build_deploy_model(arch)
        if state is not None:
            model.load_state_dict(state)
        return model

    start = copy.deepcopy(student().state_dict())
    fit(cfg, student(), mask, *loaders, mixup, CPU, distributed=True, log=_quiet)
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert saved["epoch"] == 0 and os.path.isfile(tmp_path / "best_checkpoint.pth")
    assert not any(torch.equal(saved["model_ema"][k], v) for k, v in saved["model"].items() if v.dim() > 1)
    assert not any(torch.equal(saved["model_ema"][k], v) for k, v in start.items() if v.dim() > 1)  # EMA moved

    seen = {}
    real_train = engine.training.train_one_epoch

    def spy(model, criterion, loader, optimizer, device, epoch, scaler, clip, model_ema, *args, **kwargs):
        seen.update(ddp=isinstance(model, torch.nn.parallel.DistributedDataParallel), epoch=epoch,
                    optimizer=copy.deepcopy(optimizer.state_dict()), ema=copy.deepcopy(model_ema.state_dict()),
                    model=copy.deepcopy(model.module.state_dict()))
        return real_train(model, criterion, loader, optimizer, device, epoch, scaler, clip, model_ema, *args, **kwargs)

    monkeypatch.setattr(engine.training, "train_one_epoch", spy)
    lines = []
    resume = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    fit(replace(cfg, epochs=2), student(resume["model"]), mask, *loaders, mixup, CPU, distributed=True,
        resume_checkpoint=resume, resume_path=str(tmp_path / "checkpoint.pth"), log=lines.append)
    assert seen["ddp"] and seen["epoch"] == 1
    assert f"resumed from {tmp_path / 'checkpoint.pth'}: next epoch 1, best top-1 so far " \
           f"{saved['max_accuracy']:.2f}%" in lines
    assert_same(seen["optimizer"], saved["optimizer"], "optimizer")
    assert_same(seen["ema"], {f"module.{k}": v for k, v in saved["model_ema"].items()}, "EMA")
    assert_same(seen["model"], saved["model"], "model")
    again = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert again["epoch"] == 1  # the resumed epoch ran and was saved
    steps = [v["step"] for v in again["optimizer"]["state"].values()]
    assert all(float(s) == 2 * len(loaders[0]) for s in steps)


def test_metric_logger_prints_eta_and_samples_per_second():
    lines = []
    logger = MetricLogger(print_fn=lines.append, device=CPU)
    batches = [(torch.zeros(4, 3), torch.zeros(4)) for _ in range(5)]
    start = time.time()
    for images, _ in logger.log_every(batches, 2, "Epoch: [0]"):
        time.sleep(0.02)
        logger.update(n=4, loss=1.5)
    wall = time.time() - start
    assert len(lines) == 4  # iterations 1, 3, 5 and the total
    assert [re.search(r"\[(\d)/5\]", line).group(1) for line in lines[:3]] == ["1", "3", "5"]
    for line in lines[:3]:
        assert re.search(r"eta: \d+:\d\d:\d\d", line) and "loss: 1.5000 (1.5000)" in line
        rate = float(re.search(r"samples/s: ([\d.]+)", line).group(1))
        # each window holds >= 4 samples and lasts >= 20 ms per batch but no longer than the whole loop
        assert 4 / wall - 0.05 <= rate <= 4 / 0.02 * 1.01
        assert "max mem" not in line  # CPU run
    assert lines[-1].startswith("Epoch: [0] Total time:")


def test_metric_logger_prints_on_a_timer(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    for step, expected in ((0.0, [1, 10]), (11.0, [1, 4, 7, 10]), (31.0, list(range(1, 11)))):
        lines = []
        logger = MetricLogger(print_fn=lines.append, device="cpu")
        for _ in logger.log_every(TimedItems(clock, 10, step), 1000, "Epoch: [0]"):
            pass
        done = [int(m) for line in lines[:-1] for m in re.findall(r"\[\s*(\d+)/10\]", line)]
        assert done == expected, (step, lines)
        assert "Total time" in lines[-1]


def test_metric_logger_tiny_interval_prints_every_iteration():
    lines = []
    logger = MetricLogger(print_fn=lines.append, device="cpu")
    for _ in logger.log_every([torch.zeros(1)] * 4, 100, print_seconds=0.0):
        pass
    assert len(lines) == 5 and "samples/s" in lines[1]


def test_smoothed_value_statistics():
    meter = SmoothedValue(window_size=3)
    values, weights = [4.0, 1.0, 7.0, 2.0, 5.0], [1, 2, 1, 3, 1]
    for v, n in zip(values, weights):
        meter.update(v, n)
    assert meter.median == 5.0 and meter.avg == pytest.approx(14 / 3) and meter.max == 7.0
    assert meter.value == 5.0
    assert meter.global_avg == pytest.approx(np.average(values, weights=weights))


# ---------------------------------------------------------------- lr schedule, EMA horizon

def lr_sequence(batch_size: int, epochs: int = 30, **options):
    """(config, lr of each epoch, notes) of main_deploy.py's schedule at this batch size and options."""
    argv = ["--model", "deit_test_patch8_32_deploy", "--batch-size", str(batch_size), "--epochs", str(epochs)]
    for k, v in options.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args, lines = flags.train_config(main_deploy.get_args_parser().parse_args(argv), world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler, num_epochs = create_scheduler(args, optimizer)
    lrs = []
    for epoch in range(num_epochs):
        scheduler.step(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    return args, lrs, lines


def test_small_batch_lr_never_rises_after_warmup():
    args, lrs, lines = lr_sequence(8)  # 5e-4 * 8 / 512 = 7.8e-6 < --min-lr 1e-5
    assert args.lr == pytest.approx(5e-4 * 8 / 512)
    after = lrs[args.warmup_epochs:]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after, after[1:])), after
    assert max(lrs) <= args.lr * (1 + 1e-12)
    assert len(lines) == 1 and "--min-lr lowered from 1e-05 to 7.81e-06" in lines[0]


def test_warmup_lr_above_the_scaled_lr_is_lowered_too():
    args, lrs, lines = lr_sequence(8, warmup_lr=5e-5)
    assert args.warmup_lr == args.min_lr == args.lr
    assert max(lrs) <= args.lr * (1 + 1e-12) and len(lines) == 2 and "--warmup-lr lowered from 5e-05" in lines[1]


def test_large_batch_schedule_untouched():
    args, lrs, lines = lr_sequence(512)
    assert lines == [] and args.min_lr == 1e-5 and args.warmup_lr == 1e-6
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-5)


def test_ema_note_when_the_run_is_shorter_than_the_horizon():
    note = ema_horizon_note(0.99996, 800)
    assert note.count("\n") == 0 and "~25000" in note and "800" in note
    assert f"{0.99996 ** 800:.0%}" in note and "--model-ema-decay 0.9875" in note and "--no-model-ema" in note
    assert ema_horizon_note(0.99, 800) == ""  # horizon 100 steps
    assert ema_horizon_note(0.99996, 30000) == ""
    short = ema_horizon_note(0.999, 5)
    assert "--no-model-ema" in short and "--model-ema-decay" not in short
    suggested = float(re.search(r"--model-ema-decay ([\d.]+)", note).group(1))
    assert 1 / (1 - suggested) <= 800 and suggested ** 800 < 1e-3  # the suggestion forgets its start


# ---------------------------------------------------------------- flags

def test_shared_flags_have_deit_defaults_and_feed_timm():
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    import main

    assert main.get_args_parser().parse_args([]).pruning_flops_percentage == 0.5
    ns = main_deploy.get_args_parser().parse_args([])
    from args import check_input_size
    from models import arch_of

    assert ns.input_size is None
    check_input_size(ns, arch_of(ns.model))
    assert ns.input_size == 224  # the model's own size: DeiT-B's 224
    expected = dict(model="deit_base_patch16_224", drop=0.0, drop_path=0.1, model_ema=True,
                    model_ema_decay=0.99996, opt="adamw", opt_eps=1e-8, weight_decay=0.05, sched="cosine",
                    lr=5e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=5, cooldown_epochs=10, epochs=300,
                    color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", smoothing=0.1, train_interpolation="bicubic",
                    repeated_aug=True, reprob=0.25, remode="pixel", recount=1, mixup=0.8, cutmix=1.0,
                    mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", teacher_model="regnety_160",
                    distillation_type="none", distillation_alpha=0.5, distillation_tau=1.0, batch_size=64,
                    data_set="IMNET", num_workers=10, pin_mem=True, seed=0,
                    dist_url="env://", world_size=1, log="same", log_period=10, amp=True)
    assert {k: getattr(ns, k) for k in expected} == expected
    assert ns.device == ("cuda" if torch.cuda.is_available() else "cpu")
    for spelling in ("--local-rank", "--local_rank"):
        assert make_args(f"{spelling}=3").local_rank == 3
    off = make_args("--no-model-ema", "--no-repeated-aug", "--no-pin-mem", "--no-amp")
    assert not (off.model_ema or off.repeated_aug or off.pin_mem or off.amp)
    model = torch.nn.Linear(4, 2)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(ns))
    assert type(optimizer).__name__ == "AdamW" and optimizer.param_groups[0]["lr"] == 5e-4
    scheduler, epochs = create_scheduler(ns, optimizer)
    assert epochs == 310  # 300 + 10 cool-down epochs, as in DeiT


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "15"], "even"),
    (["--lr", "0"], "--lr"),
    (["--drop-path", "1.0"], "--drop-path"),
    (["--distillation-type", "hard"], "--teacher-path"),
    (["--distillation-alpha", "2"], "--distillation-alpha"),
    (["--pruning_flops_percentage", "1.0"], "--pruning_flops_percentage"),
    (["--cutmix-minmax", "0.5"], "--cutmix-minmax"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--device", "tpu"], "--device"),
])
def test_validate_common_rejects_bad_values(argv, match):
    # ranges are checked by the parser (exit 2, one line), combinations by check_common (UserError)
    import contextlib
    import io

    import main

    err = io.StringIO()
    with pytest.raises((SystemExit, UserError)) as raised, contextlib.redirect_stderr(err):
        if "--pruning_flops_percentage" in argv:  # main.py's flag
            ns = main.get_args_parser().parse_args(argv)
        else:
            ns = make_args(*argv)
        flags.check_common(ns)
    text = err.getvalue() if raised.type is SystemExit else str(raised.value)
    assert re.search(match, text), text
    if raised.type is SystemExit:
        assert raised.value.code == 2 and len(text.strip().splitlines()) == 1


def test_validate_common_accepts_the_seed_commands():
    flags.check_common(make_args("--batch-size", "15", "--mixup", "0", "--cutmix", "0"))
    flags.check_common(make_args("--distillation-type", "soft", "--teacher-path", "t.pth",
                                 "--pruning_flops_percentage", "0", "--finetune_op", "1",
                                 "--warmup-epochs", "0", "--cooldown-epochs", "0", "--epochs", "300"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            flags.check_common(make_args("--device", "cuda"))


# ---------------------------------------------------------------- logs

def test_logs_text_json_lines_tensorboard_and_checkpoint(tmp_path):
    logger = setup_logging(str(tmp_path / "run"), name="savit_test")
    setup_logging(str(tmp_path / "run"), name="savit_test")  # again: no duplicated handlers
    logger = setup_logging(str(tmp_path / "run"), name="savit_test")
    logger.info("hello from the test")
    assert re.fullmatch(r"\d{8}_\d{6}\.log", os.path.basename(logger.log_file))
    for handler in logger.handlers:
        handler.flush()
    assert open(logger.log_file).read().count("hello from the test") == 1

    append_json_line(str(tmp_path / "run" / "log.txt"), {"epoch": 0, "train_loss": 1.5})
    append_json_line(str(tmp_path / "run" / "log.txt"), {"epoch": 1, "train_loss": 1.25})
    lines = open(tmp_path / "run" / "log.txt").read().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]

    tb = TensorboardLogger(str(tmp_path / "run"))
    tb.update(step=3, head="train", loss=torch.tensor(0.5), lr=1e-3)
    tb.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "run" / "tensorboard"))
    assert TensorboardLogger(str(tmp_path / "off"), enabled=False).writer is None


def test_single_process_helpers_without_launcher(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    dist_cfg = init_distributed_mode("cpu")
    assert (dist_cfg.distributed, dist_cfg.rank, dist_cfg.world_size, dist_cfg.backend) == (False, 0, 1, None)
    t = torch.tensor([2.0])
    assert all_reduce_sum(t) is t and t.item() == 2.0


# ---------------------------------------------------------------- two processes (gloo)

def _two_rank_worker(rank, port, model_path, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ns = make_args("--dist-eval")
    dist_cfg = init_distributed_mode(ns.device, ns.dist_url)
    try:
        total = all_reduce_sum(torch.tensor([float(rank + 1)])).item()
        meter = SmoothedValue()
        meter.update(10.0 * (rank + 1), n=rank + 1)  # rank 0: one sample of 10, rank 1: two of 20
        meter.synchronize_between_processes()
        val, _ = build_dataset(False, flags.data_config(ns))
        train, _ = build_dataset(True, flags.data_config(ns))
        loader_train, loader_val = build_loaders(flags.data_config(ns), Subset(train, range(300)), Subset(val, range(45)), True)
        model = create_model("deit_test_patch8_32", num_classes=10)
        model.load_state_dict(torch.load(model_path))
        result = evaluate(loader_val, model, CPU, print_fn=_quiet)
        record = dict(rank=dist_cfg.rank, world=dist_cfg.world_size, backend=dist_cfg.backend, total=total,
                      meter=[meter.count, meter.global_avg], result=result, val_len=len(loader_val.sampler),
                      train_indices=list(loader_train.sampler))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        cleanup_distributed()


@pytest.mark.e2e
def test_two_gloo_ranks_agree_with_one_process(tmp_path, digits):
    import torch.multiprocessing as mp

    model = create_model("deit_test_patch8_32", num_classes=10)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    # forked (CPU, gloo): the ranks start in a second, without importing this module again
    mp.start_processes(_two_rank_worker, args=(free_port(), str(tmp_path / "model.pth"), str(tmp_path)), nprocs=2,
                       start_method="fork")
    records = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [(r["rank"], r["world"], r["backend"], r["total"]) for r in records] == [(0, 2, "gloo", 3.0),
                                                                                     (1, 2, "gloo", 3.0)]
    assert records[0]["meter"] == pytest.approx([3, 50 / 3])  # (10 + 2 * 20) / 3
    assert [r["val_len"] for r in records] == [23, 22]  # 45 images, none counted twice
    ns = make_args()
    val_set = Subset(build_dataset(False, flags.data_config(ns))[0], range(45))
    _, val = build_loaders(flags.data_config(ns), None, val_set, distributed=False)
    single = evaluate(val, model, CPU, print_fn=_quiet)
    with torch.no_grad():  # independent: all 45 images in one batch
        logits = model.eval()(torch.stack([val_set[i][0] for i in range(45)]))
    labels = torch.tensor([val_set[i][1] for i in range(45)])
    for r in records:  # the ranks' batches round off otherwise: only near-ties may flip
        assert_accuracy(r["result"]["acc1"], logits, labels, k=1)
        assert_accuracy(r["result"]["acc5"], logits, labels, k=5)
        assert r["result"]["loss"] == pytest.approx(single["loss"], rel=1e-5)
    # repeated augmentation: 300 images -> 256 / 2 per rank; the three copies of an image go to both ranks
    first, second = records[0]["train_indices"], records[1]["train_indices"]
    assert len(first) == len(second) == 128
    assert first[0] == first[1] == second[0] and second[1] == second[2] == first[2] != first[0]
