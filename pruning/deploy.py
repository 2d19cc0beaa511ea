"""Mask + gated weights -> the physically smaller DeiT (docs/METHOD.md sections 1 and 5).

`deploy_state_dict` is a pure function: it slices tensors and touches no model.
"""
from typing import Dict, Optional, Tuple

import torch

from models.deit_base import DeiTArch
from models.deit_deploy import DeployDeiT
from pruning.mask import PruneMask

Tensor = torch.Tensor


def _qkv_rows(heads, head_dim: int, num_heads: int) -> Tensor:
    """Rows of the fused qkv projection that belong to `heads` (q block, k block, v block)."""
    per_head = torch.arange(head_dim)
    one = torch.cat([h * head_dim + per_head for h in heads]) if heads else torch.zeros(0, dtype=torch.long)
    width = num_heads * head_dim
    return torch.cat([one + s * width for s in range(3)])


def _proj_cols(heads, head_dim: int) -> Tensor:
    per_head = torch.arange(head_dim)
    return torch.cat([h * head_dim + per_head for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def deploy_structure(mask: PruneMask) -> dict:
    return {"width": len(mask.embed), "heads": [len(h) for h in mask.heads], "hidden": [len(m) for m in mask.mlp]}


def deploy_state_dict(mask: PruneMask, gated: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Slice a gated (or plain DeiT) state dict down to the kept heads, neurons and channels.

    Gate entries are dropped; every other tensor keeps its key. A block branch whose
    units are all pruned loses all its tensors (its norm included), but not its effect:
    the gated model still adds that branch's output bias (`proj(0) = proj.bias`, and
    `fc2(GELU(0)) = fc2.bias`). Nothing reads the residual stream between the previous
    writer and that branch, so the bias is folded into the previous kept branch's output
    bias (or into `pos_embed` before block 0): exact in eval mode, no extra layer.
    """
    e = torch.tensor(mask.embed, dtype=torch.long)
    hd, H = mask.head_dim, mask.num_heads
    out: Dict[str, Tensor] = {}

    def take(key: str, dim_index: Dict[int, Tensor]) -> None:
        t = gated[key]
        for dim, idx in dim_index.items():
            t = t.index_select(dim, idx)
        out[key] = t.clone()

    take("patch_embed.proj.weight", {0: e})
    take("patch_embed.proj.bias", {0: e})
    take("cls_token", {2: e})
    if "dist_token" in gated:
        take("dist_token", {2: e})
    take("pos_embed", {2: e})
    writer = "pos_embed"  # last tensor that adds a constant to the residual stream

    def fold_bias(key: str) -> None:
        bias = gated[key].index_select(0, e).to(out[writer].dtype)
        out[writer] = out[writer] + (bias if writer != "pos_embed" else bias.view(1, 1, -1))

    for i in range(mask.depth):
        p = f"blocks.{i}."
        # in stream order: attention branch, then MLP branch
        if not mask.heads[i]:
            fold_bias(p + "attn.proj.bias")
        else:
            rows = _qkv_rows(mask.heads[i], hd, H)
            take(p + "norm1.weight", {0: e})
            take(p + "norm1.bias", {0: e})
            take(p + "attn.qkv.weight", {0: rows, 1: e})
            take(p + "attn.qkv.bias", {0: rows})
            take(p + "attn.proj.weight", {0: e, 1: _proj_cols(mask.heads[i], hd)})
            take(p + "attn.proj.bias", {0: e})
            writer = p + "attn.proj.bias"
        if not mask.mlp[i]:
            fold_bias(p + "mlp.fc2.bias")
        else:
            n = torch.tensor(mask.mlp[i], dtype=torch.long)
            take(p + "norm2.weight", {0: e})
            take(p + "norm2.bias", {0: e})
            take(p + "mlp.fc1.weight", {0: n, 1: e})
            take(p + "mlp.fc1.bias", {0: n})
            take(p + "mlp.fc2.weight", {0: e, 1: n})
            take(p + "mlp.fc2.bias", {0: e})
            writer = p + "mlp.fc2.bias"
    take("norm.weight", {0: e})
    take("norm.bias", {0: e})
    for head in ("head", "head_dist"):
        if head + ".weight" in gated:
            take(head + ".weight", {1: e})
            take(head + ".bias", {})
    return out


def build_deploy_model(arch: DeiTArch, mask: PruneMask, gated_state_dict: Dict[str, Tensor]) -> DeployDeiT:
    """The smaller DeiT holding the kept weights of `gated_state_dict` (strict load)."""
    mask.check_fits(arch)
    model = DeployDeiT(arch, **deploy_structure(mask))
    model.load_state_dict(deploy_state_dict(mask, gated_state_dict), strict=True)
    return model


def recorded_arch(checkpoint, source: str = "") -> Optional[DeiTArch]:
    """The `arch` a checkpoint of this project records (None when it records none)."""
    from utils import UserError

    d = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if not isinstance(d, dict):
        return None
    try:
        return DeiTArch(**d)
    except TypeError as err:
        raise UserError(f"checkpoint {source!r}: its 'arch' entry is not a DeiT architecture ({err})") from None


def load_masked_model(arch: Optional[DeiTArch], masked_model: str, weights: str = "",
                      trust: bool = False) -> Tuple[PruneMask, DeployDeiT]:
    """The deploy model of `--masked_model`, with its weights.

    Args:
        arch: architecture of the unpruned model the mask was made for; None: the `arch`
            the checkpoint records. A checkpoint's classifier must have `arch.num_classes`
            outputs (a mismatch is an error, never a silently new classifier).
        masked_model: a gated checkpoint (ours or the reference's `checkpoint_pruned_00.pth`:
            mask and weights in one file) or a mask JSON file.
        weights: with a mask JSON, the file holding the gated or plain DeiT weights to slice
            (starting weights: a classifier of another size is replaced, as with --finetune).
        trust: allow files that need full unpickling (`--trust_checkpoint`).

    Returns:
        (mask, model).
    """
    from models.deit_gated import GatedDeiT
    from models.loading import adapt_state_dict, check_keys
    from utils import UserError, load_torch_file, state_dict_of

    if masked_model.endswith(".json"):
        if not weights:
            raise UserError(f"--masked_model {masked_model!r} is a mask JSON: pass the weights to slice with --finetune")
        if arch is None:
            raise UserError(f"--masked_model {masked_model!r} is a mask JSON: the model's architecture must be given")
        mask = PruneMask.load(masked_model)
        source = weights
        checkpoint = load_torch_file(source, "weights", trust=trust)
    else:
        source = masked_model
        checkpoint = load_torch_file(source, "--masked_model", trust=trust)
        mask = PruneMask.from_checkpoint(checkpoint, source)
        recorded = recorded_arch(checkpoint, source)
        if arch is None:
            if recorded is None:
                raise UserError(f"--masked_model {source!r} records no architecture ('arch'): pass the model's")
            arch = recorded
        head = state_dict_of(checkpoint, source).get("head.weight")
        classes = head.shape[0] if head is not None else (recorded.num_classes if recorded is not None else None)
        if classes is not None and classes != arch.num_classes:
            raise UserError(f"--masked_model {source!r} was trained for {classes} classes but {arch.num_classes} "
                            f"are requested (num_classes / the data set's class count)")
    mask.check_fits(arch)
    # the weights go through the same checks and pos_embed adaptation as any DeiT checkpoint
    reference = GatedDeiT(arch)
    sd = adapt_state_dict(state_dict_of(checkpoint, source), reference, source)
    check_keys(sd, reference, source)
    return mask, build_deploy_model(arch, mask, sd)
