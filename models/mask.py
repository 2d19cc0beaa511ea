"""The pruning mask (docs/METHOD.md sections 1 and 5): which heads, MLP neurons and embedding
channels are kept, in one explicit JSON format validated on load.
"""
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from utils import UserError, atomic_write_text, load_torch_file, state_dict_of

MASK_FORMAT = "savit-mask"
MASK_VERSION = 1

HEAD_GATE_KEY = "blocks.{}.attn.attn_gate.weight"
MLP_GATE_KEY = "blocks.{}.mlp.hidden_gate1.weight"
EMBED_GATE_KEY = "res_gate.weight"
EMBED_GATE_ALIAS_KEY = "blocks.{}.res_gate.weight"
SWIN_HEAD_GATE_KEY = "layers.{}.blocks.{}.attn.attn_gate.weight"
SWIN_MLP_GATE_KEY = "layers.{}.blocks.{}.mlp.hidden_gate1.weight"
SWIN_EMBED_GATE_KEY = "layers.{}.res_gate.weight"

COMPONENTS = ("heads", "mlp", "embed")  # component (layer) 0, 1, 2 of the reference


class _MaskCommon:
    """What the masks of both families share; each names its units in groups (`groups()`): a group
    is a block for heads and MLP neurons, the whole embedding vector (ViT) or one stage (Swin)."""

    source: str

    def groups(self) -> Dict[str, Tuple[List[int], List[List[int]]]]:
        """Per component: (units in each group, kept indices of each group)."""
        raise NotImplementedError

    @classmethod
    def _built(cls, d: dict, source: str, fields: Callable[[], dict]):
        """`cls(**fields(), ...)` plus the fields both families store, validated; a missing or
        ill-typed entry of the dict `d` is a one-line UserError."""
        where = source or "mask"
        try:
            mask = cls(**fields(), model=str(d.get("model", "")), source=source,
                       num_classes=_optional_positive(d, "num_classes", where),
                       img_size=_optional_positive(d, "img_size", where))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: malformed mask ({type(err).__name__}: {err})")
        mask.validate()
        return mask

    @classmethod
    def load(cls, path: str, trust: bool = False):
        """Read a mask from a JSON file or from a gated checkpoint (`.pth`; `trust`: see
        `utils.load_torch_file`)."""
        if not path or not os.path.isfile(path):
            raise UserError(f"mask file not found: {path!r}")
        with open(path, "rb") as f:
            head = f.read(1)
        if head in (b"{", b" ", b"\n"):
            try:
                with open(path) as f:
                    d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"mask file {path!r} is not valid JSON ({err})")
            return PruneMask.from_dict(d, source=path)
        return PruneMask.from_checkpoint(load_torch_file(path, "masked model", trust=trust), source=path)

    @classmethod
    def from_checkpoint(cls, checkpoint, source: str = ""):
        """The mask of a loaded checkpoint: its explicit 'mask' entry, else its 0/1 gates."""
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("mask"), dict):
            return PruneMask.from_dict(checkpoint["mask"], source=source)
        mask = PruneMask.from_gate_state_dict(state_dict_of(checkpoint, source), source=source)
        arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
        if isinstance(arch, dict):  # a gated checkpoint without a mask entry may still record its model
            mask.num_classes = _optional_positive(arch, "num_classes", source or "checkpoint")
            mask.img_size = _optional_positive(arch, "img_size", source or "checkpoint")
        return mask

    def for_model(self, num_classes: Optional[int], img_size: Optional[int]):
        """A copy that records the classifier size and input size of the model this mask belongs to."""
        return replace(self, num_classes=None if num_classes is None else int(num_classes),
                       img_size=None if img_size is None else int(img_size))

    def to_json(self) -> str:
        """JSON text with one line per block (index lists are long: 3072 neurons a block in DeiT-B)."""
        fields = []
        for key, value in self.to_dict().items():
            if isinstance(value, list) and value and isinstance(value[0], list):
                blocks = ",\n  ".join(json.dumps(b) for b in value)
                fields.append(f' "{key}": [\n  {blocks}\n ]')
            else:
                fields.append(f" {json.dumps(key)}: {json.dumps(value)}")
        return "{\n" + ",\n".join(fields) + "\n}\n"

    def save_json(self, path: str) -> None:
        atomic_write_text(self.to_json(), path)

    def apply_to(self, gated_model) -> None:
        """Set the gates of a gated model to this mask (checks that it fits first)."""
        self.check_fits(gated_model.arch)
        with torch.no_grad():
            for key, value in self.gate_vectors().items():
                gated_model.get_parameter(key).copy_(value)

    def validate(self) -> None:
        where = self.source or "mask"
        for c, (sizes, kept) in self.groups().items():
            if len(kept) != len(sizes):
                raise UserError(f"{where}: mask has {len(kept)} {c} lists for {len(sizes)} "
                                f"{'stages' if c == 'embed' else 'blocks'}")
            for i, (n, idx) in enumerate(zip(sizes, kept)):
                what = "embed" if c == "embed" and len(sizes) == 1 else f"{_GROUP[c]} {i} {c}"
                _check_indices(idx, n, f"{where}: {what}")
                if c == "embed" and not idx:
                    raise UserError(f"{where}: every embedding channel{'' if len(sizes) == 1 else f' of stage {i}'} "
                                    f"is pruned")

    def kept_counts(self) -> Dict[str, int]:
        return {c: sum(map(len, kept)) for c, (_, kept) in self.groups().items()}

    def total_counts(self) -> Dict[str, int]:
        return {c: sum(sizes) for c, (sizes, _) in self.groups().items()}

    def summary_lines(self) -> List[str]:
        kept, total = self.kept_counts(), self.total_counts()
        lines = [f"pruned {c}: {total[c] - kept[c]}/{total[c]}" for c in COMPONENTS]
        groups = self.groups()
        (head_sizes, heads), (mlp_sizes, mlp) = groups["heads"], groups["mlp"]
        for i, (h, n_h, m, n_m) in enumerate(zip(heads, head_sizes, mlp, mlp_sizes)):
            lines.append(f"block {i:2d}: heads pruned {n_h - len(h)}/{n_h}, mlp pruned {n_m - len(m)}/{n_m}")
        sizes, embed = groups["embed"]
        if len(sizes) > 1:
            lines += [f"stage {s}: embed pruned {n - len(e)}/{n}" for s, (n, e) in enumerate(zip(sizes, embed))]
        return lines


