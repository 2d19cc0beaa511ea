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

from models import arch_of, build_deploy_model, create_model, is_prunable
from models.loading import _is_gate_key, timm_names
from models.slicing import deploy_state_dict
from pruning.deploy import recorded_arch
from pruning.mask import PruneMask
from utils import UserError, check_keys, load_torch_file, naming, state_dict_of

DISTILLATION_TYPES = ("none", "soft", "hard")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings (`--distillation-type --distillation-alpha --distillation-tau
    --teacher-model --teacher-path`); the teacher itself is built by `build_teacher`."""

    type: str = "none"
    alpha: float = 0.5
    tau: float = 1.0
    teacher_model: str = "regnety_160"
    teacher_path: str = ""


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
                raise UserError(f"{distillation_type} needs a teacher (<teacher_path>)", field="distillation_type")
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
                            f"{outputs_kd.shape[-1]} (<teacher_model> / <teacher_path> vs the data set)")
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


def _plain_teacher(model_name: str, checkpoint, state: dict, num_classes: int, path: str):
    """(teacher model, its state dict). Teachers are never gated: a prunable ViT name builds
    the plain ViT (timm's key names); a gated checkpoint (main.py's) is sliced to its deploy
    model and a fine-tuned pruned checkpoint (main_deploy.py's) gets its mask's structure
    (and the input size the checkpoint records)."""
    if not is_prunable(model_name):
        return create_model(model_name, num_classes=num_classes), state
    recorded = recorded_arch(checkpoint, path)  # our checkpoints record the input size they were made for
    arch = arch_of(model_name, num_classes=num_classes, img_size=recorded.img_size if recorded else None)
    mask = None
    if any(_is_gate_key(k) for k in state):
        mask = PruneMask.from_checkpoint(checkpoint, path)
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("mask"), dict):
        mask = PruneMask.from_dict(checkpoint["mask"], path)
    if mask is not None:
        try:
            mask.check_fits(arch)
        except UserError as err:
            raise UserError(f"{path!r} does not fit <teacher_model> {model_name}: {err}",
                            field="teacher_path") from None
        if any(_is_gate_key(k) for k in state):
            return build_deploy_model(arch, mask), deploy_state_dict(mask, state, arch)
    return build_deploy_model(arch, mask), state


def build_teacher(model_name: str, path: str, num_classes: int, device: torch.device,
                  trust: bool = False) -> nn.Module:
    """The distillation teacher: built by name, loaded from `path`, frozen, in eval mode, on `device`.

    Args:
        model_name: any name `models.create_model` resolves (timm's `regnety_160`, a prunable ViT
            name such as `deit_tiny_patch16_224`, built ungated: see `_plain_teacher`).
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
    checkpoint = load_torch_file(path, "checkpoint", trust=trust, field="teacher_path")
    with naming("teacher_path"):
        state = timm_names(state_dict_of(checkpoint, path))  # DDP's `module.`, DeiT III's gamma_1/gamma_2
        teacher, state = _plain_teacher(model_name, checkpoint, state, num_classes, path)
    head_key = _classifier_key(teacher)
    if head_key is not None and head_key in state and state[head_key].shape[0] != num_classes:
        raise UserError(f"{path!r} predicts {state[head_key].shape[0]} classes but the data set has {num_classes}",
                        field="teacher_path")
    check_keys(state, teacher, path, target=f"<teacher_model> {model_name}", field="teacher_path")
    teacher.load_state_dict(state, strict=True)
    teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher
