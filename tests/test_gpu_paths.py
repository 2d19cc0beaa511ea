"""GPU code paths a CPU can check: the memory readout's device, TF32 settings, host syncs of the training
loop, the EMA evaluation switch, a throughput measurement that leaves the model alone, and rank-0-only
FLOPs counts (fake ranks and devices stand in for the GPU and the launcher)."""
import copy
import json
import math
import warnings

import pytest
import torch
from torch.utils.data import Subset

import args as flags
import engine.loops
import engine.training
import main as prune_main
import main_deploy
from args import DistributedConfig
from datasets import build_dataset, build_loaders, build_mixup
from engine import NonFiniteLossError, fit, measure_throughput, train_one_epoch
from engine.throughput import _train_precision
from losses import DistillationLoss, build_base_criterion
from models import DeployViT, arch_of, build_deploy_model, create_model, load_pruned
from models.loading import adapt_state_dict
from models.slicing import deploy_state_dict
from models.vit_gated import GatedViT
from pruning.flops import ptflops_macs
from models.mask import PruneMask
from pruning.mask import criteria_shapes
from utils import MetricLogger, set_tf32

CPU = torch.device("cpu")
MODEL = "deit_test_patch8_32"


@pytest.fixture(autouse=True)
def _one_thread_and_tf32_restored():
    threads = torch.get_num_threads()
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def make_args(*argv):
    return main_deploy.get_args_parser().parse_args(["--device", "cpu", "--num_workers", "0", "--data-set", "DIGITS",
                                                     "--input-size", "32", "--batch-size", "16", *argv])


@pytest.fixture(scope="module")
def digits():
    ns = make_args()
    train, num_classes = build_dataset(True, flags.data_config(ns))
    val, _ = build_dataset(False, flags.data_config(ns))
    return Subset(train, range(64)), Subset(val, range(24)), num_classes  # 4 training steps of 16


def _quiet(_line):
    pass


# -- 1. memory readout ----------------------------------------------------------------------------

def test_progress_line_reads_the_peak_memory_of_the_runs_device(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: asked.append(device) or 3 * 2 ** 20)
    lines = []
    logger = MetricLogger(print_fn=lines.append, device="cuda:1")
    for _ in logger.log_every([torch.zeros(2, 3)] * 2, 1, "Epoch: [0]"):
        pass
    assert asked == [torch.device("cuda:1")] * 2
    assert "max mem: 3MB" in lines[0]


# -- 2. TF32 ----------------------------------------------------------------------------------------

def test_tf32_flag_defaults_on_for_training_and_off_for_pruning():
    assert make_args().tf32 and not make_args("--no-tf32").tf32
    parse = prune_main.get_args_parser().parse_args
    assert not parse([]).tf32 and parse(["--tf32"]).tf32
    assert flags.run_config(make_args("--no-tf32"), DistributedConfig(device="cpu")).tf32 is False


@pytest.mark.parametrize("enabled", [True, False])
def test_set_tf32_sets_the_backends_whatever_was_set_before(enabled):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not enabled
    torch.set_float32_matmul_precision("medium" if not enabled else "highest")
    line = set_tf32(enabled)
    assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
    assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
    assert line.startswith("TF32: on" if enabled else "TF32: off")


