"""FLOPs (multiply-accumulates, the DeiT papers' "FLOPs") and parameter counts.

Two independent counts:
  * `analytic_macs` -- closed form of a (gated or deploy) ViT or Swin from its structure;
  * `ptflops_macs`  -- ptflops' module hooks on a real deploy model, plus hooks for what
    ptflops does not see: the attention matmuls and softmax inside SDPA (`AttentionCore`,
    `WindowAttentionCore`), LayerScale's `x * gamma` and the pooling (plain tensor ops).
Both follow ptflops' conventions: a Linear costs rows * (in * out + out), a conv
positions * (k*k*in*out + out) (the `+ out` terms only with a bias), a LayerNorm 1 per
element (ptflops' norm hook looks for `affine`, which LayerNorm lacks; qk_norm's LayerNorms
over the head dim included), GELU 1 per element, the attention 2 * h * N^2 * head_dim for
q k^T and attn v plus h * N^2 for the softmax; and, by the same one-per-element rule,
LayerScale 1 per element of its branch output and the average pooling 1 per element of the
patch tokens it averages (the class-token pooling is free).

A Swin block attends within windows of N = window^2 tokens: per window 2 * h * N^2 * head_dim
for q k^T and attn v, h * N^2 for the softmax, h * N^2 for adding the relative position bias and,
in a shifted block, another h * N^2 for adding the shift mask (1 per attention logit each, as timm
adds them one after the other; the bias table lookup, the rolls and the window partitions are free).
Patch merging costs its norm over 4 C per merged token and its reduction Linear; the average
pooling 1 per element of the final grid; the patch embedding conv has a bias.

Run `python -m pruning.flops --model deit_base_patch16_224 [--mask FILE]` (or a Swin name such as
swin_tiny_patch4_window7_224) to print the table before/after pruning.
"""
import sys
from typing import Dict, List, Optional, Union

import torch

from models.swin_arch import SwinArch
from models.swin_base import ClassifierHead, block_layout
from models.swin_deploy import WindowAttentionCore, merge_bias_stages
from models import Arch, arch_of, build_deploy_model, gated_name_of
from models.vit_base import LayerScale, TokenPool
from models.vit_deploy import AttentionCore
from models.mask import PruneMask, SwinMask
from utils import Parser, UserError, cli_entry, error_line, option_flags


Width = Optional[Union[int, List[int]]]  # a ViT's width, or a Swin's width per stage


def _projection_macs(arch: Arch, n: int, d: int, a: int) -> int:
    """norm1, qkv and proj of an attention with a = heads * head_dim channels, n tokens of width d."""
    return n * d + n * (d * 3 * a + (3 * a if arch.qkv_bias else 0)) + n * (a * d + d)


def _mlp_macs(n: int, d: int, m: int) -> int:
    """norm2, fc1, GELU, fc2 of an MLP of m neurons, n tokens of width d."""
    return n * d + n * (d * m + m) + n * m + n * (m * d + d)


def _projection_params(arch: Arch, d: int, a: int) -> int:
    return 2 * d + d * 3 * a + (3 * a if arch.qkv_bias else 0) + a * d + d  # norm1, qkv, proj


def _mlp_params(d: int, m: int) -> int:
    return 2 * d + d * m + m + m * d + d  # norm2, fc1, fc2


def analytic_macs(arch: Arch, width: Width = None, heads: Optional[List[int]] = None,
                  hidden: Optional[List[int]] = None) -> Dict[str, int]:
    """MACs of one image, split 'attn' (norm1..proj, ls1), 'mlp' (norm2..fc2, ls2), 'other'
    (stem, norm_pre, patch merging, pooling, final norm, classifiers) and 'total'. Defaults
    describe the unpruned model; a Swin's `width` is one per stage.

    n counts every token (class, distillation, registers, patches); an emptied branch costs nothing.
    """
    if arch.family == "swin":
        return _swin_macs(arch, *_swin_structure(arch, width, heads, hidden))
    d = arch.embed_dim if width is None else width
    heads = [arch.num_heads] * arch.depth if heads is None else heads
    hidden = [arch.mlp_hidden] * arch.depth if hidden is None else hidden
    n, hd, patch = arch.num_tokens, arch.head_dim, arch.patch_size
    layer_scale = n * d if arch.init_values is not None else 0  # x * gamma: 1 per element
    attn = mlp = 0
    for h, m in zip(heads, hidden):
        if h:
            a = h * hd
            attn += _projection_macs(arch, n, d, a)              # norm1, qkv, proj
            attn += 2 * n * a if arch.qk_norm else 0             # q_norm, k_norm (1 per element of q, k)
            attn += 2 * h * n * n * hd + h * n * n               # q k^T, attn v, softmax
            attn += layer_scale                                  # ls1
        if m:
            mlp += _mlp_macs(n, d, m) + layer_scale              # norm2, fc1, GELU, fc2, ls2
    heads_out = 2 if arch.distilled else 1
    other = arch.num_patches * (arch.in_chans * patch * patch * d + (d if arch.patch_bias else 0))  # patch embedding
    other += n * d if arch.pre_norm else 0                      # norm_pre
    other += arch.num_patches * d if arch.global_pool == "avg" else 0  # mean of the patch tokens
    other += d if arch.fc_norm else n * d                       # fc_norm on the pooled vector, else norm
    other += heads_out * (d * arch.num_classes + arch.num_classes)
    return {"attn": attn, "mlp": mlp, "other": other, "total": attn + mlp + other}


