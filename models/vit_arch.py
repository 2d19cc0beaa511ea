"""The architecture record of a prunable ViT, read from timm's own configuration of a name.

`ViTArch` describes the unpruned network; the gated and the deploy models are built from it.
`arch_from_timm` reads it off a timm `VisionTransformer` (or DeiT's distilled variant) built
on the meta device (no weights are allocated, nothing is downloaded), and refuses, in one line,
anything that is not made of timm's standard pre-norm `Block`: the gates of SAViT are defined
for that block only.
"""
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Union

import timm
import torch
import torch.nn as nn
from timm.layers import LayerScale, Mlp, PatchEmbed
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from models.swin_arch import SWIN_V2_MISSING, SwinArch, swin_arch_from_timm
from utils import UserError

POOLS = ("token", "avg")


@dataclass(frozen=True)
class ViTArch:
    """The unpruned architecture of a ViT (head dim = embed_dim / num_heads).

    The defaults are DeiT's, so the `arch` entry of a DeiT checkpoint written before the
    other fields existed still reads as the same model.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    distilled: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # the timm VisionTransformer options beyond DeiT's
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False     # pos_embed covers the patches only (DeiT III)
    global_pool: str = "token"       # 'token' (class token) or 'avg' (mean of the patch tokens)
    fc_norm: bool = False            # the final norm sits after the pooling (then `norm` is absent)
    pre_norm: bool = False           # `norm_pre` after the embedding; the patch conv has no bias then
    init_values: Optional[float] = None  # LayerScale (`ls1`, `ls2`) when set
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-6

    family = "vit"

    def __post_init__(self):
        if self.global_pool not in POOLS:
            raise UserError(f"global_pool {self.global_pool!r} is not supported (expected one of {POOLS})")
        if self.global_pool == "token" and not self.class_token:
            raise UserError("global_pool 'token' needs the class token")
        if self.distilled and (not self.class_token or self.global_pool != "token" or self.fc_norm
                               or self.reg_tokens or self.no_embed_class):
            raise UserError("a distilled model reads its class and distillation tokens: it takes no avg pooling, "
                            "fc_norm, register tokens or no_embed_class")
        if self.embed_dim % self.num_heads:
            raise UserError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))  # exact for a ratio read back as hidden / width

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """Class, distillation and register tokens, in that order before the patches."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def num_pos_tokens(self) -> int:
        """Rows of `pos_embed`: the patches only with `no_embed_class`."""
        return self.num_patches if self.no_embed_class else self.num_tokens

    @property
    def patch_bias(self) -> bool:
        return not self.pre_norm

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "ViTArch":
        """The `arch` entry of a checkpoint (unknown keys are an error, missing ones take the defaults)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{source}: 'arch' entry has unknown fields {unknown} (written by a newer version?)")
        return cls(**d)

    def with_options(self, **kwargs) -> "ViTArch":
        """Copy with the usual `create_model` keyword arguments applied.

        Accepts timm/DeiT-style kwargs (`num_classes`, `img_size`, `drop_rate`,
        `drop_path_rate`, ...); `None` values and `pretrained=False` are ignored.
        """
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if kwargs.pop("pretrained", False):
            raise UserError("pretrained=True is not supported offline: load the weights from a file")
        kwargs.pop("drop_block_rate", None)
        if "input_size" in kwargs:
            kwargs["img_size"] = kwargs.pop("input_size")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unexpected model arguments: {unknown}")
        arch = replace(self, **kwargs)
        if arch.img_size % arch.patch_size:
            raise UserError(f"input size {arch.img_size} is not a multiple of the patch size {arch.patch_size}")
        return arch


def _square(value, what: str, name: str) -> int:
    value = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if value[0] != value[1]:
        raise UserError(f"model {name!r}: non-square {what} {value} is not supported")
    return int(value[0])


def _exactly(module: nn.Module, cls: type) -> bool:
    return type(module) is cls


def _refusal(name: str):
    def refuse(what: str) -> UserError:
        return UserError(f"model {name!r} is not supported: {what}. SAViT here prunes timm VisionTransformers "
                         f"built from the standard pre-norm Block (ViT, DeiT, DeiT III, register and avg-pool ViTs) "
                         f"and timm's SwinTransformer")

    return refuse


def _check_stem_and_pooling(model: nn.Module, distilled: bool, refuse) -> None:
    """The class, patch embedding, position embedding, pooling and final norm."""
    if not (distilled or _exactly(model, VisionTransformer)):
        raise refuse(f"its class is {type(model).__name__}, not timm's VisionTransformer")
    if not _exactly(model.patch_embed, PatchEmbed) or not isinstance(model.patch_embed.norm, nn.Identity):
        raise refuse(f"its patch embedding is a {type(model.patch_embed).__name__} with a norm or another layout")
    if getattr(model, "dynamic_img_size", False) or getattr(model.patch_embed, "dynamic_img_pad", False):
        raise refuse("dynamic image size / padding")
    if model.pos_embed is None:
        raise refuse("it has no learned absolute position embedding")
    if not isinstance(getattr(model, "patch_drop", nn.Identity()), nn.Identity):
        raise refuse("patch dropout")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in POOLS:
        raise refuse(f"global_pool {model.global_pool!r} (supported: {', '.join(POOLS)})")
    if getattr(model, "pool_include_prefix", False):
        raise refuse("pooling that includes the prefix tokens")
    if distilled and (model.no_embed_class or model.num_reg_tokens):
        raise refuse("a distilled model with no_embed_class or register tokens")
    if isinstance(model.norm, nn.Identity) == isinstance(model.fc_norm, nn.Identity):
        raise refuse("no final norm (final_norm=False)")


def _check_block(where: str, b: nn.Module, first: nn.Module, embed_dim: int, refuse) -> None:
    """Block `b` is timm's standard Block, of the same shape and options as block 0 (`first`)."""
    if not _exactly(b, Block):
        raise refuse(f"{where} is a {type(b).__name__}, not timm's standard Block")
    if not _exactly(b.attn, Attention):
        raise refuse(f"{where} attention is a {type(b.attn).__name__} (RoPE, differential, ... attention)")
    if not _exactly(b.mlp, Mlp) or not _exactly(b.mlp.act, nn.GELU) or b.mlp.act.approximate != "none":
        raise refuse(f"{where} MLP is a {type(b.mlp).__name__} with {type(getattr(b.mlp, 'act', None)).__name__}"
                     f" (only Mlp with exact GELU is supported)")
    if not isinstance(getattr(b.attn, "norm", nn.Identity()), nn.Identity) or \
            not isinstance(getattr(b.mlp, "norm", nn.Identity()), nn.Identity):
        raise refuse(f"{where} has a norm inside its attention or MLP (scale_attn_norm / scale_mlp_norm)")
    if b.attn.proj.bias is None or b.mlp.fc1.bias is None or b.mlp.fc2.bias is None:
        raise refuse(f"{where} has a projection without bias")
    if b.attn.num_heads * b.attn.head_dim != embed_dim:
        raise refuse(f"{where} attention width {b.attn.num_heads * b.attn.head_dim} is not the embedding width")
    for ls in (b.ls1, b.ls2):
        if not (isinstance(ls, nn.Identity) or _exactly(ls, LayerScale)):
            raise refuse(f"{where} has a {type(ls).__name__} residual scale")

    def options(block: nn.Module) -> tuple:
        return (block.attn.num_heads, block.mlp.fc1.out_features, block.attn.qkv.bias is None, type(block.ls1),
                type(block.attn.q_norm))

    if options(b) != options(first):
        raise refuse(f"{where} differs in shape or options from block 0")


