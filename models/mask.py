"""The pruning mask (docs/METHOD.md sections 1 and 5): which heads, MLP neurons and embedding
channels are kept, in one explicit JSON format validated on load.
"""
import json
import os
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch

from utils import UserError, atomic_write_text, load_torch_file, state_dict_of

MASK_FORMAT = "savit-mask"
MASK_VERSION = 1

HEAD_GATE_KEY = "blocks.{}.attn.attn_gate.weight"
MLP_GATE_KEY = "blocks.{}.mlp.hidden_gate1.weight"
EMBED_GATE_KEY = "res_gate.weight"
EMBED_GATE_ALIAS_KEY = "blocks.{}.res_gate.weight"

COMPONENTS = ("heads", "mlp", "embed")  # component (layer) 0, 1, 2 of the reference


@dataclass
class PruneMask:
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
        """The mask that keeps everything of `arch` (a `ViTArch`)."""
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
            if key not in state_dict:
                raise UserError(f"{where}: missing gate '{key}'")
            g = state_dict[key].detach().float().flatten()
            if g.numel() != size:
                raise UserError(f"{where}: gate '{key}' has {g.numel()} values, expected {size}")
            if not torch.all((g == 0) | (g == 1)):
                raise UserError(f"{where}: gate '{key}' has values other than 0 and 1")
            return torch.nonzero(g).flatten().tolist()

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
        try:
            mask = cls(embed_dim=int(d["embed_dim"]), depth=int(d["depth"]), num_heads=int(d["num_heads"]),
                       head_dim=int(d["head_dim"]), mlp_hidden=int(d["mlp_hidden"]),
                       heads=[[int(i) for i in b] for b in d["heads"]], mlp=[[int(i) for i in b] for b in d["mlp"]],
                       embed=[int(i) for i in d["embed"]], model=str(d.get("model", "")), source=source,
                       num_classes=_optional_positive(d, "num_classes", where),
                       img_size=_optional_positive(d, "img_size", where))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: malformed mask ({type(err).__name__}: {err})")
        mask.validate()
        return mask

    @classmethod
    def load(cls, path: str, trust: bool = False) -> "PruneMask":
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
            return cls.from_dict(d, source=path)
        return cls.from_checkpoint(load_torch_file(path, "masked model", trust=trust), source=path)

    @classmethod
    def from_checkpoint(cls, checkpoint, source: str = "") -> "PruneMask":
        """The mask of a loaded checkpoint: its explicit 'mask' entry, else its 0/1 gates."""
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get("mask"), dict):
            return cls.from_dict(checkpoint["mask"], source=source)
        mask = cls.from_gate_state_dict(state_dict_of(checkpoint, source), source=source)
        arch = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
        if isinstance(arch, dict):  # a gated checkpoint without a mask entry may still record its model
            mask.num_classes = _optional_positive(arch, "num_classes", source or "checkpoint")
            mask.img_size = _optional_positive(arch, "img_size", source or "checkpoint")
        return mask

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

    def for_model(self, num_classes: Optional[int], img_size: Optional[int]) -> "PruneMask":
        """A copy that records the classifier size and input size of the model this mask belongs to."""
        return replace(self, num_classes=None if num_classes is None else int(num_classes),
                       img_size=None if img_size is None else int(img_size))

    def structure(self) -> Dict[str, object]:
        """Kept width, heads per block and MLP neurons per block: `DeployViT`'s keyword arguments."""
        return {"width": len(self.embed), "heads": [len(h) for h in self.heads], "hidden": [len(m) for m in self.mlp]}

    def to_json(self) -> str:
        """JSON text with one line per block (index lists are long: 3072 neurons a block in DeiT-B)."""
        fields = []
        for key, value in self.to_dict().items():
            if key in ("heads", "mlp"):
                blocks = ",\n  ".join(json.dumps(b) for b in value)
                fields.append(f' "{key}": [\n  {blocks}\n ]')
            else:
                fields.append(f" {json.dumps(key)}: {json.dumps(value)}")
        return "{\n" + ",\n".join(fields) + "\n}\n"

    def save_json(self, path: str) -> None:
        atomic_write_text(self.to_json(), path)

    def gate_vectors(self) -> Dict[str, torch.Tensor]:
        """0/1 gate tensors under the gated model's state-dict keys (alias keys included)."""
        def ones_at(n: int, idx: List[int]) -> torch.Tensor:
            g = torch.zeros(n)
            g[idx] = 1.0
            return g

        out = {EMBED_GATE_KEY: ones_at(self.embed_dim, self.embed)}
        for i in range(self.depth):
            out[HEAD_GATE_KEY.format(i)] = ones_at(self.num_heads, self.heads[i])
            out[MLP_GATE_KEY.format(i)] = ones_at(self.mlp_hidden, self.mlp[i])
            out[EMBED_GATE_ALIAS_KEY.format(i)] = out[EMBED_GATE_KEY]
        return out

    def apply_to(self, gated_model) -> None:
        """Set the gates of a `GatedViT` to this mask (checks that it fits first)."""
        self.check_fits(gated_model.arch)
        with torch.no_grad():
            for key, value in self.gate_vectors().items():
                if key.startswith("blocks.") and key.endswith("res_gate.weight"):
                    continue  # alias of the shared embedding gate
                gated_model.get_parameter(key).copy_(value)

    # -- checks ------------------------------------------------------------------
    def validate(self) -> None:
        where = self.source or "mask"
        if len(self.heads) != self.depth or len(self.mlp) != self.depth:
            raise UserError(f"{where}: mask has {len(self.heads)} head lists and {len(self.mlp)} MLP lists "
                            f"for depth {self.depth}")
        for name, lists, n in (("heads", self.heads, self.num_heads), ("mlp", self.mlp, self.mlp_hidden)):
            for i, idx in enumerate(lists):
                _check_indices(idx, n, f"{where}: block {i} {name}")
        _check_indices(self.embed, self.embed_dim, f"{where}: embed")
        if not self.embed:
            raise UserError(f"{where}: every embedding channel is pruned")

    def check_fits(self, arch) -> None:
        """Raise if this mask was not made for a model of architecture `arch`."""
        where = self.source or "mask"
        ours = (self.embed_dim, self.depth, self.num_heads, self.head_dim, self.mlp_hidden)
        theirs = (arch.embed_dim, arch.depth, arch.num_heads, arch.head_dim, arch.mlp_hidden)
        if ours != theirs:
            raise UserError(f"{where}: mask is for (embed_dim, depth, heads, head_dim, mlp_hidden)={ours} "
                            f"but the model has {theirs}")

    # -- summaries ---------------------------------------------------------------
    def kept_counts(self) -> Dict[str, int]:
        return {"heads": sum(map(len, self.heads)), "mlp": sum(map(len, self.mlp)), "embed": len(self.embed)}

    def total_counts(self) -> Dict[str, int]:
        return {"heads": self.depth * self.num_heads, "mlp": self.depth * self.mlp_hidden, "embed": self.embed_dim}

    def summary_lines(self) -> List[str]:
        kept, total = self.kept_counts(), self.total_counts()
        lines = [f"pruned {c}: {total[c] - kept[c]}/{total[c]}" for c in COMPONENTS]
        for i in range(self.depth):
            lines.append(f"block {i:2d}: heads pruned {self.num_heads - len(self.heads[i])}/{self.num_heads}, "
                         f"mlp pruned {self.mlp_hidden - len(self.mlp[i])}/{self.mlp_hidden}")
        return lines


def _optional_positive(d: dict, key: str, where: str) -> Optional[int]:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _check_indices(idx: List[int], n: int, what: str) -> None:
    if any(i < 0 or i >= n for i in idx):
        bad = next(i for i in idx if i < 0 or i >= n)
        raise UserError(f"{what}: index {bad} out of range [0, {n})")
    if len(set(idx)) != len(idx):
        raise UserError(f"{what}: duplicate indices")
    if list(idx) != sorted(idx):
        raise UserError(f"{what}: indices must be sorted")