def test_main_py_disables_a_global_tf32_and_logs_full_fp32(tmp_path, capsys):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a caller's global setting
    argv = ["--model", MODEL, "--data-set", "DIGITS", "--input-size", "32", "--batch-size", "16", "--num_workers",
            "0", "--device", "cpu", "--eval", "--output_dir", str(tmp_path / "o")]
    prune_main.main(prune_main.get_args_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert "precision: scores in full fp32 (TF32 off" in out
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


# -- 3. host synchronisations of the training loop ---------------------------------------------

def _epoch_setup(digits):
    ns = make_args()
    train, val, num_classes = digits
    loader_train, _ = build_loaders(flags.data_config(ns), train, val, distributed=False)
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mixup = build_mixup(flags.mixup_config(ns), num_classes)
    base = DistillationLoss(build_base_criterion(mixup is not None, ns.smoothing), None, "none", 0.5, 1.0)
    return model, optimizer, mixup, base, loader_train


class _TB:
    def __init__(self):
        self.rows = []

    def update(self, step, head, **values):
        self.rows.append((step, head, values["loss"], values["lr"]))


def test_losses_are_checked_and_read_only_at_log_points(digits, monkeypatch):
    model, optimizer, mixup, base, loader = _epoch_setup(digits)
    seen = []  # (loss, batch size) of every iteration, read here (the test may synchronise)

    def criterion(samples, outputs, targets):
        loss = base(samples, outputs, targets)
        seen.append((loss.item(), samples.shape[0]))
        return loss

    reduces = []
    real = engine.loops.all_reduce_sum
    monkeypatch.setattr(engine.loops, "all_reduce_sum", lambda t: reduces.append(len(seen)) or real(t))
    tb = _TB()
    stats = train_one_epoch(model, criterion, loader, optimizer, CPU, 2, mixup_fn=mixup, tb_logger=tb,
                            print_freq=2, print_fn=_quiet)
    assert reduces == [1, 3, 4]  # iterations 1, 3 (every 2nd) and the last, not every iteration
    total = count = 0.0
    for value, n in seen:  # the per-sample mean as SmoothedValue sums it, iteration by iteration
        total += value * n
        count += n
    assert stats["loss"] == total / count
    assert tb.rows == [(2 * 4 + k, "train", value, 1e-3) for k, (value, _) in enumerate(seen)]


def test_non_finite_loss_on_another_rank_stops_every_rank_at_the_same_log_point(digits, monkeypatch):
    model, optimizer, mixup, base, loader = _epoch_setup(digits)
    calls = []

    def criterion(samples, outputs, targets):
        calls.append(1)
        return base(samples, outputs, targets)

    reduces = []

    def other_rank_nan_after_first(t):  # the sum over ranks: another rank saw a NaN since iteration 1
        reduces.append(1)
        return t + 1 if len(reduces) == 2 else t

    monkeypatch.setattr(engine.loops, "all_reduce_sum", other_rank_nan_after_first)
    with pytest.raises(NonFiniteLossError, match=r"non-finite on another process at epoch 5, between iterations "
                                                 r"2 and 3/4"):
        train_one_epoch(model, criterion, loader, optimizer, CPU, 5, mixup_fn=mixup, print_freq=2, print_fn=_quiet)
    assert len(calls) == 3  # stopped at the log point of iteration 3


def test_own_non_finite_loss_names_its_iteration_at_the_next_log_point(digits):
    model, optimizer, mixup, base, loader = _epoch_setup(digits)
    calls = []

    def nan_on_third(samples, outputs, targets):
        calls.append(1)
        loss = base(samples, outputs, targets)
        return loss * float("inf") if len(calls) == 3 else loss

    with pytest.raises(NonFiniteLossError, match=r"loss is inf at epoch 1, iteration 3/4"):
        train_one_epoch(model, nan_on_third, loader, optimizer, CPU, 1, mixup_fn=mixup, print_freq=10,
                        print_fn=_quiet)
    assert len(calls) == 4  # found at the epoch's last iteration, the next log point


# -- 4. EMA evaluation --------------------------------------------------------------------------

@pytest.mark.parametrize("ema_eval", [False, True])
def test_fit_evaluates_the_ema_only_with_model_ema_eval(digits, tmp_path, monkeypatch, ema_eval):
    ns = make_args("--model-ema-decay", "0.9", *(["--model-ema-eval"] if ema_eval else []))
    assert ns.model_ema_eval is ema_eval
    cfg, _ = flags.train_config(ns, 1)
    assert cfg.model_ema_eval is ema_eval
    out = tmp_path / "run"
    from dataclasses import replace
    cfg = replace(cfg, epochs=1, warmup_epochs=0, cooldown_epochs=0, output_dir=str(out))
    train, val, num_classes = digits
    loader_train, loader_val = build_loaders(flags.data_config(ns), train, val, distributed=False)
    arch = arch_of(MODEL, num_classes=num_classes, img_size=32)
    torch.manual_seed(0)
    model = build_deploy_model(arch)
    headers, results = [], []
    real = engine.training.evaluate

    def spy(*a, header="Test:", **k):
        headers.append(header)
        results.append(real(*a, header=header, **k))
        return results[-1]

    monkeypatch.setattr(engine.training, "evaluate", spy)
    lines = []
    fit(cfg, model, PruneMask.full(arch, model=MODEL), loader_train, loader_val, build_mixup(cfg.mixup, num_classes),
        CPU, log=lines.append)
    (record,) = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    said = "EMA: not evaluated each epoch (--model-ema-eval to evaluate it)" in lines
    if ema_eval:
        assert headers == ["Test:", "Test (EMA):"] and not said
        assert record["test_ema_acc1"] == results[1]["acc1"] and record["test_ema_acc5"] == results[1]["acc5"]
    else:
        assert headers == ["Test:"] and said
        assert not [k for k in record if k.startswith("test_ema_")]
    assert record["test_acc1"] == results[0]["acc1"]


# -- 5. throughput ------------------------------------------------------------------------------

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [(p.device, p.requires_grad, p.grad) for p in model.parameters()])


