"""Models: gated ViTs (for pruning), deploy ViTs (physically pruned), the pruning mask, and timm's others."""
from models.vit_arch import ViTArch
from models.mask import PruneMask
from models.vit_deploy import DeployViT
from models.vit_gated import GatedViT
from models.build import build_deploy_model
from models.registry import (TEST_CONFIGS, arch_of, create_model, gated_name_of, is_deploy_name, is_prunable,
                             list_models)
from models.pruned import load_pruned

__all__ = ["ViTArch", "PruneMask", "DeployViT", "GatedViT", "build_deploy_model", "TEST_CONFIGS", "arch_of",
           "create_model", "gated_name_of", "is_deploy_name", "is_prunable", "list_models", "load_pruned"]
