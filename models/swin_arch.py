"""The architecture record of a prunable Swin Transformer (timm's `SwinTransformer`, V1), read from
timm's own configuration of a name, as `models.vit_arch` does for ViTs.

A Swin has stages s = 0..S-1 of `depths[s]` blocks at width `widths[s]` with `num_heads[s]`
heads of one head dim; stage s > 0 starts with a patch merging (2x2 neighbours concatenated:
4 widths[s-1] channels, LayerNorm, a bias-free Linear to widths[s]). Block b of a stage attends
within windows of `window_sizes[s]` (clamped to the stage's grid), odd blocks with windows
shifted by half a window. Nothing is registered into timm.
"""
from dataclasses import asdict, dataclass, fields, replace
from typing import List, Tuple

import torch.nn as nn

from utils import UserError


@dataclass(frozen=True)
class SwinArch:
    """The unpruned architecture of a Swin (one head dim and MLP ratio for all stages)."""

    depths: Tuple[int, ...] = (2, 2, 6, 2)
    widths: Tuple[int, ...] = (96, 192, 384, 768)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_sizes: Tuple[int, ...] = (7, 7, 7, 7)
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    patch_norm: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    family = "swin"
    qk_norm = False  # read by the attention shared with the ViTs
    distilled = False  # no distillation token (a DeiT option)

    def __post_init__(self):
        for name in ("depths", "widths", "num_heads", "window_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        stages = len(self.depths)
        if not (len(self.widths) == len(self.num_heads) == len(self.window_sizes) == stages) or stages < 1:
            raise UserError(f"a Swin needs one width, head count and window size per stage: depths {self.depths}, "
                            f"widths {self.widths}, heads {self.num_heads}, windows {self.window_sizes}")
        dims = {w // h for w, h in zip(self.widths, self.num_heads)}
        if any(w % h for w, h in zip(self.widths, self.num_heads)) or len(dims) != 1:
            raise UserError(f"Swin widths {self.widths} and heads {self.num_heads} do not share one head dim")
        if self.img_size % self.patch_size or any(r % 2 for r in self.resolutions[:-1]):
            raise UserError(f"input size {self.img_size} must be a multiple of patch size x 2^(stages-1) = "
                            f"{self.patch_size * 2 ** (stages - 1)} (patch merging halves the grid)")
        for s, (res, window) in enumerate(zip(self.resolutions, self.window_sizes)):
            if res % self.stage_window(s):
                raise UserError(f"input size {self.img_size} gives stage {s} a {res}x{res} grid, not a multiple "
                                f"of its window {window} (choose an input size where every stage's grid is)")

    # -- derived shapes ----------------------------------------------------------
    @property
    def depth(self) -> int:
        """Blocks in all stages (blocks are numbered in stage order)."""
        return sum(self.depths)

    @property
    def head_dim(self) -> int:
        return self.widths[0] // self.num_heads[0]

    @property
    def embed_dim(self) -> int:  # timm's name for the first stage's width
        return self.widths[0]

    @property
    def resolutions(self) -> List[int]:
        """Side of each stage's token grid."""
        grid = self.img_size // self.patch_size
        return [grid // 2 ** s for s in range(len(self.depths))]

    def stage_window(self, s: int) -> int:
        """Window side of stage s: timm clamps it to the grid when the grid is not larger."""
        return min(self.window_sizes[s], self.resolutions[s])

    def stage_shift(self, s: int) -> int:
        """Shift of the odd blocks of stage s: half the (unclamped) window, none when one window covers the grid."""
        return 0 if self.resolutions[s] <= self.window_sizes[s] else self.window_sizes[s] // 2

    def stage_of_block(self) -> List[int]:
        """The stage of every block."""
        return [s for s, d in enumerate(self.depths) for _ in range(d)]

    def block_heads(self) -> List[int]:
        return [self.num_heads[s] for s in self.stage_of_block()]

    def stage_hidden(self, s: int) -> int:
        return int(round(self.widths[s] * self.mlp_ratio))

    def block_hidden(self) -> List[int]:
        return [self.stage_hidden(s) for s in self.stage_of_block()]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["family"] = self.family
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "SwinArch":
        d = {k: v for k, v in d.items() if k != "family"}
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{source}: 'arch' entry has unknown fields {unknown} (written by a newer version?)")
        return cls(**d)

    def with_options(self, **kwargs) -> "SwinArch":
        """Copy with the usual `create_model` keyword arguments applied (`num_classes`, `img_size`,
        `drop_rate`, `drop_path_rate`, ...); `None` values and `pretrained=False` are ignored."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if kwargs.pop("pretrained", False):
            raise UserError("pretrained=True is not supported offline: load the weights from a file")
        kwargs.pop("drop_block_rate", None)
        if "input_size" in kwargs:
            kwargs["img_size"] = kwargs.pop("input_size")
        unknown = sorted(set(kwargs) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unexpected model arguments: {unknown}")
        return replace(self, **kwargs)


def _refusal(name: str):
    def refuse(what: str) -> UserError:
        return UserError(f"model {name!r} is not supported: {what}. SAViT here prunes timm's SwinTransformer (V1) "
                         f"with LayerNorm, exact GELU and one head dim")

    return refuse


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _square(value, what: str, refuse) -> int:
    a, b = _pair(value)
    if a != b:
        raise refuse(f"non-square {what} {(a, b)}")
    return int(a)


def _check_stage(s: int, stage: nn.Module, refuse) -> None:
    from timm.layers import Mlp
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention

    if s > 0 and type(stage.downsample) is not PatchMerging:
        raise refuse(f"stage {s} starts with a {type(stage.downsample).__name__}, not timm's PatchMerging")
    if s == 0 and not isinstance(stage.downsample, nn.Identity):
        raise refuse("stage 0 has a downsampling layer")
    for b, block in enumerate(stage.blocks):
        where = f"stage {s} block {b}"
        if type(block) is not SwinTransformerBlock or type(block.attn) is not WindowAttention:
            raise refuse(f"{where} is a {type(block).__name__}, not timm's SwinTransformerBlock")
        if type(block.mlp) is not Mlp or type(block.mlp.act) is not nn.GELU or block.mlp.act.approximate != "none":
            raise refuse(f"{where} MLP is not timm's Mlp with exact GELU")
        if block.attn.qkv.out_features != 3 * block.norm1.normalized_shape[0]:
            raise refuse(f"{where} has a head dim other than its width / heads (timm's head_dim=)")
        if getattr(block, "always_partition", False) or getattr(block, "dynamic_mask", False):
            raise refuse(f"{where} uses always_partition or dynamic masks")


def swin_arch_from_timm(model: nn.Module, name: str) -> SwinArch:
    """Read the `SwinArch` of a timm SwinTransformer (meta device is fine); one-line UserError otherwise."""
    from timm.models.swin_transformer import SwinTransformer

    refuse = _refusal(name)
    if type(model) is not SwinTransformer:
        raise refuse(f"its class is {type(model).__name__}")
    if getattr(model, "dynamic_img_size", False):
        raise refuse("dynamic image size")
    if model.global_pool != "avg":
        raise refuse(f"global_pool {model.global_pool!r} (supported: avg)")
    stages = list(model.layers)
    for s, stage in enumerate(stages):
        _check_stage(s, stage, refuse)
    first = [stage.blocks[0] for stage in stages]
    norms = [model.norm] + [m for stage in stages for b in stage.blocks for m in (b.norm1, b.norm2)]
    norms += [stage.downsample.norm for stage in stages[1:]]
    norms += [] if isinstance(model.patch_embed.norm, nn.Identity) else [model.patch_embed.norm]
    if not all(type(m) is nn.LayerNorm and m.elementwise_affine and m.bias is not None for m in norms):
        raise refuse("a norm other than an affine LayerNorm with bias")
    eps = {m.eps for m in norms}
    if len(eps) != 1:
        raise refuse("LayerNorms with different eps")
    widths = [stage.blocks[0].norm1.normalized_shape[0] for stage in stages]
    ratios = {b.mlp.fc1.out_features / w for b, w in zip(first, widths)}
    if len(ratios) != 1:
        raise refuse("MLP ratios that differ between stages")
    head = getattr(model.head, "fc", model.head)
    patch_norm = not isinstance(model.patch_embed.norm, nn.Identity)
    return SwinArch(
        depths=tuple(len(stage.blocks) for stage in stages), widths=tuple(widths),
        num_heads=tuple(b.attn.num_heads for b in first),
        window_sizes=tuple(_square(w, "window", refuse) for w in model._ref_window_sizes)
        if hasattr(model, "_ref_window_sizes") else tuple(_square(b.window_size, "window", refuse) for b in first),
        mlp_ratio=ratios.pop(), img_size=_square(model.patch_embed.img_size, "image size", refuse),
        patch_size=_square(model.patch_embed.patch_size, "patch size", refuse),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0, patch_norm=patch_norm,
        qkv_bias=first[0].attn.qkv.bias is not None, norm_eps=float(eps.pop()),
    )


SWIN_V2_MISSING = ("model {name!r} is not supported: Swin V2's cosine attention with a learned logit scale and its "
                   "log-spaced continuous position bias (an MLP) have no gates or deploy form here yet; "
                   "use a Swin V1 name (swin_tiny_patch4_window7_224, ...)")