@pytest.mark.parametrize("train_step, device", [(True, "cpu"), (False, "cpu"), (False, "meta")])
def test_throughput_leaves_the_callers_model_as_it_was(train_step, device):
    torch.manual_seed(0)
    model = build_deploy_model(arch_of(MODEL))
    model.train()
    model.blocks[1].eval()  # mixed modes must survive
    model.pos_embed.requires_grad_(False)
    weights, modes, params = _snapshot(model)
    ips = measure_throughput(model, 2, 32, device, train_step=train_step, warmup=1, iters=2)
    assert ips > 0
    after_weights, after_modes, after_params = _snapshot(model)
    assert after_modes == modes and after_params == params  # CPU, requires_grad, no gradient
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)


def test_training_step_timing_scales_its_fp16_loss_on_cuda():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a GradScaler made without CUDA warns (and disables itself)
        dtype, scaler = _train_precision(torch.device("cuda", 0), amp=True)
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    assert _train_precision(torch.device("cuda"), amp=False) == (None, None)
    assert _train_precision(CPU, amp=True) == (None, None)


# -- 6. FLOPs counts on rank 0 only ------------------------------------------------------------

def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def _half_mask(arch):
    mask = PruneMask.full(arch, model=MODEL)
    mask.heads = [list(range(arch.num_heads - 1)) for _ in range(arch.depth)]
    mask.mlp = [list(range(0, arch.mlp_hidden, 2)) for _ in range(arch.depth)]
    return mask


@pytest.mark.parametrize("main_process", [True, False])
def test_main_deploy_counts_flops_on_rank_0_only(monkeypatch, main_process):
    arch = arch_of(MODEL)
    mask = _half_mask(arch)
    torch.manual_seed(0)
    model = build_deploy_model(arch, mask).eval()
    monkeypatch.setattr(main_deploy, "is_main_process", lambda: main_process)
    built = _counting(monkeypatch, main_deploy, "build_deploy_model")
    counted = _counting(monkeypatch, main_deploy, "ptflops_macs")
    lines = []
    got = main_deploy.log_complexity(model, arch, mask, lines.append)
    if not main_process:
        assert got == {} and built == [] and counted == [] and lines == []
        return
    full = ptflops_macs(DeployViT(arch).eval(), arch)  # the unpruned deploy network, built here
    ours = ptflops_macs(model, arch)
    assert got == {"gmacs": ours["total"] / 1e9, "params": ours["params"], "gmacs_unpruned": full["total"] / 1e9}
    assert lines[0] == f"unpruned model: {full['total'] / 1e9:.4f} GMACs, {full['params'] / 1e6:.3f} M params"


