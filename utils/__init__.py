"""Small shared helpers, one module per concern; every public name is re-exported here
(`from utils import X`). Kept free of heavy imports so that every module may depend on it."""
from utils.atomic_io import (TEMP_PREFIX, TEMP_SUFFIX, atomic_copy, atomic_write, atomic_write_json,
                             atomic_write_pickle, atomic_write_text, prepare_output_dir, refuse_to_clobber,
                             remove_stale_temp_files)
from utils.checkpoint import (CHECKPOINT_FORMAT_VERSION, SAFETENSORS_FORMAT, atomic_torch_save, check_keys,
                              checkpoint_state, load_resume_weights, model_checkpoint, plain_args,
                              restore_training_state, save_pruned_safetensors)
from utils.distributed import (DistributedConfig, all_reduce_sum, barrier, cleanup_distributed, get_rank,
                               get_world_size, init_distributed_mode, is_dist_avail_and_initialized, is_main_process)
from utils.environment import environment_line, set_tf32
from utils.errors import Parser, UserError, cli_entry, error_line, option_flags
from utils.logs import TensorboardLogger, append_json_line, setup_logging
from utils.meters import MetricLogger, SmoothedValue, format_seconds
from utils.safe_load import load_numpy_pickle, load_torch_file, state_dict_of
from utils.seeding import derive_seed, set_seed

__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "DistributedConfig", "MetricLogger", "Parser", "SAFETENSORS_FORMAT", "SmoothedValue",
    "TEMP_PREFIX", "TEMP_SUFFIX", "TensorboardLogger", "UserError", "all_reduce_sum",
    "append_json_line", "atomic_copy", "atomic_torch_save", "atomic_write", "atomic_write_json", "atomic_write_pickle",
    "atomic_write_text", "barrier", "check_keys", "checkpoint_state", "cleanup_distributed", "cli_entry",
    "derive_seed", "environment_line", "error_line", "format_seconds", "get_rank", "get_world_size",
    "init_distributed_mode", "is_dist_avail_and_initialized", "is_main_process", "load_numpy_pickle",
    "load_resume_weights", "load_torch_file", "model_checkpoint", "option_flags", "plain_args", "prepare_output_dir",
    "refuse_to_clobber", "remove_stale_temp_files", "restore_training_state", "save_pruned_safetensors",
    "set_seed", "set_tf32", "setup_logging", "state_dict_of",
]