def _norm_eps(model: nn.Module, refuse) -> float:
    """The one eps of every norm (each an affine LayerNorm with bias, or absent)."""
    norms = [model.norm_pre, model.norm, model.fc_norm]
    for b in model.blocks:
        norms += [b.norm1, b.norm2, b.attn.q_norm, b.attn.k_norm]
    norms = [m for m in norms if not isinstance(m, nn.Identity)]
    eps = {m.eps for m in norms}
    if any(not (isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None) for m in norms) \
            or len(eps) != 1:
        raise refuse("a norm other than an affine LayerNorm with bias, or LayerNorms with different eps")
    return float(eps.pop())


def _layer_scale_init(block: nn.Module) -> Optional[float]:
    if isinstance(block.ls1, nn.Identity):
        return None
    init_values = getattr(block.ls1, "init_values", None)
    return init_values if init_values is not None else float(block.ls1.gamma.flatten()[0])  # older timm: gamma only


def arch_from_timm(model: nn.Module, name: str) -> ViTArch:
    """Read the `ViTArch` of a timm VisionTransformer; one-line UserError for anything else.

    `model` may live on the meta device: only module types, shapes and plain attributes are read.
    """
    refuse = _refusal(name)
    distilled = _exactly(model, VisionTransformerDistilled)
    _check_stem_and_pooling(model, distilled, refuse)
    first = model.blocks[0]
    for i, b in enumerate(model.blocks):
        _check_block(f"block {i}", b, first, model.embed_dim, refuse)
    norm_eps = _norm_eps(model, refuse)
    hidden = first.mlp.fc1.out_features
    mlp_ratio = hidden / model.embed_dim
    if int(round(model.embed_dim * mlp_ratio)) != hidden:
        raise refuse(f"MLP width {hidden} is not embed_dim * mlp_ratio")
    if (model.patch_embed.proj.bias is None) != (not isinstance(model.norm_pre, nn.Identity)):
        raise refuse("a patch embedding bias that does not follow pre_norm (bias exactly when no norm_pre)")
    head = model.head
    return ViTArch(
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=first.attn.num_heads, mlp_ratio=mlp_ratio,
        img_size=_square(model.patch_embed.img_size, "image size", name),
        patch_size=_square(model.patch_embed.patch_size, "patch size", name),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0, distilled=distilled, class_token=model.cls_token is not None, reg_tokens=int(model.num_reg_tokens),
        no_embed_class=bool(model.no_embed_class), global_pool=model.global_pool,
        fc_norm=not isinstance(model.fc_norm, nn.Identity), pre_norm=not isinstance(model.norm_pre, nn.Identity),
        init_values=_layer_scale_init(first), qkv_bias=first.attn.qkv.bias is not None,
        qk_norm=not isinstance(first.attn.q_norm, nn.Identity), norm_eps=norm_eps,
    )


def timm_arch(name: str, build=None) -> Union[ViTArch, SwinArch]:
    """The `ViTArch` (or `SwinArch`) of timm's configuration of `name` (or of the timm model
    `build()` returns), built on the meta device with `pretrained=False`."""
    def make() -> nn.Module:
        return build() if build is not None else timm.create_model(name, pretrained=False)

    try:
        with torch.device("meta"):
            model = make()
    except Exception:  # some timm versions compute values while building (`.item()` fails on meta)
        model = make()
    if type(model).__name__.startswith("SwinTransformerV2"):
        raise UserError(SWIN_V2_MISSING.format(name=name))
    if isinstance(model, SwinTransformer):
        return swin_arch_from_timm(model, name)
    if any(isinstance(m, LayerScale) and not hasattr(m, "init_values") for m in model.modules()):
        model = make()  # older timm: the LayerScale init value lives only in gamma, which meta tensors lack
    return arch_from_timm(model, name)