def test_main_deploy_throughput_and_counts_skip_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(main_deploy, "is_main_process", lambda: False)
    built = _counting(monkeypatch, main_deploy, "build_deploy_model")
    read = _counting(monkeypatch, main_deploy, "load_pruned")
    timed = _counting(monkeypatch, main_deploy, "measure_throughput")
    argv = ["--model", MODEL + "_deploy", "--input-size", "32", "--batch-size", "2", "--device", "cpu",
            "--throughput", "--output_dir", str(tmp_path / "o")]
    main_deploy.main(main_deploy.get_args_parser().parse_args(argv))
    assert len(read) == 1 and built == [] and timed == []  # the student only: no unpruned model, nothing timed


@pytest.mark.parametrize("main_process", [True, False])
def test_main_py_counts_the_deploy_model_on_rank_0_only(tmp_path, monkeypatch, main_process):
    out = tmp_path / "pruned"
    ns = prune_main.get_args_parser().parse_args(["--model", MODEL, "--need_hessian", "--pruning_flops_percentage",
                                                  "0.4", "--output_dir", str(out), "--device", "cpu"])
    model = create_model(MODEL, num_classes=10)
    torch.manual_seed(0)
    criteria = {c: torch.rand(s, dtype=torch.float64) for c, s in criteria_shapes(model.arch).items()}
    C = torch.tensor([[2.0, 0.1, 0.2], [0.1, 1.0, 0.3], [0.2, 0.3, 4.0]], dtype=torch.float64) * 1e-3
    monkeypatch.setattr(prune_main, "is_main_process", lambda: main_process)
    built = _counting(monkeypatch, prune_main, "build_deploy_model")
    cfg = prune_main.settings(ns, DistributedConfig(device="cpu"))
    prune_main.run_pruning(cfg, model, None, 10, CPU, _quiet, pickles=(criteria, C))
    if not main_process:
        assert built == [] and not out.exists()
        return
    report = json.loads((out / prune_main.REPORT_NAME).read_text())
    mask = PruneMask.load(str(out / prune_main.MASK_NAME))
    expected = ptflops_macs(build_deploy_model(model.arch, mask).eval(), model.arch)
    assert len(built) == 1 and report["deploy_ptflops_macs"] == expected["total"]
    assert report["deploy_params"] == expected["params"]


@pytest.mark.parametrize("classes", [10, 7])
def test_masked_model_keys_are_checked_on_the_meta_device(tmp_path, monkeypatch, classes):
    arch = arch_of(MODEL, num_classes=7)
    mask = _half_mask(arch)
    mask.save_json(str(tmp_path / "mask.json"))
    timm_weights = {k: v for k, v in create_model(MODEL, num_classes=classes).state_dict().items()
                    if "gate" not in k}  # plain ViT weights: no gates
    torch.save(timm_weights, tmp_path / "w.pth")
    import models.pruned

    devices = []
    real_build = models.pruned.build_gated_model

    def spy(a):
        model = real_build(a)
        devices.append(model.pos_embed.device.type)
        return model

    monkeypatch.setattr(models.pruned, "build_gated_model", spy)
    torch.manual_seed(3)
    deploy = load_pruned(str(tmp_path / "mask.json"), arch, str(tmp_path / "w.pth"))
    # no full-size model is built, not even for a classifier of another size
    assert devices == ["meta"]
    torch.manual_seed(3)  # independent: adapted to a real reference; a replaced classifier keeps its fresh values
    expected = build_deploy_model(arch, mask)
    fresh = {k: v.clone() for k, v in expected.state_dict().items() if k.startswith("head")}
    sliced = deploy_state_dict(mask, adapt_state_dict(copy.deepcopy(timm_weights), GatedViT(arch)), arch)
    expected.load_state_dict({**sliced, **(fresh if classes != 7 else {})})
    got = deploy.state_dict()
    assert set(got) == set(expected.state_dict())
    assert all(torch.equal(v, got[k]) for k, v in expected.state_dict().items())
    assert all(math.isfinite(v.float().sum().item()) for v in got.values())
