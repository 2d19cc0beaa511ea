"""`load_pruned`: the one way from a file to a physically pruned ViT or Swin (a `DeployViT` or `DeploySwin`).

It reads main.py's `checkpoint_pruned_00.pth` and the reference's gated checkpoints (gated
weights with 0/1 gates: sliced here), main_deploy.py's `checkpoint.pth` / `best_checkpoint.pth`
(deploy weights) and `best_checkpoint.safetensors` (deploy weights; architecture, structure and
normalisation in the metadata), plain timm/DeiT weights (nothing pruned), and a mask JSON with
the weights to slice. Checkpoints written before `structure` was recorded rebuild it from their
`mask`. Unpruned-shape weights are checked against the gated model's keys and shapes on the
meta device: no full-size model is allocated for the check.
"""
import json
import os
import pickle
from dataclasses import replace
from typing import Optional

import torch

from models.build import Arch, build_deploy_model, build_gated_model
from models.loading import _is_gate_key, adapt_state_dict, timm_names
from models.mask import EMBED_GATE_KEY, SWIN_EMBED_GATE_KEY, PruneMask
from models.slicing import deploy_state_dict, deploy_swin_state_dict
from models.swin_arch import SwinArch
from models.swin_features import SwinFeatures
from models.vit_arch import ViTArch
from models.vit_deploy import DeployViT
from utils import CHECKPOINT_FORMAT_VERSION, SAFETENSORS_FORMAT, UserError, check_keys, load_torch_file, state_dict_of

GATE_KEYS = (EMBED_GATE_KEY, SWIN_EMBED_GATE_KEY.format(0))  # in gated weights only (the embedding gates)
EXPECTED = "main.py's checkpoint_pruned_00.pth or main_deploy.py's checkpoint.pth / best_checkpoint.(pth|safetensors)"


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


def _read_torch(path: str, trust: Optional[bool]):
    """The object in a torch file (see `load_pruned` for `trust`)."""
    if trust is not None:
        return load_torch_file(path, "checkpoint", trust=trust)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object
        raise UserError(f"checkpoint {path!r} holds Python objects beyond tensors and plain containers "
                        f"({_first_line(err)}): it is not a checkpoint this project wrote") from None
    except Exception as err:  # zip, pickle and torch errors all mean "not a torch file"
        raise UserError(f"checkpoint {path!r} is not a readable torch file ({type(err).__name__}: "
                        f"{_first_line(err)})") from None


def _read_safetensors(path: str, plain_ok: bool) -> dict:
    """{'model': weights, and the metadata's entries decoded from JSON}; `plain_ok`: a file without
    this project's metadata (timm's weights) gives its weights alone."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own errors, OS errors
        raise UserError(f"{path!r} is not a readable safetensors file ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        if plain_ok:
            return {"model": weights}
        raise UserError(f"{path!r}: its metadata has no \"format\": \"{SAFETENSORS_FORMAT}\": not a pruned model "
                        f"this project wrote (main_deploy.py --save_safetensors)")
    checkpoint = {"model": weights}
    for key in ("format_version", "arch", "structure", "normalization"):
        if key in metadata:
            try:
                checkpoint[key] = json.loads(metadata[key])
            except json.JSONDecodeError as err:
                raise UserError(f"{path!r}: metadata {key!r} is not valid JSON ({err})") from None
    return checkpoint


def is_gated(state: dict) -> bool:
    return any(key in state for key in GATE_KEYS)


def _recorded_arch(checkpoint: dict, path: str) -> Optional[Arch]:
    d = checkpoint.get("arch")
    if not isinstance(d, dict):
        return None
    try:
        return (SwinArch if d.get("family") == "swin" else ViTArch).from_dict(d, f"checkpoint {path!r}")
    except (TypeError, ValueError) as err:
        raise UserError(f"checkpoint {path!r}: malformed 'arch' entry ({err})") from None


def _fitted_arch(arch: Arch, recorded: Optional[Arch], state: dict, path: str, classes_from_checkpoint: bool,
                 size_from_checkpoint: bool) -> Arch:
    """`arch` with the file's input size (when asked) and class count (checked, or taken when asked)."""
    if recorded is not None and recorded.family != arch.family:
        raise UserError(f"{path!r} holds a {recorded.family} model but a {arch.family} model is requested")
    if recorded is not None and size_from_checkpoint:
        arch = replace(arch, img_size=recorded.img_size)
    head = state.get("head.fc.weight" if arch.family == "swin" else "head.weight")
    classes = head.shape[0] if head is not None else (recorded.num_classes if recorded is not None else None)
    if classes is None or classes == arch.num_classes:
        return arch
    if classes_from_checkpoint:
        return replace(arch, num_classes=classes)
    raise UserError(f"{path!r} was trained for {classes} classes but {arch.num_classes} are requested "
                    f"(num_classes / the data set's class count)")


