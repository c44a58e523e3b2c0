"""Hugging Face transformers: the "robust_attn" attention implementation, convert and revert.

Importing this package registers the attention function (and its mask function)
with transformers under the name "robust_attn" (:func:`.function.register`), so
``AutoModelForCausalLM.from_config(config, attn_implementation="robust_attn")``
works after ``import robust_attn.integrations.hf``. :func:`robust_attn.convert`
imports it when given a ``PreTrainedModel``. ``import robust_attn`` alone does not
import transformers.
"""

from .convert import attention_modules, convert, revert
from .function import NAME, mitigations_of, register, robust_attn_attention
from .mitigations import UNSUPPORTED, HFAttentionMitigations

register()

__all__ = ["NAME", "UNSUPPORTED", "HFAttentionMitigations", "attention_modules", "convert",
           "mitigations_of", "register", "revert", "robust_attn_attention"]
