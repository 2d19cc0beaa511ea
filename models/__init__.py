"""Models: gated ViTs and Swins (for pruning), their deploy forms (physically pruned), the pruning mask,
and timm's others."""
from models.vit_arch import ViTArch
from models.swin_arch import SwinArch
from models.mask import PruneMask, SwinMask
from models.vit_deploy import DeployViT
from models.vit_gated import GatedViT
from models.swin_deploy import DeploySwin
from models.swin_gated import GatedSwin
from models.build import Arch, build_deploy_model, build_gated_model
from models.registry import (TEST_CONFIGS, arch_of, create_model, gated_name_of, is_deploy_name, is_prunable,
                             list_models)
from models.pruned import load_pruned
from models.swin_features import SwinFeatures, swin_detector

__all__ = ["Arch", "ViTArch", "SwinArch", "PruneMask", "SwinMask", "DeployViT", "GatedViT", "DeploySwin", "GatedSwin",
           "build_deploy_model", "build_gated_model", "TEST_CONFIGS", "arch_of",
           "create_model", "gated_name_of", "is_deploy_name", "is_prunable", "list_models", "load_pruned",
           "SwinFeatures", "swin_detector"]