def _fits(mask: PruneMask, arch: Arch, source: str, target: str) -> None:
    try:
        mask.check_fits(arch)
    except UserError as err:
        raise UserError(f"{source!r} does not fit {target}: {err}") from None


def _sliced(state: dict, arch: Arch, mask: PruneMask, source: str, target: str) -> DeployViT:
    """The deploy model of unpruned-shape weights (gated, or plain timm/DeiT) cut by `mask`: the
    weights are adapted (`adapt_state_dict`) and checked against the gated model's keys and shapes."""
    _fits(mask, arch, source, target)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # key names and shapes only
        reference = build_gated_model(arch)
    sd = adapt_state_dict(state, reference, source)
    check_keys(sd, reference, source, target=target)
    fresh = {k for k, v in sd.items() if v.is_meta}  # absent gates, a classifier of another size
    model = build_deploy_model(arch, mask)
    slicer = deploy_swin_state_dict if arch.family == "swin" else deploy_state_dict
    sliced = slicer(mask, {k: v for k, v in sd.items() if k not in fresh}, arch)
    replaced = {k.rsplit(".", 1)[0] for k in fresh if not _is_gate_key(k)}  # keeps its initial weights
    sliced.update({k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in replaced})
    model.load_state_dict(sliced, strict=True)
    return model


def _deploy(checkpoint: dict, state: dict, arch: Arch, mask: Optional[PruneMask], path: str,
            target: str) -> DeployViT:
    """The deploy model of deploy weights: the mask's structure, or the recorded one."""
    if mask is not None:
        _fits(mask, arch, path, target)
        model = build_deploy_model(arch, mask)
    else:
        s = checkpoint.get("structure")
        try:
            model = build_deploy_model(arch, structure={k: s[k] for k in ("width", "heads", "hidden")})
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"checkpoint {path!r}: malformed 'structure' entry ({type(err).__name__}: {err})") from None
    check_keys(state, model, path, target=target)
    model.load_state_dict(state, strict=True)
    return model


def _from_checkpoint(path: str, arch: Optional[Arch], trust: Optional[bool], classes_from_checkpoint: bool,
                     size_from_checkpoint: bool, target: str) -> DeployViT:
    if not path or not os.path.isfile(path):
        raise UserError(f"pruned model file not found: {path!r}")
    checkpoint = (_read_safetensors(path, plain_ok=arch is not None) if str(path).endswith(".safetensors")
                  else _read_torch(path, trust))
    if arch is None and not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)):
        raise UserError(f"checkpoint {path!r} has no 'model' entry: expected {EXPECTED}")
    state = state_dict_of(checkpoint, path)
    checkpoint = checkpoint if isinstance(checkpoint, dict) and state is not checkpoint else {}  # beside the weights
    state = timm_names(state)  # DDP's `module.`, DeiT III's gamma_1/gamma_2
    version = checkpoint.get("format_version", CHECKPOINT_FORMAT_VERSION)
    if isinstance(version, int) and version > CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"checkpoint {path!r} has format version {version}; this code reads up to "
                        f"{CHECKPOINT_FORMAT_VERSION} (update the code)")
    gated = is_gated(state)
    if arch is None:  # the file must describe itself
        needed = ("arch",) if "structure" in checkpoint and not gated else ("mask", "arch")
        missing = [k for k in needed if not isinstance(checkpoint.get(k), dict)]
        if missing:
            raise UserError(f"checkpoint {path!r} has no {'/'.join(repr(k) for k in missing)} entry: "
                            f"expected {EXPECTED}")
    recorded = _recorded_arch(checkpoint, path)
    arch = _fitted_arch(arch or recorded, recorded, state, path, classes_from_checkpoint, size_from_checkpoint)
    mask = PruneMask.from_checkpoint(checkpoint or state, path) if gated or "mask" in checkpoint else None
    if mask is not None and "structure" in checkpoint and checkpoint["structure"] != mask.structure():
        raise UserError(f"checkpoint {path!r}: 'structure' entry differs from its 'mask' entry")
    if gated:  # main.py's (or the reference's) gated model: slice the kept heads, neurons and channels
        model = _sliced(state, arch, mask, path, target)
    elif mask is None and "structure" not in checkpoint:  # plain ViT weights: nothing pruned
        mask = PruneMask.full(arch)
        model = _sliced(state, arch, mask, path, target)
    else:
        model = _deploy(checkpoint, state, arch, mask, path, target)
    norm = checkpoint.get("normalization")
    model.normalization = norm if isinstance(norm, dict) else None
    model.mask = mask
    return model