def _swin_structure(arch: SwinArch, width: Width, heads: Optional[List[int]], hidden: Optional[List[int]]):
    """(width per stage, heads per block, hidden per block), the unpruned ones where not given."""
    return (list(arch.widths) if width is None else list(width), arch.block_heads() if heads is None else list(heads),
            arch.block_hidden() if hidden is None else list(hidden))


def _swin_macs(arch: SwinArch, width: List[int], heads: List[int], hidden: List[int]) -> Dict[str, int]:
    res, hd, attn, mlp = arch.resolutions, arch.head_dim, 0, 0
    for (s, window, shift), h, m in zip(block_layout(arch), heads, hidden):
        n, d = res[s] ** 2, width[s]                 # tokens of the image, width of the stage
        logits = h * n * window * window             # (n / N windows) * h * N^2
        if h:
            attn += _projection_macs(arch, n, d, h * hd)              # norm1, qkv, proj
            attn += 2 * logits * hd + logits                          # q k^T, attn v, softmax
            attn += logits * (2 if shift else 1)                      # position bias, shift mask
        if m:
            mlp += _mlp_macs(n, d, m)
    n = res[0] ** 2
    other = n * (arch.in_chans * arch.patch_size ** 2 * width[0] + width[0])  # patch embedding conv
    other += n * width[0] if arch.patch_norm else 0                           # patch_embed.norm
    for s, bias in enumerate(merge_bias_stages(arch, heads)):
        if s:  # patch merging: norm over 4 C per merged token, reduction
            n, c = res[s] ** 2, 4 * width[s - 1]
            other += n * c + n * (c * width[s] + (width[s] if bias else 0))
    n, d = res[-1] ** 2, width[-1]
    other += n * d + n * d + d * arch.num_classes + arch.num_classes         # norm, mean over the grid, head
    return {"attn": attn, "mlp": mlp, "other": other, "total": attn + mlp + other}


def mask_macs(arch: Arch, mask: Optional[Union[PruneMask, SwinMask]] = None) -> Dict[str, int]:
    """Analytic MACs of the gated model under `mask` (= those of its deploy model)."""
    return analytic_macs(arch) if mask is None else analytic_macs(arch, **mask.structure())


def analytic_params(arch: Arch, width: Width = None, heads: Optional[List[int]] = None,
                    hidden: Optional[List[int]] = None) -> Dict[str, int]:
    """Parameters of the deploy model (gates excluded), split like `analytic_macs`."""
    if arch.family == "swin":
        return _swin_params(arch, *_swin_structure(arch, width, heads, hidden))
    d = arch.embed_dim if width is None else width
    heads = [arch.num_heads] * arch.depth if heads is None else heads
    hidden = [arch.mlp_hidden] * arch.depth if hidden is None else hidden
    layer_scale = d if arch.init_values is not None else 0  # gamma of a kept branch
    attn = mlp = 0
    for h, m in zip(heads, hidden):
        a = h * arch.head_dim
        if h:
            attn += _projection_params(arch, d, a)            # norm1, qkv, proj
            attn += 4 * arch.head_dim if arch.qk_norm else 0  # q_norm, k_norm (over the head dim)
            attn += layer_scale                               # ls1
        if m:
            mlp += _mlp_params(d, m) + layer_scale            # norm2, fc1, fc2, ls2
    other = arch.in_chans * arch.patch_size ** 2 * d + (d if arch.patch_bias else 0)  # patch embedding
    other += arch.num_prefix_tokens * d + arch.num_pos_tokens * d  # class/dist/register tokens, pos_embed
    other += 2 * d if arch.pre_norm else 0                          # norm_pre
    other += 2 * d                                                  # norm, or fc_norm
    other += (2 if arch.distilled else 1) * (d * arch.num_classes + arch.num_classes)  # heads
    return {"attn": attn, "mlp": mlp, "other": other, "total": attn + mlp + other}


