"""The mask: round trips checkpoint -> JSON -> gates, the reference's gated checkpoints, bad masks."""
import json

import pytest
import torch

from conftest import MASK_CASES, mask_case, random_subset_mask, randomize_
from models import GatedViT, arch_of, create_model
from models.vit_arch import ViTArch
from models.loading import load_pretrained
from models.mask import MASK_FORMAT, MASK_VERSION, PruneMask
from utils import UserError


def gate_entries(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if "gate" in k}


# -- round trips ------------------------------------------------------------------------

ARCH_NAMES = ["deit_test_patch8_32", "deit_test_distilled_patch8_32", "deit_demo_patch8_32"]


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_round_trip_checkpoint_json_gates(tmp_path, name, case):
    arch = arch_of(name)
    mask = mask_case(arch, case, embed=True)
    gated = create_model(name)
    mask.apply_to(gated)
    # the gates hold exactly the mask, alias keys included (independent of gate_vectors)
    sd = gated.state_dict()
    for i in range(arch.depth):
        assert torch.nonzero(sd[f"blocks.{i}.attn.attn_gate.weight"]).flatten().tolist() == mask.heads[i]
        assert torch.nonzero(sd[f"blocks.{i}.mlp.hidden_gate1.weight"]).flatten().tolist() == mask.mlp[i]
        assert torch.equal(sd[f"blocks.{i}.res_gate.weight"], sd["res_gate.weight"])
    assert torch.nonzero(sd["res_gate.weight"]).flatten().tolist() == mask.embed

    ckpt = tmp_path / "checkpoint_pruned_00.pth"
    torch.save({"model": sd}, ckpt)
    from_ckpt = PruneMask.load(str(ckpt))
    assert from_ckpt == mask

    js = tmp_path / "mask.json"
    from_ckpt.save_json(str(js))
    raw = json.loads(js.read_text())
    assert raw["format"] == MASK_FORMAT and raw["version"] == MASK_VERSION
    assert raw["heads"] == mask.heads and raw["mlp"] == mask.mlp and raw["embed"] == mask.embed
    from_json = PruneMask.load(str(js))
    assert from_json == mask

    fresh = create_model(name)
    from_json.apply_to(fresh)
    fresh_gates, gates = gate_entries(fresh.state_dict()), gate_entries(sd)
    assert fresh_gates.keys() == gates.keys()
    for key in gates:
        assert torch.equal(fresh_gates[key], gates[key]), key


def test_checkpoint_with_explicit_mask_entry(tmp_path):
    arch = arch_of("deit_test_patch8_32")
    mask = random_subset_mask(arch, 5, embed=True)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": create_model("deit_test_patch8_32").state_dict(), "mask": mask.to_dict()}, path)
    assert PruneMask.load(str(path)) == mask  # the explicit entry wins over the (all-ones) gates