def load_pruned(path: Optional[str], arch: Optional[Arch] = None, weights: Optional[str] = None, *,
                trust: Optional[bool] = None, classes_from_checkpoint: bool = False,
                size_from_checkpoint: bool = False, target: str = "the model", features_only: bool = False):
    """The physically pruned ViT or Swin (eval mode, on CPU) that a file describes.

    Args:
        path: a pruned file (see the module docstring); plain timm/DeiT weights (with `arch`:
            nothing pruned); a mask JSON (with `arch` and `weights`); or None (with `arch`: the
            unpruned model, with `weights` when given).
        arch: the unpruned architecture the file must fit; None: the one the file records.
        weights: with a mask JSON or no `path`, the gated or plain ViT weights to slice (starting
            weights: pos_embed resampled to `arch`, a classifier of another size freshly initialised).
        trust: True loads torch files that need full unpickling (--trust_checkpoint); False refuses
            them, naming that flag; None (tools without it) refuses them as files this project did not write.
        classes_from_checkpoint: the file's class count replaces `arch.num_classes` instead of being
            checked against it.
        size_from_checkpoint: the input size the file records replaces `arch.img_size`.
        target: what the file must fit, as errors name it.
        features_only: a Swin's stage feature maps instead (`models.swin_features.SwinFeatures`: NCHW
            maps of the four stages with their channel counts, as timm's `features_only`).

    Returns:
        the `DeployViT` (`DeploySwin`); `model.arch` is the unpruned architecture (class count, image size),
        `model.mask` the `PruneMask` (None when the file records only the structure),
        `model.normalization` the recorded {'mean', 'std'} of its inputs (None when not recorded).

    Raises:
        UserError: missing, unreadable or foreign file, or weights that do not fit the model.
    """
    if features_only and arch is not None and arch.family != "swin":
        raise UserError("features_only=True needs a Swin: a ViT has no stages of feature maps")
    if path is not None and not str(path).endswith(".json"):
        model = _from_checkpoint(path, arch, trust, classes_from_checkpoint, size_from_checkpoint, target)
        return _as_requested(model.eval(), features_only)
    if path is not None and not weights:
        raise UserError(f"{path!r} is a mask JSON: pass the weights to slice with --finetune")
    if arch is None:
        raise UserError(f"{path!r} is a mask JSON: the model's architecture must be given")
    mask = PruneMask.full(arch) if path is None else PruneMask.load(path)
    if path is not None:  # before the weights are read: a misfit is the mask's
        _fits(mask, arch, path, target)
    if weights:
        state = state_dict_of(load_torch_file(weights, "weights", trust=bool(trust), field="finetune"), weights)
        gates = PruneMask.from_gate_state_dict(state, source=weights) if path is None and is_gated(state) else None
        if gates is not None and gates.kept_counts() != gates.total_counts():
            raise UserError(f"{weights!r} holds a pruned gated model: pass it as the pruned model (--masked_model)")
        model = _sliced(state, arch, mask, weights, target)
    else:
        model = build_deploy_model(arch, mask)
    model.mask, model.normalization = mask, None
    return _as_requested(model.eval(), features_only)


def _as_requested(model, features_only: bool):
    if not features_only:
        return model
    if model.arch.family != "swin":
        raise UserError("features_only=True needs a Swin: a ViT has no stages of feature maps")
    return SwinFeatures(model)