def _swin_params(arch: SwinArch, width: List[int], heads: List[int], hidden: List[int]) -> Dict[str, int]:
    attn = mlp = 0
    for (s, window, _), h, m in zip(block_layout(arch), heads, hidden):
        if h:  # norm1, qkv, proj, relative_position_bias_table
            attn += _projection_params(arch, width[s], h * arch.head_dim) + (2 * window - 1) ** 2 * h
        if m:
            mlp += _mlp_params(width[s], m)
    other = arch.in_chans * arch.patch_size ** 2 * width[0] + width[0]  # patch embedding conv
    other += 2 * width[0] if arch.patch_norm else 0                     # patch_embed.norm
    for s, bias in enumerate(merge_bias_stages(arch, heads)):
        if s:  # patch merging: norm, reduction
            other += 2 * 4 * width[s - 1] + 4 * width[s - 1] * width[s] + (width[s] if bias else 0)
    other += 2 * width[-1] + width[-1] * arch.num_classes + arch.num_classes  # norm, head
    return {"attn": attn, "mlp": mlp, "other": other, "total": attn + mlp + other}


def mask_params(arch: Arch, mask: Optional[Union[PruneMask, SwinMask]] = None) -> int:
    """Total parameters of the deploy model of `mask` (the unpruned model without one)."""
    return mask_param_parts(arch, mask)["total"]


def mask_param_parts(arch: Arch, mask: Optional[Union[PruneMask, SwinMask]] = None) -> Dict[str, int]:
    return analytic_params(arch) if mask is None else analytic_params(arch, **mask.structure())


def _attention_core_hook(module, inputs, output) -> None:
    q, k, _ = inputs[:3]
    b, h, n, hd = q.shape
    m = k.shape[-2]
    module.__flops__ += int(b * h * n * m * (2 * hd + 1))


def _window_attention_core_hook(module, inputs, output) -> None:
    _attention_core_hook(module, inputs, output)
    q, k, _, bias = inputs
    logits = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[-2]
    # the position bias; a bias of its own per window (not broadcast) carries the shift mask as well
    module.__flops__ += int(logits * (2 if bias.shape[0] > 1 else 1))


def _classifier_head_hook(module, inputs, output) -> None:
    module.__flops__ += int(inputs[0].numel())  # the mean over the grid
    fc = module.fc  # ptflops skips the children of a hooked module: fc by ptflops' Linear rule
    if isinstance(fc, torch.nn.Linear):
        module.__flops__ += int(output.numel() * (fc.in_features + (1 if fc.bias is not None else 0)))


def _layer_scale_hook(module, inputs, output) -> None:
    module.__flops__ += int(output.numel())  # x * gamma


def _token_pool_hook(module, inputs, output) -> None:
    if module.kind == "avg":  # the mean over the patch tokens (the prefix tokens are skipped)
        b, n, d = inputs[0].shape
        module.__flops__ += int(b * (n - module.num_prefix_tokens) * d)


CUSTOM_HOOKS = {AttentionCore: _attention_core_hook, LayerScale: _layer_scale_hook, TokenPool: _token_pool_hook,
                WindowAttentionCore: _window_attention_core_hook, ClassifierHead: _classifier_head_hook}


def ptflops_macs(model: torch.nn.Module, arch: Arch) -> Dict[str, int]:
    """ptflops count of a deploy (or timm-like) model for one image: {'total', 'params'}."""
    from ptflops import get_model_complexity_info  # here: seconds to import, needed by this count only

    was_training = model.training
    macs, params = get_model_complexity_info(
        model, (arch.in_chans, arch.img_size, arch.img_size), as_strings=False, print_per_layer_stat=False,
        custom_modules_hooks=CUSTOM_HOOKS,
        backend="pytorch", backend_specific_config={"count_functional": False},
    )
    model.train(was_training)
    if macs is None:
        raise RuntimeError("ptflops failed to count the model")
    return {"total": int(macs), "params": int(params)}


