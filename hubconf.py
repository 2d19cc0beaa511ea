"""torch.hub entry points: a pruned SAViT ViT or Swin from its self-describing file.

    model = torch.hub.load("path/to/this/repo", "savit_pruned", checkpoint="ft/best_checkpoint.pth",
                           source="local")
"""
dependencies = ["torch", "timm", "safetensors"]


def savit_pruned(checkpoint: str, **kwargs):
    """The physically pruned ViT or Swin (eval mode, CPU) of main.py's checkpoint_pruned_00.pth or main_deploy.py's
    checkpoint.pth / best_checkpoint.pth / best_checkpoint.safetensors (`models.load_pruned`)."""
    from models import load_pruned
    from utils import UserError

    if kwargs:
        raise UserError(f"savit_pruned takes checkpoint=PATH only, not {', '.join(sorted(kwargs))}")
    return load_pruned(checkpoint)
