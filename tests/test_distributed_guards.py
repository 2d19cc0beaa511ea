"""Fast in-process guards of the distributed training paths (no subprocess, no torchrun).

1. DistributedDataParallel without `find_unused_parameters` (how `engine.fit` wraps the
   student) fails at the second step when a parameter got no gradient in the first one
   (e.g. `head_dist` of a distilled student trained without a teacher). For every student
   kind (plain DeiT, distilled DeiT, the other families of models/registry.py), pruned with
   emptied branches and unpruned, x distillation none / soft / hard x mixup on / off, one
   training step built as `fit` builds it must give every trainable parameter a gradient.
   A deploy model has no zero-size parameter (an emptied branch is `None`): DDP treats
   an unused zero-size parameter like any other unused one (the same error), so the
   absence is asserted too. One real DDP (a 1-rank gloo group, which runs the same
   unused-parameter check) confirms the gradient check is DDP's requirement.
2. `engine.loops.evaluate` sums over ranks only when its loader is sharded: without
   `--dist-eval` every rank reads the whole validation set, so its own counts are the totals
   (a fake second rank is patched in: reducing would double the count).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler, TensorDataset

import engine.loops
from args import defaults, mixup_config
from conftest import mask_case
from datasets import MixupConfig, RASampler, ShardSampler, build_mixup
from engine.loops import evaluate, is_sharded
from losses import DistillationLoss, build_base_criterion, build_teacher
from models import arch_of, build_deploy_model, create_model
from models.registry import TEST_CONFIGS

NUM_CLASSES = 10
# every tiny family but the larger demo DeiT (the same family as deit_test)
STUDENTS = [name for name in TEST_CONFIGS if name != "deit_demo_patch8_32"]
MASKS = ["unpruned", "emptied", "all_emptied"]
DISTILLATION = ["none", "soft", "hard"]
MIXUP_ON = mixup_config(defaults())  # DeiT's: mixup 0.8, cutmix 1.0, smoothing 0.1
MIXUP_OFF = mixup_config(defaults(mixup=0.0, cutmix=0.0))


def _student(name: str, mask: str) -> nn.Module:
    # as main_deploy.py builds it: the data set's classes, DeiT's drop path
    arch = arch_of(name, img_size=32, num_classes=NUM_CLASSES, drop_path_rate=0.1)
    return build_deploy_model(arch, None if mask == "unpruned" else mask_case(arch, mask, embed=True))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> nn.Module:
    """A tiny teacher as main_deploy.py builds it (`build_teacher`: loaded, frozen, eval mode)."""
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    torch.save(create_model("deit_test_patch8_32_deploy", num_classes=NUM_CLASSES).state_dict(), path)
    return build_teacher("deit_test_patch8_32_deploy", path, NUM_CLASSES, torch.device("cpu"))


def _step(model: nn.Module, distillation: str, mixup: MixupConfig, teacher: nn.Module, seed: int = 0):
    """One training step's forward and backward, the way `engine.fit` / `train_one_epoch` run it."""
    torch.manual_seed(seed)
    criterion = DistillationLoss(build_base_criterion(mixup.active, mixup.smoothing),
                                 teacher if distillation != "none" else None, distillation, 0.5, 1.0)
    mixup_fn = build_mixup(mixup, NUM_CLASSES)
    samples, targets = torch.randn(4, 3, 32, 32), torch.randint(0, NUM_CLASSES, (4,))
    if mixup_fn is not None:
        samples, targets = mixup_fn(samples, targets)
    model.train()
    criterion.train()
    loss = criterion(samples, model(samples), targets)
    assert torch.isfinite(loss)
    loss.backward()
    return loss


@pytest.mark.parametrize("mixup", ["mixup", "no_mixup"])
@pytest.mark.parametrize("distillation", DISTILLATION)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", STUDENTS)
def test_every_trainable_parameter_gets_a_gradient(name, mask, distillation, mixup, teacher):
    model = _student(name + "_deploy", mask)
    if mask != "unpruned":  # the mask really empties branches: those blocks have no module for them
        structure = model.structure()
        assert 0 in structure["heads"] and 0 in structure["hidden"], structure
    params = dict(model.named_parameters())
    assert not [n for n, p in params.items() if p.numel() == 0]  # an emptied branch is None, not a 0-size layer
    assert ("head_dist" in " ".join(params)) == name.startswith("deit_test_distilled")
    _step(model, distillation, MIXUP_ON if mixup == "mixup" else MIXUP_OFF, teacher)
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient (DDP without find_unused_parameters fails): {missing}"
    # the teacher is frozen and untouched
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


