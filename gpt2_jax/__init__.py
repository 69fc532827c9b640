"""GPT-2 from scratch in JAX/Flax: pure model, data, training, sampling and evaluation."""

from gpt2_jax.config import PRESETS, GPT2Config, param_count
from gpt2_jax.model import (
    GPT2,
    KVCache,
    LayerCache,
    chunked_token_nll,
    count_params,
    cross_entropy_loss,
    forward,
    init_cache,
    init_params,
    quantize_int8,
    token_nll,
)

__version__ = "0.1.0"

__all__ = [
    "GPT2", "GPT2Config", "PRESETS", "KVCache", "LayerCache", "chunked_token_nll", "count_params",
    "cross_entropy_loss", "forward", "init_cache", "init_params", "param_count", "quantize_int8", "token_nll",
]
