"""Run-time utilities shared by tools/pretrain.py and the fgvc training tool.

Import the submodules directly (``from sparse_mim.utils.config import load_config``);
nothing heavy (wandb) is imported here.
"""
from .config import Config, ConfigError, load_config, parse_config, save_config
from .checkpoint import save_checkpoint, load_checkpoint, find_last, resolve_resume, get_rng_state, set_rng_state
from .distributed import (init_distributed, get_rank, get_world_size, is_main_process, barrier, all_reduce_mean,
                          seed_everything)
from .schedules import WarmupCosine, cosine_weight_decay, set_optimizer_values
from .misc import AverageMeter, Throughput, NonFiniteLossError, check_finite