@pytest.fixture
def one_rank_group(tmp_path):
    """A real 1-rank gloo process group (a file store: no port), destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Unused(nn.Module):
    """A linear layer and one parameter the forward never uses (zero-size or not)."""

    def __init__(self, shape):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Parameter(torch.zeros(shape))

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("name", ["deit_test_distilled_patch8_32", "vit_test_reg4_gap_patch8_32"])
def test_ddp_without_find_unused_parameters_trains_the_students(name, one_rank_group, teacher):
    # the check is DDP's own: an unused parameter, even of zero size, fails the next step
    for shape in ((0, 4), (2,)):
        net = nn.parallel.DistributedDataParallel(_Unused(shape))
        net(torch.randn(2, 4)).sum().backward()
        with pytest.raises(RuntimeError, match="finished reduction"):
            net(torch.randn(2, 4)).sum().backward()
    # the students: three steps each (a failure would show from the second)
    for distillation in ("none", "hard"):
        ddp = nn.parallel.DistributedDataParallel(_student(name + "_deploy", "emptied"))
        for step in range(3):
            ddp.zero_grad(set_to_none=True)
            _step(ddp, distillation, MIXUP_ON, teacher, seed=step)


# ---------------------------------------------------------------------------
# evaluate: reduce over ranks only for a sharded loader
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def val_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(37, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (37,), generator=g))


def test_is_sharded_recognises_the_samplers(val_data):
    assert not is_sharded(DataLoader(val_data, sampler=SequentialSampler(val_data)))
    assert not is_sharded(DataLoader(val_data, shuffle=True))
    assert not is_sharded([(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))])  # a plain iterable
    assert not is_sharded(DataLoader(val_data, sampler=ShardSampler(val_data, num_replicas=1, rank=0)))
    for sampler in (ShardSampler(val_data, num_replicas=2, rank=1),
                    DistributedSampler(val_data, num_replicas=2, rank=0),
                    RASampler(val_data, num_replicas=2, rank=0)):
        assert is_sharded(DataLoader(val_data, sampler=sampler, batch_size=8))
        assert is_sharded(DataLoader(val_data, batch_sampler=BatchSampler(sampler, 8, False)))


def test_evaluate_counts_each_image_once_with_and_without_dist_eval(val_data, monkeypatch, capsys):
    """A fake 2-rank world: `all_reduce_sum` adds what the other rank would contribute."""
    model = create_model("deit_test_patch8_32_deploy", num_classes=NUM_CLASSES).eval()
    x, y = val_data.tensors
    with torch.no_grad():
        logits = model(x)
    expected = {"acc1": 100.0 * (logits.argmax(1) == y).double().mean().item(),
                "loss": nn.functional.cross_entropy(logits.double(), y).item()}
    print_fn = print

    def run(loader, other_rank_sums):
        calls = []

        def fake_all_reduce(tensor):
            calls.append(tensor.clone())
            return tensor.add_(other_rank_sums(tensor))

        monkeypatch.setattr(engine.loops, "all_reduce_sum", fake_all_reduce)
        stats = evaluate(loader, model, torch.device("cpu"), amp=False, print_fn=print_fn)
        return stats, calls, capsys.readouterr().out

    # without --dist-eval: every rank reads all 37 images (the other rank's sums equal these)
    full = DataLoader(val_data, sampler=SequentialSampler(val_data), batch_size=16)
    stats, calls, out = run(full, lambda t: t.clone())
    assert calls == [] and "(37 images)" in out, out
    assert stats["acc1"] == pytest.approx(expected["acc1"], abs=1e-9)
    assert stats["loss"] == pytest.approx(expected["loss"], rel=1e-5)

    # with --dist-eval: rank 0 reads 19 images, rank 1 the other 18; the sum is over both shards
    monkeypatch.setattr(engine.loops, "all_reduce_sum", lambda t: t)
    print_fn = lambda _: None  # noqa: E731
    shard1 = DataLoader(val_data, sampler=ShardSampler(val_data, num_replicas=2, rank=1), batch_size=16)
    rank1 = evaluate(shard1, model, torch.device("cpu"), amp=False, print_fn=print_fn)
    rank1_count = 18.0
    rank1_sums = torch.tensor([rank1["loss"] * rank1_count, rank1["acc1"] * rank1_count / 100,
                               rank1["acc5"] * rank1_count / 100, rank1_count], dtype=torch.float64)
    print_fn = print
    shard0 = DataLoader(val_data, sampler=ShardSampler(val_data, num_replicas=2, rank=0), batch_size=16)
    stats, calls, out = run(shard0, lambda t: rank1_sums)
    assert len(calls) == 1 and calls[0][3].item() == 19.0  # rank 0's own share, reduced once
    assert "(37 images)" in out, out
    assert stats["acc1"] == pytest.approx(expected["acc1"], abs=1e-9)
    assert stats["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_evaluate_on_a_real_one_rank_group(val_data, one_rank_group, capsys):
    model = create_model("deit_test_patch8_32_deploy", num_classes=NUM_CLASSES)
    for sampler in (SequentialSampler(val_data), ShardSampler(val_data)):  # ShardSampler of the 1-rank world
        evaluate(DataLoader(val_data, sampler=sampler, batch_size=16), model, torch.device("cpu"), amp=False,
                 print_fn=print)
        assert "(37 images)" in capsys.readouterr().out