_GROUP = {"heads": "block", "mlp": "block", "embed": "stage"}


@dataclass
class PruneMask(_MaskCommon):
    """Kept units per block, saved as JSON:

        {"format": "savit-mask", "version": 1, "model": "deit_base_patch16_224",
         "embed_dim": 768, "depth": 12, "num_heads": 12, "head_dim": 64, "mlp_hidden": 3072,
         "heads": [[kept head indices of block 0], ...], "mlp": [[kept neuron indices of block 0], ...],
         "embed": [kept embedding channels], "num_classes": 1000, "img_size": 224}

    `num_classes` and `img_size` (optional: older masks lack them) record the model the mask was
    made on, so that every tool counts the same parameters and FLOPs; they do not change which units
    are kept. It can also be read from a gated checkpoint (0/1 gates); never guessed from zero weights.
    """

    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    heads: List[List[int]]
    mlp: List[List[int]]
    embed: List[int]
    model: str = ""
    source: str = field(default="", compare=False)
    # the model the mask was made on (context for counts, not part of the mask itself)
    num_classes: Optional[int] = field(default=None, compare=False)
    img_size: Optional[int] = field(default=None, compare=False)

    # -- construction ------------------------------------------------------------
    @classmethod
    def full(cls, arch, model: str = "") -> "PruneMask":
        """The mask that keeps everything of `arch` (a `ViTArch`, or a `SwinArch`: a `SwinMask`)."""
        if getattr(arch, "family", "vit") == "swin":
            return SwinMask.full(arch, model)
        return cls(
            embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, head_dim=arch.head_dim,
            mlp_hidden=arch.mlp_hidden,
            heads=[list(range(arch.num_heads)) for _ in range(arch.depth)],
            mlp=[list(range(arch.mlp_hidden)) for _ in range(arch.depth)],
            embed=list(range(arch.embed_dim)), model=model,
        )

    @classmethod
    def from_gate_state_dict(cls, state_dict: Dict[str, torch.Tensor], model: str = "", source: str = "") -> "PruneMask":
        """Read the 0/1 gate values of a gated state dict (ours or the reference's)."""
        where = source or "state dict"
        if SWIN_EMBED_GATE_KEY.format(0) in state_dict:
            return SwinMask.from_gate_state_dict(state_dict, model, source)
        if EMBED_GATE_KEY not in state_dict:
            raise UserError(f"{where}: no gate '{EMBED_GATE_KEY}' -- not a gated (pruned) SAViT checkpoint")
        depth = 0
        while HEAD_GATE_KEY.format(depth) in state_dict:
            depth += 1
        if depth == 0:
            raise UserError(f"{where}: no gate '{HEAD_GATE_KEY.format(0)}' -- not a gated (pruned) SAViT checkpoint")

        embed_dim = state_dict[EMBED_GATE_KEY].numel()
        num_heads = state_dict[HEAD_GATE_KEY.format(0)].numel()
        mlp_hidden = state_dict[MLP_GATE_KEY.format(0)].numel() if MLP_GATE_KEY.format(0) in state_dict else 0

        def kept(key: str, size: int) -> List[int]:
            return _kept_gate(state_dict, key, size, where)

        embed = kept(EMBED_GATE_KEY, embed_dim)
        heads = [kept(HEAD_GATE_KEY.format(i), num_heads) for i in range(depth)]
        mlp = [kept(MLP_GATE_KEY.format(i), mlp_hidden) for i in range(depth)]
        for i in range(depth):  # the reference's per-block alias must agree with the shared gate
            alias = state_dict.get(EMBED_GATE_ALIAS_KEY.format(i))
            if alias is not None and kept(EMBED_GATE_ALIAS_KEY.format(i), embed_dim) != embed:
                raise UserError(f"{where}: gate '{EMBED_GATE_ALIAS_KEY.format(i)}' differs from '{EMBED_GATE_KEY}'")
        qkv = state_dict.get("blocks.0.attn.qkv.weight")
        head_dim = qkv.shape[0] // (3 * num_heads) if qkv is not None else embed_dim // num_heads
        mask = cls(embed_dim=embed_dim, depth=depth, num_heads=num_heads, head_dim=head_dim,
                   mlp_hidden=mlp_hidden, heads=heads, mlp=mlp, embed=embed,
                   model=model, source=source)
        mask.validate()
        return mask

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "PruneMask":
        where = source or "mask"
        if not isinstance(d, dict) or d.get("format") != MASK_FORMAT:
            raise UserError(f"{where}: not a SAViT mask (expected a JSON object with \"format\": \"{MASK_FORMAT}\")")
        if d.get("version") != MASK_VERSION:
            raise UserError(f"{where}: mask version {d.get('version')!r} is not supported (expected {MASK_VERSION})")
        if d.get("family", "vit") == "swin":
            return SwinMask.from_dict(d, source)
        return cls._built(d, source, lambda: dict(
            embed_dim=int(d["embed_dim"]), depth=int(d["depth"]), num_heads=int(d["num_heads"]),
            head_dim=int(d["head_dim"]), mlp_hidden=int(d["mlp_hidden"]), heads=[[int(i) for i in b] for b in d["heads"]],
            mlp=[[int(i) for i in b] for b in d["mlp"]], embed=[int(i) for i in d["embed"]]))

    # -- output ------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain Python values only (ints, str, lists): safe for JSON and `torch.load(weights_only=True)`."""
        d = {"format": MASK_FORMAT, "version": MASK_VERSION, "model": str(self.model),
             "embed_dim": int(self.embed_dim), "depth": int(self.depth), "num_heads": int(self.num_heads),
             "head_dim": int(self.head_dim), "mlp_hidden": int(self.mlp_hidden),
             "heads": [[int(i) for i in b] for b in self.heads], "mlp": [[int(i) for i in b] for b in self.mlp],
             "embed": [int(i) for i in self.embed]}
        for key in ("num_classes", "img_size"):
            if getattr(self, key) is not None:
                d[key] = int(getattr(self, key))
        return d

    def structure(self) -> Dict[str, object]:
        """Kept width, heads per block and MLP neurons per block: `DeployViT`'s keyword arguments."""
        return {"width": len(self.embed), "heads": [len(h) for h in self.heads], "hidden": [len(m) for m in self.mlp]}

    def gate_vectors(self) -> Dict[str, torch.Tensor]:
        """0/1 gate tensors under the gated model's state-dict keys (alias keys included)."""
        out = {EMBED_GATE_KEY: _ones_at(self.embed_dim, self.embed)}
        for i in range(self.depth):
            out[HEAD_GATE_KEY.format(i)] = _ones_at(self.num_heads, self.heads[i])
            out[MLP_GATE_KEY.format(i)] = _ones_at(self.mlp_hidden, self.mlp[i])
            out[EMBED_GATE_ALIAS_KEY.format(i)] = out[EMBED_GATE_KEY]
        return out

    # -- checks ------------------------------------------------------------------
    def groups(self) -> Dict[str, Tuple[List[int], List[List[int]]]]:
        return {"heads": ([self.num_heads] * self.depth, self.heads), "mlp": ([self.mlp_hidden] * self.depth, self.mlp),
                "embed": ([self.embed_dim], [self.embed])}

    def validate(self) -> None:
        if len(self.heads) != self.depth or len(self.mlp) != self.depth:
            raise UserError(f"{self.source or 'mask'}: mask has {len(self.heads)} head lists and {len(self.mlp)} MLP "
                            f"lists for depth {self.depth}")
        super().validate()

    def check_fits(self, arch) -> None:
        """Raise if this mask was not made for a model of architecture `arch`."""
        where = self.source or "mask"
        if getattr(arch, "family", "vit") != "vit":
            raise UserError(f"{where}: a ViT mask does not fit a {arch.family} model")
        ours = (self.embed_dim, self.depth, self.num_heads, self.head_dim, self.mlp_hidden)
        theirs = (arch.embed_dim, arch.depth, arch.num_heads, arch.head_dim, arch.mlp_hidden)
        if ours != theirs:
            raise UserError(f"{where}: mask is for (embed_dim, depth, heads, head_dim, mlp_hidden)={ours} "
                            f"but the model has {theirs}")