def reference_checkpoint(arch: ViTArch, seed: int):
    """A gated state dict as the reference writes it, built by hand: timm-named weights plus
    0/1 gates, with the per-block alias of the embedding gate. Returns (state dict, kept)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in randomize_(GatedViT(arch), seed).state_dict().items() if "gate" not in k}
    head_gates = (torch.rand(arch.depth, arch.num_heads, generator=g) < 0.6).float()
    head_gates[1] = 0  # one block without heads
    mlp_gates = (torch.rand(arch.depth, arch.mlp_hidden, generator=g) < 0.5).float()
    mlp_gates[0] = 0  # one block without neurons
    embed_gate = (torch.rand(arch.embed_dim, generator=g) < 0.7).float()
    embed_gate[0] = 1
    for i in range(arch.depth):
        sd[f"blocks.{i}.attn.attn_gate.weight"] = head_gates[i].clone()
        sd[f"blocks.{i}.mlp.hidden_gate1.weight"] = mlp_gates[i].clone()
        sd[f"blocks.{i}.res_gate.weight"] = embed_gate.clone()
    sd["res_gate.weight"] = embed_gate.clone()
    kept = {
        "heads": [[j for j in range(arch.num_heads) if head_gates[i, j] == 1] for i in range(arch.depth)],
        "mlp": [[j for j in range(arch.mlp_hidden) if mlp_gates[i, j] == 1] for i in range(arch.depth)],
        "embed": [j for j in range(arch.embed_dim) if embed_gate[j] == 1],
    }
    return sd, kept


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "model_entry"])
@pytest.mark.parametrize("name", ["deit_test_patch8_32", "deit_test_distilled_patch8_32"])
def test_reference_format_checkpoint_loads(tmp_path, name, wrap):
    arch = arch_of(name)
    sd, kept = reference_checkpoint(arch, seed=7)
    path = tmp_path / "checkpoint_pruned_00.pth"
    torch.save({"model": sd} if wrap else sd, path)

    mask = PruneMask.load(str(path))
    assert mask.heads == kept["heads"] and mask.mlp == kept["mlp"] and mask.embed == kept["embed"]
    assert (mask.embed_dim, mask.depth, mask.num_heads, mask.head_dim, mask.mlp_hidden) == (
        arch.embed_dim, arch.depth, arch.num_heads, arch.head_dim, arch.mlp_hidden)

    model = create_model(name)
    load_pretrained(model, str(path))
    loaded = model.state_dict()
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    # the shared gate really is shared: every block multiplies by the loaded vector
    assert all(b.res_gate.weight is model.res_gate.weight for b in model.blocks)
    assert not any(p.requires_grad for p in model.gate_parameters())


# -- bad masks --------------------------------------------------------------------------

def _json_mask(tmp_path, **changes) -> str:
    d = random_subset_mask(arch_of("deit_test_patch8_32"), 0, embed=True).to_dict()
    d.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return str(path)


def _heads(changed_block: int, value: list) -> list:
    heads = [[0, 1], [0, 2, 3], [1]]
    heads[changed_block] = value
    return heads


@pytest.mark.parametrize("changes, expected", [
    ({"heads": [[0], [1]]}, ["2 head lists", "depth 3"]),
    ({"heads": _heads(1, [0, 4])}, ["block 1 heads", "index 4 out of range"]),
    ({"heads": _heads(2, [-1])}, ["block 2 heads", "index -1"]),
    ({"heads": _heads(1, [2, 1])}, ["block 1 heads", "sorted"]),
    ({"heads": _heads(0, [1, 1])}, ["block 0 heads", "duplicate"]),
    ({"mlp": [[0], [3, 256], [5]]}, ["block 1 mlp", "index 256"]),
    ({"embed": [0, 64]}, ["embed", "index 64"]),
    ({"embed": []}, ["embed", "every embedding channel"]),
    ({"format": "something"}, ["not a SAViT mask", MASK_FORMAT]),
    ({"version": 7}, ["version 7"]),
    ({"heads": "abc"}, ["malformed mask"]),
], ids=["depth", "out_of_range", "negative", "unsorted", "duplicate", "mlp_range", "embed_range",
        "embed_empty", "format", "version", "malformed"])
def test_bad_json_mask(tmp_path, changes, expected):
    path = _json_mask(tmp_path, **changes)
    with pytest.raises(UserError) as err:
        PruneMask.load(path)
    message = str(err.value)
    assert path in message
    for part in expected:
        assert part in message, message


def test_not_json_and_missing_mask(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="broken.json.*not valid JSON"):
        PruneMask.load(str(bad))
    with pytest.raises(UserError, match="mask file not found.*nothere.json"):
        PruneMask.load(str(tmp_path / "nothere.json"))
    text = tmp_path / "mask.pth"
    text.write_text("hello")
    with pytest.raises(UserError, match="mask.pth.*not a readable torch file"):
        PruneMask.load(str(text))


def test_mask_of_another_model_does_not_fit():
    mask = random_subset_mask(arch_of("deit_test_patch8_32"), 0)
    for other in ("deit_demo_patch8_32", "deit_tiny_patch16_224"):
        with pytest.raises(UserError, match="mask is for.*but the model has"):
            mask.apply_to(create_model(other))
    with pytest.raises(UserError, match="depth"):
        mask.check_fits(arch_of("deit_test_patch8_32").with_options(depth=2))


@pytest.mark.parametrize("key, value, expected", [
    ("blocks.1.mlp.hidden_gate1.weight", "half", "'blocks.1.mlp.hidden_gate1.weight' has values other than 0 and 1"),
    ("blocks.2.attn.attn_gate.weight", "short", "'blocks.2.attn.attn_gate.weight' has 3 values, expected 4"),
    ("blocks.0.res_gate.weight", "flip", "'blocks.0.res_gate.weight' differs from 'res_gate.weight'"),
    ("blocks.1.mlp.hidden_gate1.weight", "drop", "missing gate 'blocks.1.mlp.hidden_gate1.weight'"),
    ("res_gate.weight", "drop", "not a gated"),
])
def test_bad_gated_checkpoint(tmp_path, key, value, expected):
    sd, _ = reference_checkpoint(arch_of("deit_test_patch8_32"), seed=3)
    if value == "half":
        sd[key] = sd[key] * 0.5
    elif value == "short":
        sd[key] = sd[key][:-1]
    elif value == "flip":
        sd[key] = 1 - sd[key]
    else:
        del sd[key]
    path = tmp_path / "gated.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as err:
        PruneMask.load(str(path))
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