def format_table(arch: Arch, mask: Optional[Union[PruneMask, SwinMask]]) -> List[str]:
    """Lines comparing the unpruned and the pruned model (analytic counts): MACs and params,
    attention / MLP / total."""
    before, after = mask_macs(arch), mask_macs(arch, mask)
    p_before, p_after = mask_param_parts(arch), mask_param_parts(arch, mask)
    unit, scale = ("GMACs", 1e9) if before["total"] >= 1e9 else ("MMACs", 1e6)
    lines = [f"{'':16s}{'before':>10s}{'after':>12s}{'reduction':>11s}"]
    for label, b, a, s in ((unit, before, after, scale), ("params (M)", p_before, p_after, 1e6)):
        for part in ("attn", "mlp", "total"):
            red = 1 - a[part] / b[part] if b[part] else 0.0
            lines.append(f"{part + ' ' + label:16s}{b[part] / s:10.3f}{a[part] / s:12.3f}{red:10.2%}")
    return lines


def arch_for_mask(name: str, mask: Optional[Union[PruneMask, SwinMask]], img_size: Optional[int] = None,
                  num_classes: Optional[int] = None, log=print) -> Arch:
    """The architecture to count `mask` on: the class count and input size the mask records
    (main.py writes them), unless given explicitly (then the given values win, and a conflict is
    logged); the model's defaults for what neither gives."""
    chosen = {}
    for key, given in (("num_classes", num_classes), ("img_size", img_size)):
        recorded = getattr(mask, key, None) if mask is not None else None
        if given is not None and recorded is not None and given != recorded:
            log(f"note: {key} {given} given explicitly; the mask records {recorded} (counting with {given})")
        chosen[key] = given if given is not None else recorded
    return arch_of(name, **chosen)


def _shape_words(arch: Arch) -> str:
    if arch.family == "swin":
        return f"grid {arch.resolutions[0]}x{arch.resolutions[0]}  depths {list(arch.depths)}"
    return f"tokens {arch.num_tokens}"


def _main(argv=None) -> None:
    parser = Parser(description="Print FLOPs (MACs) and params of a ViT or Swin before/after pruning.")
    parser.add_argument("--model", default="deit_base_patch16_224", help="gated or _deploy model name")
    parser.add_argument("--mask", default="", help="mask JSON or gated checkpoint (checkpoint_pruned_00.pth)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="image size (default: the one the mask records, else the model's)")
    parser.add_argument("--nb-classes", type=int, default=None,
                        help="classes of the classifier (default: the count the mask records, else the model's)")
    parser.add_argument("--ptflops", action="store_true", help="also count the deploy model with ptflops")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="read a --mask checkpoint that needs full unpickling (RUNS CODE FROM THE FILE)")
    args = parser.parse_args(argv)
    name = gated_name_of(args.model)
    try:
        patch = arch_of(name).patch_size
    except UserError as err:
        raise UserError(f"--model: {err}") from None
    if args.input_size is not None and not (args.input_size >= 1 and args.input_size % patch == 0):
        raise UserError(f"--input-size must be a positive multiple of the patch size {patch} of --model {args.model}, "
                        f"got {args.input_size}")
    if args.input_size is not None:  # a Swin needs more (every stage's grid a multiple of its window)
        try:
            arch_of(name, img_size=args.input_size)
        except UserError as err:
            raise UserError(f"--input-size {args.input_size}: {err}") from None
    if args.nb_classes is not None and args.nb_classes < 1:
        raise UserError(f"--nb-classes must be >= 1, got {args.nb_classes}")
    mask = None
    try:
        if args.mask:
            mask = PruneMask.load(args.mask, trust=args.trust_checkpoint)
        arch = arch_for_mask(name, mask, img_size=args.input_size, num_classes=args.nb_classes)
        if mask is not None:
            mask.check_fits(arch)
    except UserError as err:  # name the flag; a field the error names is shown as this parser's flag
        raise UserError(f"--mask: {error_line(err, option_flags(parser))}") from None
    print(f"model {name}  {_shape_words(arch)}  classes {arch.num_classes}  mask {args.mask or '(none: unpruned)'}")
    for line in format_table(arch, mask):
        print(line)
    if args.ptflops:
        model = build_deploy_model(arch, mask)
        counted = ptflops_macs(model.eval(), arch)
        print(f"ptflops: {counted['total'] / 1e9:.4f} GMACs, {counted['params'] / 1e6:.3f} M params (deploy model)")


if __name__ == "__main__":
    cli_entry(_main)(sys.argv[1:])
