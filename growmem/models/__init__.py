"""Hugging Face models: GrowMemConfig, GrowMemModel, GrowMemForCausalLM and their cache.

Importing this package registers the classes with transformers' Auto classes, so that
``AutoModelForCausalLM.from_config(GrowMemConfig(...))`` and ``from_pretrained(path)`` work.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from growmem.layers.config import MemoryConfig
from growmem.models.cache import CACHE_FIELD, GrowMemCache
from growmem.models.configuration import RULES, GrowMemConfig
from growmem.models.modeling import GrowMemForCausalLM, GrowMemModel, GrowMemPreTrainedModel

AutoConfig.register(GrowMemConfig.model_type, GrowMemConfig, exist_ok=True)
AutoModel.register(GrowMemConfig, GrowMemModel, exist_ok=True)
AutoModelForCausalLM.register(GrowMemConfig, GrowMemForCausalLM, exist_ok=True)

__all__ = [
    "CACHE_FIELD",
    "RULES",
    "GrowMemCache",
    "GrowMemConfig",
    "GrowMemForCausalLM",
    "GrowMemModel",
    "GrowMemPreTrainedModel",
    "MemoryConfig",
]
