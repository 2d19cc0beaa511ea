"""One row per supported ViT or Swin family and model: does the gated model reproduce timm, and do
the two MAC counts agree? Prints a markdown table.

For each family, its tiny test configuration(s) (models.registry.TEST_CONFIGS, SWIN_TEST_CONFIGS) and
full-size timm names: timm's own model with seeded random weights (LayerScale gammas in
[0.5, 1.5], so no block vanishes), loaded into the gated model (all gates 1); the largest
|logit difference| over 2 random images in eval mode; the analytic MACs of one image
(`pruning.flops.analytic_macs`) and ptflops' count of the unpruned deploy model.

    OMP_NUM_THREADS=2 python benchmarks/family_table.py    # about 2 minutes on 2 cores; logs/family_table.md
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import environment, markdown_row, markdown_table  # noqa: E402
from models import PruneMask, arch_of, build_deploy_model, create_model  # noqa: E402
from models.loading import adapt_state_dict  # noqa: E402
from models.registry import SWIN_TEST_CONFIGS, TEST_CONFIGS, build_timm_test_model  # noqa: E402
from pruning.baselines import random_mask_with_counts  # noqa: E402
from pruning.flops import mask_macs, ptflops_macs  # noqa: E402

# family -> (tiny configurations, full-size timm names)
FAMILIES = [
    ("DeiT", ["deit_test_patch8_32", "deit_demo_patch8_32"],
     ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]),
    ("DeiT distilled", ["deit_test_distilled_patch8_32"],
     ["deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224"]),
    ("ViT (AugReg)", ["vit_test_patch8_32"],
     ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
      "vit_base_patch32_224", "vit_base_patch16_384"]),
    ("DeiT III (no_embed_class, LayerScale)", ["deit3_test_patch8_32"],
     ["deit3_small_patch16_224", "deit3_base_patch16_224"]),
    ("registers, avg pool + fc_norm", ["vit_test_reg4_gap_patch8_32"], ["vit_base_patch16_reg4_gap_256"]),
    ("avg pool, no fc_norm", ["vit_test_gap_patch8_32"], ["vit_medium_patch16_gap_256"]),
    ("pre-norm (CLIP), qk_norm (tiny)", ["vit_test_prenorm_qknorm_patch8_32"], ["vit_base_patch16_clip_224"]),
    ("Swin (V1)", ["swin_test_patch2_window4_32"],
     ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
      "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_s3_tiny_224"]),
]
TINY = {**TEST_CONFIGS, **SWIN_TEST_CONFIGS}


def randomized_timm_model(name: str, seed: int, scale: float) -> torch.nn.Module:
    """timm's model of `name`, every parameter seeded noise (norm weights around 1, gammas in [0.5, 1.5])."""
    if name in TINY:
        model = build_timm_test_model(name)
    else:
        with torch.device("meta"):  # timm's own init is skipped: every value is overwritten
            model = timm.create_model(name, pretrained=False)
        if any(True for _ in model.buffers()):  # buffers (Swin's index and shift mask) are computed: a real build
            model = timm.create_model(name, pretrained=False)
        else:
            model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            parts = key.split(".")
            if key.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight":
                p.copy_(1 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def row(family: str, name: str) -> list:
    scale = 0.1 if name in TINY else 0.02  # timm's init scale at full size
    reference = randomized_timm_model(name, seed=0, scale=scale)
    gated = create_model(name).eval()
    gated.load_state_dict(adapt_state_dict(reference.state_dict(), gated), strict=True)
    arch = arch_of(name)
    x = torch.randn(2, arch.in_chans, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (gated(x) - reference(x)).abs().max().item()
    del reference, gated
    cells = []
    for mask in (None, half_mask(arch)):
        analytic = mask_macs(arch, mask)["total"]
        counted = ptflops_macs(build_deploy_model(arch, mask).eval(), arch)["total"]
        macs = (lambda v: f"{v / 1e9:.4f} G") if analytic >= 1e9 else (lambda v: f"{v / 1e6:.4f} M")
        cells.append(f"{macs(analytic)} / {macs(counted)} = {analytic / counted:.6f}")
    return [family, name, timm.__version__, f"{diff:.2e}", *cells]


def half_mask(arch):
    """A seeded random mask: half the heads and MLP neurons, a quarter of the embedding channels."""
    total = PruneMask.full(arch).total_counts()
    counts = {"heads": total["heads"] // 2, "mlp": total["mlp"] // 2, "embed": total["embed"] // 4}
    return random_mask_with_counts(arch, counts, seed=0)


def main() -> None:
    start = time.time()
    print("\n".join(markdown_table(["family", "timm name", "timm version", "max abs logit diff, gated vs timm",
                                    "MACs unpruned: analytic / ptflops",
                                    "MACs pruned (1/2 heads and neurons, 1/4 channels): analytic / ptflops"], [])))
    for family, tiny, full in FAMILIES:
        for name in tiny + full:
            print(markdown_row(row(family, name)), flush=True)
    print(f"\n({time.time() - start:.0f} s, {environment()}, {torch.get_num_threads()} threads; random "
          f"weights, 2 images, eval mode; MACs of one image)")


if __name__ == "__main__":
    main()
