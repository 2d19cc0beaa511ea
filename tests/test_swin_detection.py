"""The (pruned) Swin as a detection backbone: `models.swin_features` against timm's `features_only`,
and torchvision's Faster R-CNN on an FPN over it (a training and an inference step)."""
from dataclasses import replace

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer

import models
from models.swin_features import SwinFeatures, pruned_detector, swin_detector

NAME = "swin_test_patch2_window4_32"
CFG = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=4,
           num_classes=10)  # NAME's timm configuration


def _timm_and_gated():
    """timm's tiny Swin (perturbed random weights) and our gated Swin with the same weights, all gates 1."""
    torch.manual_seed(0)
    ref = SwinTransformer(**CFG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gated = models.create_model(NAME).eval()
    state = dict(ref.state_dict())
    state.update({k: torch.ones_like(v) for k, v in gated.state_dict().items() if k.endswith("gate.weight")
                  or k.endswith("gate1.weight")})
    gated.load_state_dict(state, strict=True)
    return ref, gated


def _random_mask(arch, generator):
    """A SwinMask keeping a random subset of every stage's channels, heads and neurons (one block emptied)."""
    full = models.SwinMask.full(arch)

    def some(units, low):
        keep = torch.randperm(len(units), generator=generator)[:max(low, len(units) // 2)]
        return sorted(units[i] for i in keep.tolist())

    heads = [some(h, 1) for h in full.heads]
    heads[3] = []  # a block without attention
    return replace(full, heads=heads, mlp=[some(m, 1) for m in full.mlp], embed=[some(e, 1) for e in full.embed])


def _images_and_targets(num_classes, generator):
    """Three random images of different sizes (resized to the Swin's input by the detector) with 1-3 boxes each."""
    images, targets = [], []
    for h, w in ((32, 32), (40, 48), (28, 36)):
        images.append(torch.rand(3, h, w, generator=generator))
        n = int(torch.randint(1, 4, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        wh = 4 + torch.rand(n, 2, generator=generator) * torch.tensor([w / 2 - 4, h / 2 - 4])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, num_classes, (n,), generator=generator)})
    return images, targets


def _train_and_infer(backbone_model):
    """One SGD step of a Faster R-CNN over `backbone_model`'s features, then one inference step;
    returns the detector."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    features = SwinFeatures(backbone_model)
    detector = swin_detector(features, num_classes=3, out_channels=32, representation_size=64)
    images, targets = _images_and_targets(3, generator)

    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    trainable = {n: p for n, p in features.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert sum(float(p.grad.abs().sum()) for p in trainable.values()) > 0
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(p.grad is None for p in features.parameters() if not p.requires_grad)  # norm, head (and gates)

    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == len(images)
    for o, img in zip(out, images):
        n = o["boxes"].shape[0]
        assert o["boxes"].shape == (n, 4) and o["labels"].shape == (n,) and o["scores"].shape == (n,)
        if n:  # boxes in the original image's coordinates
            assert float(o["boxes"][:, 2].max()) <= img.shape[2] + 1e-4
            assert float(o["boxes"][:, 3].max()) <= img.shape[1] + 1e-4
    return detector


def test_features_equal_timm_features_only():
    ref, gated = (m.double() for m in _timm_and_gated())  # float64: float32 rounding alone reaches 3e-5
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    features = SwinFeatures(gated)
    with torch.no_grad():
        ours = list(features(x).values())
        inter = ref.forward_intermediates(x, intermediates_only=True)
    timm_features = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, features_only=True, **CFG)
    state = {k.replace("layers.", "layers_", 1): v for k, v in ref.state_dict().items()
             if not k.startswith(("norm.", "head."))}
    timm_features.double().load_state_dict(state, strict=True)
    with torch.no_grad():
        listed = [m.permute(0, 3, 1, 2) for m in timm_features.eval()(x)]  # timm's features_only gives NHWC
    assert features.channels == timm_features.feature_info.channels() == [32, 64, 128, 256]
    assert features.reductions == timm_features.feature_info.reduction() == [2, 4, 8, 16]
    for a, b, c in zip(ours, inter, listed):
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-10, rtol=0)


def test_pruned_features_equal_gated_kept_channels():
    _, gated = _timm_and_gated()
    mask = _random_mask(gated.arch, torch.Generator().manual_seed(1))
    mask.apply_to(gated)
    gated.mask_aware_norm = True
    deploy = models.build_deploy_model(gated.arch, mask, weights=gated.state_dict()).eval()
    pruned = SwinFeatures(deploy, out_indices=(1, 2, 3))
    assert pruned.channels == [len(mask.embed[s]) for s in (1, 2, 3)] and pruned.reductions == [4, 8, 16]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full, cut = SwinFeatures(gated)(x), pruned(x)
    assert list(cut) == ["1", "2", "3"]
    for key, m in cut.items():
        torch.testing.assert_close(m, full[key][:, mask.embed[int(key)]], atol=1e-5, rtol=0)


def test_out_indices_and_input_size_are_checked():
    model = models.create_model(NAME + "_deploy")
    with pytest.raises(ValueError, match="out_indices"):
        SwinFeatures(model, out_indices=(0, 4))
    with pytest.raises(ValueError, match="model expects 32x32"):
        SwinFeatures(model)(torch.randn(1, 3, 40, 40))


def test_faster_rcnn_on_pruned_deploy_swin():
    torch.manual_seed(0)
    width, heads = [16, 64, 96, 200], [1, 2, 4, 0, 8, 3, 16, 5]
    hidden = [10, 128, 0, 200, 512, 1, 100, 1024]
    model = models.create_model(NAME + "_deploy", width=width, heads=heads, hidden=hidden)
    detector = _train_and_infer(model)
    assert detector.backbone.body.channels == width
    assert [m.in_channels for m in detector.backbone.fpn.inner_blocks.modules()
            if isinstance(m, torch.nn.Conv2d)] == width


def test_faster_rcnn_on_gated_swin_keeps_gates_frozen():
    torch.manual_seed(0)
    gated = models.create_model(NAME)
    gates = gated.gate_parameters()
    for g in gates[::3]:
        g.data[: g.numel() // 2] = 0
    gated.mask_aware_norm = True
    before = [g.detach().clone() for g in gates]
    _train_and_infer(gated)
    assert all(not g.requires_grad and g.grad is None for g in gates)
    assert all(torch.equal(a, g) for a, g in zip(before, gates))


def test_pruned_detector_equals_gated_detector():
    _, gated = _timm_and_gated()
    mask = _random_mask(gated.arch, torch.Generator().manual_seed(1))  # every stage cut, one block without heads
    mask.apply_to(gated)
    gated.mask_aware_norm = True
    torch.manual_seed(0)
    detector = swin_detector(SwinFeatures(gated), num_classes=3, out_channels=32, representation_size=64)
    small = pruned_detector(detector, mask)
    assert isinstance(small.backbone.body.model, models.DeploySwin) and small.backbone.body is not detector.backbone.body
    widths = [len(e) for e in mask.embed]
    assert small.backbone.body.channels == widths
    assert [b[0].in_channels for b in small.backbone.fpn.inner_blocks] == widths
    assert detector.backbone.body.model is gated  # the gated detector is left as it was
    images, targets = _images_and_targets(3, torch.Generator().manual_seed(0))

    losses = []
    for model in (detector, small):
        torch.manual_seed(1)  # the same RPN and RoI sampling
        losses.append(model.train()(images, targets))
    for key, value in losses[0].items():
        torch.testing.assert_close(losses[1][key], value, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        full, cut = (model.eval()(images) for model in (detector, small))
    assert sum(len(o["boxes"]) for o in full) > 0
    for a, b in zip(full, cut):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(b["scores"], a["scores"], atol=1e-5, rtol=0)