@dataclass
class SwinMask(_MaskCommon):
    """The mask of a Swin: kept heads and MLP neurons per block (blocks numbered in stage order)
    and kept embedding channels per stage, saved as JSON like `PruneMask` with `"family": "swin"`:

        {"format": "savit-mask", "version": 1, "family": "swin", "model": "swin_tiny_patch4_window7_224",
         "depths": [2, 2, 6, 2], "widths": [96, 192, 384, 768], "num_heads": [3, 6, 12, 24], "head_dim": 32,
         "mlp_hidden": [384, 768, 1536, 3072], "heads": [[...] per block], "mlp": [[...] per block],
         "embed": [[kept channels of stage 0], ...], "num_classes": 1000, "img_size": 224}
    """

    depths: List[int]
    widths: List[int]
    num_heads: List[int]
    head_dim: int
    mlp_hidden: List[int]
    heads: List[List[int]]
    mlp: List[List[int]]
    embed: List[List[int]]
    model: str = ""
    source: str = field(default="", compare=False)
    num_classes: Optional[int] = field(default=None, compare=False)
    img_size: Optional[int] = field(default=None, compare=False)

    family = "swin"

    def _block_stages(self) -> List[int]:
        return [s for s, d in enumerate(self.depths) for _ in range(d)]

    def _block_keys(self, template: str) -> List[str]:
        return [template.format(s, b) for s, d in enumerate(self.depths) for b in range(d)]

    @classmethod
    def full(cls, arch, model: str = "") -> "SwinMask":
        hidden = [arch.stage_hidden(s) for s in range(len(arch.depths))]
        return cls(depths=list(arch.depths), widths=list(arch.widths), num_heads=list(arch.num_heads),
                   head_dim=arch.head_dim, mlp_hidden=hidden,
                   heads=[list(range(h)) for h in arch.block_heads()], mlp=[list(range(m)) for m in arch.block_hidden()],
                   embed=[list(range(w)) for w in arch.widths], model=model)

    @classmethod
    def from_gate_state_dict(cls, state_dict: Dict[str, torch.Tensor], model: str = "", source: str = "") -> "SwinMask":
        where = source or "state dict"
        depths: List[int] = []
        while SWIN_EMBED_GATE_KEY.format(len(depths)) in state_dict:
            s, d = len(depths), 0
            while SWIN_HEAD_GATE_KEY.format(s, d) in state_dict:
                d += 1
            depths.append(d)
        if not depths or not all(depths):
            raise UserError(f"{where}: a Swin stage without gated blocks -- not a gated (pruned) SAViT checkpoint")
        widths = [state_dict[SWIN_EMBED_GATE_KEY.format(s)].numel() for s in range(len(depths))]
        num_heads = [state_dict[SWIN_HEAD_GATE_KEY.format(s, 0)].numel() for s in range(len(depths))]
        hidden = [state_dict[SWIN_MLP_GATE_KEY.format(s, 0)].numel() if SWIN_MLP_GATE_KEY.format(s, 0) in state_dict
                  else 0 for s in range(len(depths))]
        qkv = state_dict.get("layers.0.blocks.0.attn.qkv.weight")
        head_dim = qkv.shape[0] // (3 * num_heads[0]) if qkv is not None else widths[0] // num_heads[0]
        mask = cls(depths=depths, widths=widths, num_heads=num_heads, head_dim=head_dim, mlp_hidden=hidden,
                   heads=[], mlp=[], embed=[], model=model, source=source)
        stages = mask._block_stages()
        mask.heads = [_kept_gate(state_dict, k, num_heads[s], where)
                      for k, s in zip(mask._block_keys(SWIN_HEAD_GATE_KEY), stages)]
        mask.mlp = [_kept_gate(state_dict, k, hidden[s], where) for k, s in zip(mask._block_keys(SWIN_MLP_GATE_KEY), stages)]
        mask.embed = [_kept_gate(state_dict, SWIN_EMBED_GATE_KEY.format(s), w, where) for s, w in enumerate(widths)]
        mask.validate()
        return mask

    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> "SwinMask":
        def ints(key: str) -> List[int]:
            return [int(v) for v in d[key]]

        def lists(key: str) -> List[List[int]]:
            return [[int(i) for i in b] for b in d[key]]

        return cls._built(d, source, lambda: dict(
            depths=ints("depths"), widths=ints("widths"), num_heads=ints("num_heads"), head_dim=int(d["head_dim"]),
            mlp_hidden=ints("mlp_hidden"), heads=lists("heads"), mlp=lists("mlp"), embed=lists("embed")))

    def to_dict(self) -> dict:
        d = {"format": MASK_FORMAT, "version": MASK_VERSION, "family": self.family, "model": str(self.model),
             "depths": [int(v) for v in self.depths], "widths": [int(v) for v in self.widths],
             "num_heads": [int(v) for v in self.num_heads], "head_dim": int(self.head_dim),
             "mlp_hidden": [int(v) for v in self.mlp_hidden],
             "heads": [[int(i) for i in b] for b in self.heads], "mlp": [[int(i) for i in b] for b in self.mlp],
             "embed": [[int(i) for i in b] for b in self.embed]}
        for key in ("num_classes", "img_size"):
            if getattr(self, key) is not None:
                d[key] = int(getattr(self, key))
        return d

    def structure(self) -> Dict[str, object]:
        """Kept width per stage, heads and MLP neurons per block: `DeploySwin`'s keyword arguments."""
        return {"width": [len(e) for e in self.embed], "heads": [len(h) for h in self.heads],
                "hidden": [len(m) for m in self.mlp]}

    def gate_vectors(self) -> Dict[str, torch.Tensor]:
        stages = self._block_stages()
        out = {SWIN_EMBED_GATE_KEY.format(s): _ones_at(w, e) for s, (w, e) in enumerate(zip(self.widths, self.embed))}
        for key, s, kept in zip(self._block_keys(SWIN_HEAD_GATE_KEY), stages, self.heads):
            out[key] = _ones_at(self.num_heads[s], kept)
        for key, s, kept in zip(self._block_keys(SWIN_MLP_GATE_KEY), stages, self.mlp):
            out[key] = _ones_at(self.mlp_hidden[s], kept)
        return out

    def groups(self) -> Dict[str, Tuple[List[int], List[List[int]]]]:
        stages = self._block_stages()
        return {"heads": ([self.num_heads[s] for s in stages], self.heads),
                "mlp": ([self.mlp_hidden[s] for s in stages], self.mlp), "embed": (list(self.widths), self.embed)}

    def validate(self) -> None:
        where = self.source or "mask"
        stages = len(self.depths)
        if not (len(self.widths) == len(self.num_heads) == len(self.mlp_hidden) == stages):
            raise UserError(f"{where}: Swin mask needs one width, head count and MLP width per stage: {stages} "
                            f"stages, {len(self.widths)} widths, {len(self.num_heads)} head counts, "
                            f"{len(self.mlp_hidden)} MLP widths")
        if len(self.embed) != stages:
            raise UserError(f"{where}: mask has {len(self.embed)} embed lists for {stages} stages")
        super().validate()

    def check_fits(self, arch) -> None:
        where = self.source or "mask"
        if getattr(arch, "family", "vit") != "swin":
            raise UserError(f"{where}: a Swin mask does not fit a {getattr(arch, 'family', 'vit')} model")
        ours = (list(self.depths), list(self.widths), list(self.num_heads), self.head_dim, list(self.mlp_hidden))
        theirs = (list(arch.depths), list(arch.widths), list(arch.num_heads), arch.head_dim,
                  [arch.stage_hidden(s) for s in range(len(arch.depths))])
        if ours != theirs:
            raise UserError(f"{where}: mask is for (depths, widths, heads, head_dim, mlp_hidden)={ours} "
                            f"but the model has {theirs}")


