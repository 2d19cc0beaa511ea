"""DistillationLoss against hand computations (NumPy, float64), teacher handling, criterion choice."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from losses import DistillationLoss, build_base_criterion, build_teacher
from utils import UserError

B, C = 6, 5


class LinearTeacher(nn.Module):
    """Logits = flattened input @ W, with a dropout that would change outputs in training mode."""

    def __init__(self, in_features: int, num_classes: int = C):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_features, num_classes)
        self.drop = nn.Dropout(0.9)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.drop(x.flatten(1)))


class ExplodingTeacher(nn.Module):
    def forward(self, x):
        raise AssertionError("the teacher must not run for distillation_type='none'")


def _np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_ce(logits, labels):
    return -_np_log_softmax(logits)[np.arange(len(labels)), labels].mean()


def _np_soft(student, teacher, tau):
    """DeiT: sum over batch and classes of KL(p_t || p_s) at temperature tau, * tau^2 / (B * C)."""
    log_ps, log_pt = _np_log_softmax(student / tau), _np_log_softmax(teacher / tau)
    return (np.exp(log_pt) * (log_pt - log_ps)).sum() * tau * tau / student.size


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(B, 3, 2, 2, generator=g)
    student = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    student_dist = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, C, (B,), generator=g)
    return inputs, student, student_dist, labels


def _teacher():
    torch.manual_seed(1)
    return LinearTeacher(12).double()


@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 3.0), (1.0, 0.5), (0.0, 2.0)])
@pytest.mark.parametrize("distilled_student", [False, True])
def test_soft_distillation_matches_hand_computation(alpha, tau, distilled_student):
    inputs, student, student_dist, labels = _data()
    teacher = _teacher()
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau)
    outputs = (student, student_dist) if distilled_student else student
    loss = loss_fn(inputs.double(), outputs, labels)

    t = teacher.fc(inputs.double().flatten(1)).detach().numpy()  # eval mode: no dropout
    s, kd = student.numpy(), (student_dist if distilled_student else student).numpy()
    expected = (1 - alpha) * _np_ce(s, labels.numpy()) + alpha * _np_soft(kd, t, tau)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
@pytest.mark.parametrize("distilled_student", [False, True])
def test_hard_distillation_matches_hand_computation(alpha, distilled_student):
    inputs, student, student_dist, labels = _data(3)
    teacher = _teacher()
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha, tau=7.0)  # tau unused
    outputs = (student, student_dist) if distilled_student else student
    loss = loss_fn(inputs.double(), outputs, labels)

    teacher_labels = teacher.fc(inputs.double().flatten(1)).detach().numpy().argmax(axis=1)
    kd = (student_dist if distilled_student else student).numpy()
    expected = (1 - alpha) * _np_ce(student.numpy(), labels.numpy()) + alpha * _np_ce(kd, teacher_labels)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_distilled_student_gradients_split_between_heads():
    """Class head gets (1-alpha) x the label gradient only; dist head gets alpha x the teacher gradient only."""
    inputs, student, student_dist, labels = _data(5)
    teacher = _teacher()
    cls_logits = student.clone().requires_grad_(True)
    dist_logits = student_dist.clone().requires_grad_(True)
    DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 0.25, 1.0)(
        inputs.double(), (cls_logits, dist_logits), labels).backward()

    def ce_grad(logits, target):  # d mean-CE / d logits = (softmax - onehot) / B
        p = np.exp(_np_log_softmax(logits.detach().numpy()))
        p[np.arange(B), target] -= 1
        return p / B

    teacher_labels = teacher.fc(inputs.double().flatten(1)).argmax(dim=1).numpy()
    np.testing.assert_allclose(cls_logits.grad.numpy(), 0.75 * ce_grad(cls_logits, labels.numpy()), rtol=1e-10)
    np.testing.assert_allclose(dist_logits.grad.numpy(), 0.25 * ce_grad(dist_logits, teacher_labels), rtol=1e-10)


def test_none_passes_through_without_running_the_teacher():
    inputs, student, student_dist, labels = _data()
    base = nn.CrossEntropyLoss()
    loss_fn = DistillationLoss(base, ExplodingTeacher(), "none", 0.5, 1.0)
    assert loss_fn.teacher is None
    assert torch.equal(loss_fn(inputs, student, labels), base(student, labels))
    # a distilled student: both heads learn the labels, so that DDP sees a gradient for each head
    expected = (base(student, labels) + base(student_dist, labels)) / 2
    assert torch.equal(loss_fn(inputs, (student, student_dist), labels), expected)


def test_teacher_frozen_and_kept_in_eval_mode():
    inputs, student, _, labels = _data()
    teacher = _teacher().train()
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0)
    loss_fn.train()  # must not put the teacher back in training mode (its dropout would fire)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    student = student.clone().requires_grad_(True)
    first = loss_fn(inputs.double(), student, labels)
    second = loss_fn(inputs.double(), student, labels)
    assert first.item() == second.item()  # no dropout noise
    first.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.calls == 2


def test_class_count_mismatch_is_a_user_error():
    inputs, student, _, labels = _data()
    teacher = LinearTeacher(12, num_classes=C + 1).double()
    with pytest.raises(UserError, match="classes"):
        DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 0.5, 1.0, num_classes=C)
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0)  # count unknown up front
    with pytest.raises(UserError, match=f"{C + 1} classes but the student {C}"):
        loss_fn(inputs.double(), student, labels)


@pytest.mark.parametrize("kwargs,field,match", [
    (dict(distillation_type="hard", teacher=None), "distillation_type", "hard needs a teacher .--teacher-path."),
    (dict(distillation_type="soft", alpha=1.5), "distillation_alpha", r"must be in \[0, 1\], got 1.5"),
    (dict(distillation_type="soft", tau=0.0), "distillation_tau", "must be > 0, got 0.0"),
    (dict(distillation_type="kl"), "distillation_type", "must be one of .*got 'kl'"),
])
def test_bad_settings_are_user_errors(kwargs, field, match):
    settings = dict(base_criterion=nn.CrossEntropyLoss(), teacher=_teacher(), distillation_type="soft",
                    alpha=0.5, tau=1.0)
    settings.update(kwargs)
    with pytest.raises(UserError, match=match) as err:
        DistillationLoss(**settings)
    assert err.value.field == field


def test_base_criterion_choice_follows_deit():
    assert isinstance(build_base_criterion(True, 0.1), SoftTargetCrossEntropy)
    smoothing = build_base_criterion(False, 0.1)
    assert isinstance(smoothing, LabelSmoothingCrossEntropy) and smoothing.smoothing == 0.1
    assert type(build_base_criterion(False, 0.0)) is nn.CrossEntropyLoss


def test_build_teacher_loads_freezes_and_checks(tmp_path):
    from models import create_model

    source = create_model("deit_test_patch8_32", num_classes=7)
    path = tmp_path / "teacher.pth"
    torch.save({"model": source.state_dict()}, path)
    teacher = build_teacher("deit_test_patch8_32", str(path), 7, torch.device("cpu"))
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for name, value in source.state_dict().items():
        if "gate" not in name:  # a teacher is never gated (all-ones gates: the plain model)
            assert torch.equal(teacher.state_dict()[name], value), name
    torch.save(source.state_dict(), tmp_path / "plain.pth")  # a bare state dict works too
    build_teacher("deit_test_patch8_32", str(tmp_path / "plain.pth"), 7, torch.device("cpu"))

    for model, path_, classes, words in (
            ("deit_test_patch8_32", str(path), 10, "predicts 7 classes but the data set has 10"),
            ("deit_demo_patch8_32", str(path), 7, "does not fit --teacher-model deit_demo_patch8_32"),
            ("deit_test_patch8_32", str(tmp_path / "missing.pth"), 7, "not found"),
            ("deit_test_patch8_32", "", 7, "distillation needs the teacher's weights")):
        with pytest.raises(UserError, match=words) as err:
            build_teacher(model, path_, classes, torch.device("cpu"))
        assert err.value.field == "teacher_path"
