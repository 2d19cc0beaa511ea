"""Loading official-format (timm-key) DeiT checkpoints into the gated models, and bad checkpoints."""
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import images, randomize_, timm_twin
from models import create_model
from models.loading import load_pretrained
from utils import UserError

ATOL = 1e-5


def official_checkpoint(name: str, seed: int = 0, **overrides):
    """timm's own model for the architecture of `name` (with `overrides`), random weights."""
    from models import arch_of

    return randomize_(timm_twin(arch_of(name, **overrides)), seed).eval()


def deit_resample(pos: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """DeiT's fine-tuning recipe (facebookresearch/deit main.py), written out independently."""
    old = int((pos.shape[1] - prefix) ** 0.5)
    tokens = pos[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], tokens.flatten(2).transpose(1, 2)], dim=1)


@pytest.mark.parametrize("layout", ["state_dict", "model_entry", "module_prefix"])
@pytest.mark.parametrize("name", ["deit_test_patch8_32", "deit_test_distilled_patch8_32"])
def test_official_checkpoint_loads(tmp_path, name, layout):
    official = official_checkpoint(name)
    sd = official.state_dict()
    if layout == "module_prefix":  # saved from a DistributedDataParallel wrapper
        obj = {"model": {"module." + k: v for k, v in sd.items()}}
    else:
        obj = {"model": sd} if layout == "model_entry" else sd
    path = tmp_path / "deit.pth"
    torch.save(obj, path)
    model = create_model(name).eval()
    load_pretrained(model, str(path))
    x = images(model.arch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), atol=ATOL, rtol=0)
    assert all(torch.all(g == 1) for g in model.gate_parameters())  # absent gates: all ones


@pytest.mark.parametrize("name", ["deit_test_patch8_32", "deit_test_distilled_patch8_32"])
def test_classifier_of_another_size_is_dropped(tmp_path, name, caplog):
    official = official_checkpoint(name, num_classes=1000)
    path = tmp_path / "deit_1k.pth"
    torch.save({"model": official.state_dict()}, path)
    model = create_model(name)  # 10 classes
    own_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head")}
    with caplog.at_level(logging.INFO, logger="models.loading"):
        load_pretrained(model, str(path))
    assert "dropping classifier head" in caplog.text
    loaded = model.state_dict()
    for key, value in own_head.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["head.weight"].shape == (10, 64)
    for key, value in official.state_dict().items():
        if not key.startswith("head"):
            assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("name, new_size", [
    ("deit_test_patch8_32", 48),
    ("deit_test_patch8_32", 16),
    ("deit_test_distilled_patch8_32", 64),
    ("deit_tiny_patch16_224", 288),
])
def test_pos_embed_resampled_to_new_grid(tmp_path, name, new_size):
    official = official_checkpoint(name)
    path = tmp_path / "deit.pth"
    torch.save({"model": official.state_dict()}, path)
    model = create_model(name, img_size=new_size).eval()
    load_pretrained(model, str(path))
    arch, pos = model.arch, official.pos_embed.detach()
    grid = new_size // arch.patch_size
    assert model.pos_embed.shape == (1, arch.num_prefix_tokens + grid * grid, arch.embed_dim)
    assert torch.equal(model.pos_embed[:, :arch.num_prefix_tokens], pos[:, :arch.num_prefix_tokens])
    torch.testing.assert_close(model.pos_embed.detach(), deit_resample(pos, arch.num_prefix_tokens, grid),
                               atol=1e-6, rtol=0)
    assert model(images(arch, n=1)).shape == (1, arch.num_classes)


# -- bad checkpoints -------------------------------------------------------------------

def test_missing_and_unreadable_files(tmp_path):
    model = create_model("deit_test_patch8_32")
    missing = tmp_path / "nothere.pth"
    with pytest.raises(UserError, match=r"not found.*nothere\.pth"):
        load_pretrained(model, str(missing))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"notes\.pth.*not a readable torch file"):
        load_pretrained(model, str(text))
    odd = tmp_path / "list.pth"
    torch.save([1, 2, 3], odd)
    with pytest.raises(UserError, match=r"list\.pth.*holds no state dict"):
        load_pretrained(model, str(odd))


@pytest.mark.parametrize("change, expected", [
    ("drop", ["missing keys: blocks.1.mlp.fc2.weight"]),
    ("extra", ["unexpected keys: blocks.3.norm1.weight"]),
    ("both", ["missing keys: blocks.1.mlp.fc2.weight", "unexpected keys: blocks.3.norm1.weight"]),
    ("shape", ["shape mismatch", "blocks.0.attn.qkv.weight"]),
    ("width", ["pos_embed width 32"]),
])
def test_mismatching_keys_name_file_and_keys(tmp_path, change, expected):
    sd = official_checkpoint("deit_test_patch8_32").state_dict()
    if change in ("drop", "both"):
        del sd["blocks.1.mlp.fc2.weight"]
    if change in ("extra", "both"):
        sd["blocks.3.norm1.weight"] = torch.ones(64)
    if change == "shape":
        sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :32]
    if change == "width":
        sd["pos_embed"] = torch.zeros(1, 5, 32)
    path = tmp_path / "odd_deit.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as err:
        load_pretrained(create_model("deit_test_patch8_32"), str(path))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("source, target, expected", [
    ("deit_test_distilled_patch8_32", "deit_test_patch8_32", "has 1 cls_token, 1 dist_token but"),
    ("deit_test_patch8_32", "deit_test_distilled_patch8_32", "model has 1 cls_token, 1 dist_token"),
])
def test_distilled_and_plain_checkpoints_do_not_mix(tmp_path, source, target, expected):
    path = tmp_path / "deit.pth"
    torch.save(official_checkpoint(source).state_dict(), path)
    with pytest.raises(UserError) as err:
        load_pretrained(create_model(target), str(path))
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