def _optional_positive(d: dict, key: str, where: str) -> Optional[int]:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _ones_at(n: int, idx: List[int]) -> torch.Tensor:
    g = torch.zeros(n)
    g[idx] = 1.0
    return g


def _kept_gate(state_dict: Dict[str, torch.Tensor], key: str, size: int, where: str) -> List[int]:
    """Indices where a 0/1 gate of a state dict is 1 (checked: present, of `size` values, only 0 and 1)."""
    if key not in state_dict:
        raise UserError(f"{where}: missing gate '{key}'")
    g = state_dict[key].detach().float().flatten()
    if g.numel() != size:
        raise UserError(f"{where}: gate '{key}' has {g.numel()} values, expected {size}")
    if not torch.all((g == 0) | (g == 1)):
        raise UserError(f"{where}: gate '{key}' has values other than 0 and 1")
    return torch.nonzero(g).flatten().tolist()


def _check_indices(idx: List[int], n: int, what: str) -> None:
    if any(i < 0 or i >= n for i in idx):
        bad = next(i for i in idx if i < 0 or i >= n)
        raise UserError(f"{what}: index {bad} out of range [0, {n})")
    if len(set(idx)) != len(idx):
        raise UserError(f"{what}: duplicate indices")
    if list(idx) != sorted(idx):
        raise UserError(f"{what}: indices must be sorted")
