"""fgvc models: MetaFormer (official layout) and convnet + meta-token hybrids, behind one registry."""
from ._registry import create_model, is_model, list_models, register_model
from .metaformer import (
    MetaFormer,
    checkpoint_filter_fn,
    load_pretrained,
    meta_dropout_mask,
    param_groups_for_weight_decay,
    read_weights,
    describe_state_dict,
    load_state_dict_exact,
    resize_relative_position_bias_table,
)
from . import hybrid  # noqa: F401  (registers metaformer_resnet*/metaformer_convnext*)
