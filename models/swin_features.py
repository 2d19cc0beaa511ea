"""A pruned (or gated) Swin as a detection backbone: its stage feature maps, and torchvision's
Faster R-CNN on an FPN over them.

`SwinFeatures` is the counterpart of timm's `features_only=True` for `GatedSwin` / `DeploySwin`:
the stage outputs before the final norm (timm applies no norm to them either), as NCHW maps (as
timm's `forward_intermediates`; its Swin `features_only` net gives them NHWC) in an OrderedDict
keyed '0', '1', ... (what torchvision's `FeaturePyramidNetwork` takes, as `IntermediateLayerGetter`
gives it). The Swin checks its input size strictly: `swin_detector`
resizes every image to `arch.img_size` x `arch.img_size` (torchvision's `fixed_size`, aspect ratio
not kept; boxes are mapped back to the original image sizes in eval mode).

Pruning such a detector's Swin on its own loss: `PruningScorer(DetectorLoss(detector), lambda loss,
targets: loss, ...)`, then `pruned_detector(detector, mask)` (README, "A Swin backbone in a detector, pruned on your own data").
"""
import copy
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.build import build_deploy_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SwinFeatures(nn.Module):
    """The stage feature maps of a `GatedSwin` or `DeploySwin`, NCHW, for the stages `out_indices`.

    The wrapped model stays whole as `self.model` (its state dict is a full Swin state dict, which
    `models.slicing` / `load_pruned` read, and a gated model keeps its gates for scoring); its
    parameters that no requested stage uses (final norm, classifier, later stages) are frozen.

    Attributes:
        channels: channels of each returned map (the stage widths: pruned ones for a DeploySwin,
            the unpruned ones, pruned channels at 0, for a gated model), as timm's `feature_info.channels()`.
        reductions: stride of each returned map in input pixels, as timm's `feature_info.reduction()`.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        stages = len(model.widths)
        self.out_indices = [int(i) for i in out_indices]
        if not self.out_indices or any(not 0 <= i < stages for i in self.out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must name stages of 0..{stages - 1}")
        self.model = model
        self.channels = [model.widths[i] for i in self.out_indices]
        self.reductions = [model.arch.patch_size * 2 ** i for i in self.out_indices]
        last = max(self.out_indices)
        unused = [model.norm, model.head] + list(model.layers[last + 1:])
        for p in (p for m in unused for p in m.parameters()):
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        stages = self.model.forward_stages(images)
        return OrderedDict((str(i), stages[i].permute(0, 3, 1, 2).contiguous()) for i in self.out_indices)


class SwinFPN(nn.Module):
    """SwinFeatures -> torchvision's FeaturePyramidNetwork (plus a max-pooled level 'pool'), with
    `out_channels` as torchvision's detectors want; `body` / `fpn` as in torchvision's `BackboneWithFPN`."""

    def __init__(self, features: SwinFeatures, out_channels: int = 256):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = features
        self.fpn = FeaturePyramidNetwork(features.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(self.body(images))


def swin_detector(features: SwinFeatures, num_classes: int, out_channels: int = 256, representation_size: int = 1024,
                  anchor_sizes: Optional[Sequence[int]] = None, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                  **kwargs) -> nn.Module:
    """torchvision's `FasterRCNN` (`num_classes` with the background) on an FPN over `features`.

    Anchors: one size per FPN level, 8x the level's stride by default (Swin-T: 32 .. 512, torchvision's
    sizes), each with `aspect_ratios`; 7x7 RoIAlign over the stage levels, then torchvision's two-layer
    box head of `representation_size`. Images are resized to the Swin's input size and normalised by
    the model's recorded `normalization`, else ImageNet's (`image_mean` / `image_std` in `kwargs`
    override it). Other `kwargs` go to `FasterRCNN`. Nothing is downloaded.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    backbone = SwinFPN(features, out_channels)
    if anchor_sizes is None:
        anchor_sizes = [8 * r for r in features.reductions] + [16 * features.reductions[-1]]
    if len(anchor_sizes) != len(features.reductions) + 1:
        raise ValueError(f"need {len(features.reductions) + 1} anchor sizes (one per stage and the pool level), "
                         f"got {len(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    roi_pool = MultiScaleRoIAlign([str(i) for i in features.out_indices], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(out_channels * 7 * 7, representation_size)
    box_predictor = FastRCNNPredictor(representation_size, num_classes)  # FasterRCNN's own assumes 1024
    norm = getattr(features.model, "normalization", None) or {}
    kwargs.setdefault("image_mean", list(norm.get("mean", IMAGENET_MEAN)))
    kwargs.setdefault("image_std", list(norm.get("std", IMAGENET_STD)))
    size = features.model.arch.img_size
    return FasterRCNN(backbone, None, min_size=size, max_size=size, fixed_size=(size, size),
                      size_divisible=1, rpn_anchor_generator=anchors, box_roi_pool=roi_pool, box_head=box_head,
                      box_predictor=box_predictor, **kwargs)


def _roi_align(features: torch.Tensor, rois: torch.Tensor, scale: float, output_size: Tuple[int, int],
               sampling_ratio: int) -> torch.Tensor:
    """torchvision's `roi_align` (aligned=False, `sampling_ratio` > 0) of rois (K, 5) in plain autograd ops."""
    (ph, pw), batch = output_size, rois[:, 0].long()

    def axis(start, end, bins, size):  # sample coordinates -> (low, high, weight low, weight high), (K, S)
        j = torch.arange(bins * sampling_ratio, device=rois.device, dtype=rois.dtype)
        p = start[:, None] + ((end - start).clamp(min=1) / bins)[:, None] * (j + 0.5) / sampling_ratio
        valid = ((p >= -1) & (p <= size)).to(rois.dtype)
        p = p.clamp(min=0)
        low = p.floor().clamp(max=size - 1)
        frac = (p - low) * (p.floor() < size - 1)
        return low.long(), (low.long() + 1).clamp(max=size - 1), (1 - frac) * valid, frac * valid

    x1, y1, x2, y2 = (rois[:, 1:] * scale).unbind(1)
    ys, xs = axis(y1, y2, ph, features.shape[-2]), axis(x1, x2, pw, features.shape[-1])
    out = 0
    for yi, wy in ((ys[0], ys[2]), (ys[1], ys[3])):
        for xi, wx in ((xs[0], xs[2]), (xs[1], xs[3])):
            corner = features[batch[:, None, None], :, yi[:, :, None], xi[:, None, :]]  # (K, Sy, Sx, C)
            out = out + (wy[:, :, None] * wx[:, None, :])[..., None] * corner
    s = sampling_ratio
    return out.reshape(len(rois), ph, s, pw, s, features.shape[1]).mean((2, 4)).permute(0, 3, 1, 2)


class AutogradRoIAlign(nn.Module):
    """A torchvision `MultiScaleRoIAlign` (same levels, same values) in plain autograd ops, which can
    be differentiated twice: torchvision's kernel cannot, and the pruning pass's Hessian-vector
    products differentiate through it. Slower and larger than the kernel: for scoring only."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        if pool.sampling_ratio <= 0:
            raise ValueError(f"needs a fixed sampling_ratio > 0, got {pool.sampling_ratio}")
        self.pool = pool

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        pool, features = self.pool, [x[k] for k in self.pool.featmap_names]
        height = max(s[0] for s in image_shapes)
        levels = [round(math.log2(height / f.shape[-2])) for f in features]  # as torchvision infers the scales
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        level = torch.floor(pool.canonical_level + torch.log2(area.sqrt() / pool.canonical_scale) + 1e-6)
        level = level.clamp(levels[0], levels[-1]) - levels[0]
        out = features[0].new_zeros((len(rois), features[0].shape[1]) + pool.output_size)
        for i, f in enumerate(features):
            idx = torch.where(level == i)[0]
            out[idx] = _roi_align(f, rois[idx], 2.0 ** -levels[i], pool.output_size, pool.sampling_ratio)
        return out


class DetectorLoss(nn.Module):
    """The total training loss of a `swin_detector` over a `GatedSwin`, for `PruningScorer`:
    `PruningScorer(DetectorLoss(detector), lambda loss, targets: loss, ...)` on batches of
    (images (B, 3, H, W), targets: a list of {'boxes', 'labels'} as torchvision's detectors take).

    The detector runs in train mode (torchvision's give losses only then) with its Swin in eval mode
    (no dropout or drop path) and its RoI pooling through `AutogradRoIAlign`; modes and pooling are
    restored after. The Swin's `arch`, `patch_embed` and gates are exposed as this module's.
    """

    takes_targets = True

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        self.roi_pool = AutogradRoIAlign(detector.roi_heads.box_roi_pool)

    @property
    def gated(self) -> nn.Module:
        return self.detector.backbone.body.model

    @property
    def arch(self):
        return self.gated.arch

    @property
    def patch_embed(self) -> nn.Module:
        return self.gated.patch_embed

    def gate_parameters(self):
        return self.gated.gate_parameters()

    def head_gates(self):
        return self.gated.head_gates()

    def mlp_gates(self):
        return self.gated.mlp_gates()

    def embed_gates(self):
        return self.gated.embed_gates()

    def forward(self, images: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        targets = [{k: v.to(images.device) for k, v in t.items()} for t in targets]
        modes = [(m, m.training) for m in self.modules()]
        heads = self.detector.roi_heads
        pool, heads.box_roi_pool = heads.box_roi_pool, self.roi_pool
        try:
            self.detector.train()
            self.gated.eval()
            return sum(self.detector(list(images), targets).values())
        finally:
            heads.box_roi_pool = pool
            for m, mode in modes:
                m.training = mode


def pruned_detector(detector: nn.Module, mask) -> nn.Module:
    """The smaller detector: a copy of `detector` (a `swin_detector` over a `GatedSwin`) whose Swin
    is the `DeploySwin` sliced from the gated weights by `mask` (`models.build_deploy_model`) and
    whose FPN lateral 1x1 convs take their stage's kept channels (`mask.embed`); all else is copied.
    It equals `detector` with the mask applied to the gates and `mask_aware_norm` set."""
    body = detector.backbone.body
    gated, weight = body.model, body.model.patch_embed.proj.weight
    deploy = build_deploy_model(gated.arch, mask, weights=gated.state_dict()).to(weight.device, weight.dtype)
    features = SwinFeatures(deploy, body.out_indices).train(body.training)
    deploy.train(gated.training)
    small = copy.deepcopy(detector, {id(body): features})
    for block, stage in zip(small.backbone.fpn.inner_blocks, body.out_indices):
        conv = block[0]
        cut = nn.Conv2d(len(mask.embed[stage]), conv.out_channels, 1).to(conv.weight)
        with torch.no_grad():
            cut.weight.copy_(conv.weight[:, mask.embed[stage]])
            cut.bias.copy_(conv.bias)
        block[0] = cut
    return small
