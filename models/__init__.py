"""Models: gated DeiTs (for pruning), deploy DeiTs (physically pruned), and timm's others."""
from models.deit_base import DeiTArch
from models.deit_deploy import DeployDeiT
from models.deit_gated import GatedDeiT
from models.registry import create_model, is_project_model, list_models, register_model
from models import variants  # noqa: F401  (registers the named architectures)
from models.variants import arch_of, gated_name_of, is_deploy_name
from models.pruned import load_pruned

__all__ = ["DeiTArch", "DeployDeiT", "GatedDeiT", "create_model", "is_project_model", "list_models",
           "register_model", "arch_of", "gated_name_of", "is_deploy_name", "load_pruned"]
