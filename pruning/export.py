"""Export a pruned ViT or Swin to ONNX, TorchScript or a torch.export program.

    python -m pruning.export out/checkpoint_pruned_00.pth --format onnx --out deit_pruned.onnx
    python -m pruning.export ft/best_checkpoint.pth --format exported-program --out deit_pruned.pt2

The checkpoint is main.py's `checkpoint_pruned_00.pth` (gated weights with 0/1 gates) or
main_deploy.py's `checkpoint.pth` / `best_checkpoint.pth` / `best_checkpoint.safetensors` (deploy
weights). Each records the architecture and the pruned structure, so the file alone rebuilds the
physically pruned model (`models.load_pruned`): no --model.

The exported model takes `images` (B, in_chans, img_size, img_size) and returns `logits`
(B, num_classes); B is dynamic. A distilled DeiT returns the mean of its two heads (its
eval-mode output). Formats:

- onnx: `torch.onnx.export(dynamo=True)`, the torch.export-based exporter (needs
  `onnxscript`), weights inside the one .onnx file, opset 18 by default (17 and up are
  accepted; the file is checked to hold the opset asked for). The legacy
  TorchScript-based exporter is deprecated in torch 2.9+ and is not used.
- torchscript: `torch.jit.trace` + `torch.jit.save` (the traced graph reads the batch size
  from its input, so any batch runs).
- exported-program: `torch.export.export` with a `torch.export.Dim` batch + `torch.export.save` (.pt2).
"""
import argparse
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Tuple

import torch

from utils import Parser, UserError, atomic_write, cli_entry

if TYPE_CHECKING:
    from models import ViTArch, DeployViT

FORMATS = ("onnx", "torchscript", "exported-program")
DEFAULT_OPSET = 18


def load_deploy_checkpoint(path: str) -> Tuple["DeployViT", "ViTArch"]:
    """The deploy model (eval mode) and the unpruned architecture stored in a pruned file
    (`models.load_pruned`: gated weights are sliced to the mask, deploy weights loaded as they
    are; only tensors and plain containers are unpickled)."""
    # imported here: `models` pulls in timm (seconds), which a bad command line need not wait for
    from models import load_pruned

    model = load_pruned(path)
    return model, model.arch


def check_writable(out: str) -> None:
    """Raise a `UserError` unless a file can be written at `out` (its folder exists and takes files)."""
    if not out:
        raise UserError("--out: give the file to write, e.g. --out deit_pruned.onnx")
    if os.path.isdir(out):
        raise UserError(f"--out {out!r} is a folder: give a file name inside it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {out!r}: folder {folder!r} does not exist")
    try:  # a real probe: os.access says yes to root even on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".tmp_probe_", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--out {out!r}: cannot write in {folder!r} ({err.strerror or err})")


def export(model: "DeployViT", arch: "ViTArch", fmt: str, out: str, opset: int = DEFAULT_OPSET,
           batch_size: int = 2) -> None:
    """Write `model` (eval mode) to `out` atomically in format `fmt`, with a dynamic batch axis.

    `batch_size` is the example input's batch; torch.export (behind onnx and
    exported-program) needs at least 2, since it fixes a size-1 dimension.
    """
    example = torch.randn(batch_size, arch.in_chans, arch.img_size, arch.img_size)
    batch = torch.export.Dim("batch", min=1)
    model.eval()
    if fmt == "onnx":
        program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                    opset_version=opset, dynamo=True, external_data=False, verbose=False,
                                    dynamic_shapes={"images": {0: batch}})
        written = {o.domain: o.version for o in program.model_proto.opset_import}.get("")
        if written != opset:  # torch's version converter gives up on some opsets and keeps its own
            raise UserError(f"--opset {opset}: the exporter could only write opset {written}; choose {written}")
        atomic_write(out, lambda tmp: program.save(tmp, external_data=False))
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            # the input-size check in PatchEmbed is constant for a fixed image size
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example)
        atomic_write(out, lambda tmp: torch.jit.save(traced, tmp))
    elif fmt == "exported-program":
        program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: torch.export.save warns on names not ending in .pt2
                torch.export.save(program, f)

        atomic_write(out, save)
    else:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="main.py's checkpoint_pruned_00.pth or main_deploy.py's checkpoint.pth")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="file to write (.onnx, .pt, .pt2)")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset (default {DEFAULT_OPSET}); onnx only")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="batch of the example input used to trace (default 2); the exported batch axis is "
                             "dynamic either way")
    return parser.parse_args(argv)


@cli_entry
def main(argv=None) -> None:
    args = parse_args(argv)
    if args.opset is not None and args.format != "onnx":
        raise UserError(f"--opset applies to --format onnx only, not {args.format}")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if args.format == "onnx" and opset < 17:  # LayerNormalization is an ONNX operator from opset 17 on
        raise UserError(f"--opset {opset}: expected 17 or more (default {DEFAULT_OPSET})")
    min_batch = 1 if args.format == "torchscript" else 2
    if args.batch_size < min_batch:
        raise UserError(f"--batch-size {args.batch_size}: {args.format} needs an example batch of at least "
                        f"{min_batch} (the exported batch axis is dynamic either way)")
    check_writable(args.out)  # before any work
    model, arch = load_deploy_checkpoint(args.checkpoint)
    export(model, arch, args.format, args.out, opset=opset, batch_size=args.batch_size)
    size_mb = os.path.getsize(args.out) / 2**20
    opset_note = f", opset {opset}" if args.format == "onnx" else ""
    s = model.structure()
    print(f"wrote {args.out} ({args.format}{opset_note}, {size_mb:.2f} MB): input 'images' "
          f"(batch, {arch.in_chans}, {arch.img_size}, {arch.img_size}) -> 'logits' (batch, {arch.num_classes}), "
          f"dynamic batch; width {s['width']}, heads {s['heads']}, mlp {s['hidden']}")


if __name__ == "__main__":
    main()
