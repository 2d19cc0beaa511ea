"""Training criteria: the base criterion, and knowledge distillation from a frozen teacher (DeiT).

`DistillationLoss` wraps the base criterion (Touvron et al., "Training data-efficient
image transformers & distillation through attention", 2021, section 5):

* 'none': the base loss of the class head, nothing else;
* 'hard': cross-entropy to the teacher's argmax;
* 'soft': `tau^2 * KL(softmax(t / tau) || softmax(s / tau))`, where, exactly as in
  DeiT's losses.py, the KL is summed over batch and classes and divided by
  `outputs_kd.numel()` = batch x classes (a per-element mean: 1/num_classes of the
  usual 'batchmean' KL);

and returns `(1 - alpha) * base + alpha * distill`. A student that returns a tuple
`(class_logits, dist_logits)` (DeiT's distillation token, in training mode) has its
dist head distilled and its class head trained on the labels; a plain student
has its single head take both terms. Without a teacher, both heads of such a student
learn the labels (the mean of their base losses): every parameter then takes part in
the loss, as DistributedDataParallel needs, and the dist head that evaluation averages
in is trained rather than left at its initialisation.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from models import arch_of, create_model, is_prunable, load_pruned
from models.loading import timm_names
from utils import UserError, check_keys, load_torch_file, state_dict_of

DISTILLATION_TYPES = ("none", "soft", "hard")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings (`--distillation-type --distillation-alpha --distillation-tau
    --teacher-model --teacher-path`); the teacher itself is built by `build_teacher`."""

    type: str
    alpha: float
    tau: float
    teacher_model: str
    teacher_path: str


