"""Scoring a gated Swin inside a Faster R-CNN on the detector's own loss (`DetectorLoss`), on a tiny
synthetic detection set, then the search and the smaller detector: the README's "A Swin backbone in a
detector, pruned on your own data", whose python block (`SNIPPET`, read from the README) is executed
here with the tiny Swin and a smaller detector, pass and target swapped in."""
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer
from torchvision.ops import MultiScaleRoIAlign

import models
from models.swin_features import AutogradRoIAlign, DetectorLoss, SwinFeatures, swin_detector
from pruning.flops import mask_macs
from pruning.scoring import PruningScorer
from test_readme_commands import readme_command
from test_swin_detection import CFG, NAME

SNIPPET = readme_command("detector_snippet")
SMALL_HEADS = "out_channels=32, representation_size=64, box_batch_size_per_image=64"
SWAPS = {'"swin_tiny_patch4_window7_224': f'"{NAME}', "num_classes=91": f"num_classes=3, {SMALL_HEADS}",
         "num_batches=100": "num_batches=3", "flops_percentage=0.7": "flops_percentage=0.5"}


def rectangles(n: int, generator: torch.Generator, size: int = 32):
    """n noise images with 1-2 filled rectangles each, of a random colour: class 1 mostly red, 2 mostly
    blue; returns images (n, 3, size, size) and torchvision's targets (boxes x1 y1 x2 y2 in pixels)."""
    images = 0.3 * torch.rand(n, 3, size, size, generator=generator)
    targets = []
    for image in images:
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
            w, h = (int(v) for v in torch.randint(6, 17, (2,), generator=generator))
            x, y = int(torch.randint(0, size - w + 1, (1,), generator=generator)), \
                int(torch.randint(0, size - h + 1, (1,), generator=generator))
            label = int(torch.randint(1, 3, (1,), generator=generator))
            colour = 0.4 * torch.rand(3, generator=generator)
            colour[0 if label == 1 else 2] = 0.6 + 0.4 * float(torch.rand(1, generator=generator))
            image[:, y:y + h, x:x + w] = colour[:, None, None]
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def batches(count: int = 3, size: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [rectangles(size, generator) for _ in range(count)]


def run_snippet(tmp_path, monkeypatch) -> dict:
    """SNIPPET with SWAPS, run in tmp_path on timm weights of the tiny Swin and 3 synthetic batches."""
    code = SNIPPET
    for old, new in SWAPS.items():
        assert old in code, old
        code = code.replace(old, new)
    save_file(SwinTransformer(**CFG).state_dict(), str(tmp_path / f"{NAME}.safetensors"))
    monkeypatch.chdir(tmp_path)
    namespace = {"loader": batches()}
    exec(compile(code, "README snippet", "exec"), namespace)
    return namespace


def _train_and_infer(detector, images, targets):
    detector.train()
    loss = sum(detector(list(images), targets).values())
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    optimizer.zero_grad()
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    optimizer.step()
    with torch.no_grad():
        out = detector.eval()(list(images))
    assert len(out) == len(images) and all(o["boxes"].shape[1:] == (4,) for o in out)


def test_readme_snippet_scores_prunes_and_rebuilds_the_detector(tmp_path, monkeypatch):
    ns = run_snippet(tmp_path, monkeypatch)
    criteria, C, mask, gated, small = ns["criteria"], ns["C"], ns["mask"], ns["gated"], ns["small"]
    for c, v in criteria.items():
        assert torch.isfinite(v).all() and v.abs().sum() > 0, c
    assert C.shape == (3, 3) and torch.isfinite(C).all() and (C != 0).any()
    assert ns["report"]["mode"] == "interactions"  # the evolution strategy, on C
    reduction = 1 - mask_macs(gated.arch, mask)["total"] / mask_macs(gated.arch)["total"]
    assert abs(reduction - 0.5) <= 0.005
    assert models.SwinMask.load(str(tmp_path / "swin_tiny_detector_mask.json")) == mask
    body = small.backbone.body
    assert isinstance(body.model, models.DeploySwin) and body.channels == [len(e) for e in mask.embed]
    assert [b[0].in_channels for b in small.backbone.fpn.inner_blocks] == body.channels
    images, targets = rectangles(2, torch.Generator().manual_seed(5))
    _train_and_infer(small, images, targets)


def test_taylor_criterion_through_the_detector_restores_it():
    torch.manual_seed(0)
    gated = models.create_model(NAME)
    detector = swin_detector(SwinFeatures(gated), num_classes=3, out_channels=32, representation_size=64,
                             box_batch_size_per_image=64)
    flags = [p.requires_grad for p in detector.parameters()]
    loss_of = DetectorLoss(detector)
    detector.eval()
    gated.patch_embed.train()  # mixed modes: DetectorLoss puts every module back as it was
    modes = [m.training for m in detector.modules()]
    images, targets = rectangles(2, torch.Generator().manual_seed(3))
    assert loss_of(images, targets).dim() == 0
    assert [m.training for m in detector.modules()] == modes
    scorer = PruningScorer(loss_of, lambda loss, targets: loss, method=1)
    scorer.score_batches(batches(count=2), 2, log=None)
    criteria, C = scorer.finalize()
    assert C is None
    for c, v in criteria.items():
        assert torch.isfinite(v).all() and v.abs().sum() > 0, c
    assert isinstance(detector.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert [p.requires_grad for p in detector.parameters()] == flags


def test_autograd_roi_align_equals_torchvision():
    generator = torch.Generator().manual_seed(0)
    for size, maps in ((32, (16, 8, 4, 2)), (224, (56, 28, 14, 7))):  # 224: the boxes use several levels
        pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
        x = {str(i): torch.randn(2, 5, m, m, dtype=torch.float64, generator=generator).requires_grad_()
             for i, m in enumerate(maps)}
        boxes = []
        for _ in range(2):  # some reach past the image
            xy = (1.1 * torch.rand(30, 2, dtype=torch.float64, generator=generator) - 0.05) * size
            boxes.append(torch.cat([xy, xy + torch.rand(30, 2, dtype=torch.float64, generator=generator) * size], 1))
        shapes = [(size, size)] * 2
        ours, theirs = AutogradRoIAlign(pool)(x, boxes, shapes), pool(x, boxes, shapes)
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
        weight = torch.randn(theirs.shape, dtype=torch.float64, generator=generator)
        for a, b in zip(torch.autograd.grad((ours * weight).sum(), list(x.values())),
                        torch.autograd.grad((theirs * weight).sum(), list(x.values()))):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