class DistillationLoss(nn.Module):
    """Base criterion plus distillation from a frozen teacher (see the module docstring).

    The teacher runs in eval mode under `no_grad` and stays in eval mode even when
    the criterion is put in training mode.

    Args:
        base_criterion: `(outputs, labels) -> loss`, e.g. SoftTargetCrossEntropy.
        teacher: the teacher network (may be None when `distillation_type` is 'none').
        distillation_type: 'none', 'soft' or 'hard'.
        alpha: weight of the distillation term, in [0, 1].
        tau: soft-distillation temperature, > 0.
        num_classes: the student's class count; when given, checked against the
            teacher's `num_classes` attribute at construction.

    Raises:
        UserError: unknown type, missing teacher, bad alpha/tau, or teacher and
            student class counts that differ (also checked on every forward).
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module], distillation_type: str,
                 alpha: float, tau: float, num_classes: Optional[int] = None):
        super().__init__()
        if distillation_type not in DISTILLATION_TYPES:
            raise UserError(f"must be one of {DISTILLATION_TYPES}, got {distillation_type!r}",
                            field="distillation_type")
        if distillation_type != "none":
            if teacher is None:
                raise UserError(f"{distillation_type} needs a teacher (--teacher-path)", field="distillation_type")
            if not 0.0 <= alpha <= 1.0:
                raise UserError(f"must be in [0, 1], got {alpha}", field="distillation_alpha")
            if not tau > 0:
                raise UserError(f"must be > 0, got {tau}", field="distillation_tau")
            teacher_classes = getattr(teacher, "num_classes", None)
            if num_classes is not None and teacher_classes is not None and teacher_classes != num_classes:
                raise UserError(f"the teacher predicts {teacher_classes} classes but the student {num_classes}")
            teacher.eval()
            teacher.requires_grad_(False)
        self.base_criterion = base_criterion
        self.teacher = teacher if distillation_type != "none" else None
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is frozen: never dropout / drop path / BN updates
        return self

    def forward(self, inputs: torch.Tensor, outputs: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                labels: torch.Tensor) -> torch.Tensor:
        """Loss of `outputs` (the student's on `inputs`) against `labels` and the teacher.

        Args:
            inputs: the batch the student saw (after mixup); the teacher sees it too.
            outputs: student logits, or `(class_logits, dist_logits)`.
            labels: targets for the base criterion (class indices or soft targets).
        """
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
            if self.distillation_type == "none":  # no teacher: the dist head learns the labels too
                return (self.base_criterion(outputs, labels) + self.base_criterion(outputs_kd, labels)) / 2
        else:
            outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == "none":
            return base_loss
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if isinstance(teacher_outputs, (tuple, list)):  # a distilled DeiT teacher: average its heads
            teacher_outputs = (teacher_outputs[0] + teacher_outputs[1]) / 2
        if teacher_outputs.shape[-1] != outputs_kd.shape[-1]:
            raise UserError(f"the teacher predicts {teacher_outputs.shape[-1]} classes but the student "
                            f"{outputs_kd.shape[-1]} (--teacher-model / --teacher-path vs the data set)")
        if self.distillation_type == "soft":
            tau = self.tau
            # DeiT: sum-reduced KL(teacher || student) at temperature tau, times tau^2, over numel
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / tau, dim=1),
                F.log_softmax(teacher_outputs / tau, dim=1),
                reduction="sum",
                log_target=True,
            ) * (tau * tau) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def build_base_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    """DeiT's base criterion: soft-target CE under mixup/cutmix (smoothing lives in the mixed
    targets), else label-smoothing CE when `smoothing > 0`, else plain CE.

    Args:
        mixup_active: whether a Mixup transform produces soft targets.
        smoothing: label smoothing (`--smoothing`).
    """
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def _classifier_key(model: nn.Module) -> Optional[str]:
    """State-dict key of the classifier weight (timm's `get_classifier()`, else `head`)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, (nn.Linear, nn.Conv2d)):
        return None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def _check_classes(path: str, classes: int, num_classes: int) -> None:
    if classes != num_classes:
        raise UserError(f"{path!r} predicts {classes} classes but the data set has {num_classes}")


def _timm_teacher(model_name: str, path: str, num_classes: int, trust: bool) -> nn.Module:
    """timm's model of `model_name` with the weights of `path` (class count and keys checked)."""
    state = timm_names(state_dict_of(load_torch_file(path, "checkpoint", trust=trust), path))
    teacher = create_model(model_name, num_classes=num_classes)
    head_key = _classifier_key(teacher)
    if head_key is not None and head_key in state:
        _check_classes(path, state[head_key].shape[0], num_classes)
    check_keys(state, teacher, path, target=f"--teacher-model {model_name}")
    teacher.load_state_dict(state, strict=True)
    return teacher


def build_teacher(model_name: str, path: str, num_classes: int, device: torch.device,
                  trust: bool = False) -> nn.Module:
    """The distillation teacher: built by name, loaded from `path`, frozen, in eval mode, on `device`.

    Args:
        model_name: any name `models.create_model` resolves: timm's `regnety_160`, or a prunable ViT
            name such as `deit_tiny_patch16_224`, whose teacher is the ungated deploy model that
            `models.load_pruned` reads from `path` (plain weights, or a pruned checkpoint of this project).
        path: a state dict or `{'model': state_dict}` file.
        num_classes: the data set's class count; the teacher must predict as many.
        device: where the teacher runs.
        trust: allow a file that needs full unpickling (`--trust_checkpoint`).

    Raises:
        UserError: no path, unreadable or refused file, class-count mismatch, or weights that do
            not fit the architecture (missing/unexpected keys or shapes).
    """
    if not path:
        raise UserError("distillation needs the teacher's weights", field="teacher_path")
    with UserError.about("teacher_path"):
        if is_prunable(model_name):  # the (pruned or not) ViT its file describes, at the input size it records
            teacher = load_pruned(path, arch_of(model_name, num_classes=num_classes), trust=trust,
                                  classes_from_checkpoint=True, size_from_checkpoint=True,
                                  target=f"--teacher-model {model_name}")
            _check_classes(path, teacher.arch.num_classes, num_classes)
        else:
            teacher = _timm_teacher(model_name, path, num_classes, trust)
    teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
