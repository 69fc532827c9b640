"""Model configuration: one frozen dataclass and the named presets.

Dimension letters used across the package (in variable names such as ``x_BTD``):
  B batch, T positions of the current chunk, D model width (``d_model``),
  H heads, K head width (D // H), F feed-forward width (``d_ff``),
  V vocabulary, L layers, S key/value cache length (<= ``n_ctx``).

Run ``python -m gpt2_jax.config`` to print every preset with its exact parameter count.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Dtype = Literal["float32", "bfloat16"]
AttentionImpl = Literal["auto", "xla", "cudnn"]
ARCHITECTURE_FIELDS = ("vocab_size", "n_ctx", "n_layer", "d_model", "n_head", "d_ff", "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2 network (architecture + numerics, never training)."""

    vocab_size: int = 32000
    n_ctx: int = 128  # learned positions = the longest window the model can see
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_ff: int = 3072
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1  # embeddings and both residual branches (GPT-2's embd/resid_pdrop)
    attn_dropout: float = 0.1  # on attention probabilities (GPT-2's attn_pdrop)
    dtype: Dtype = "float32"  # compute dtype; parameters are always float32
    attention: AttentionImpl = "auto"  # jax.nn.dot_product_attention backend; auto = XLA/cuDNN by platform
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    # Inference with int8 weights (model.quantize_int8): also quantize each product's input rows to int8
    # (per row, on the fly) and multiply int8 x int8 with int32 accumulation. --quantize=int8_dynamic.
    int8_activations: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layer", "d_model", "n_head", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPT2Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"GPT2Config.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"GPT2Config.attention must be auto, xla or cudnn, got {self.attention!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """A named preset (see ``PRESETS``), optionally with fields replaced."""
        if name not in PRESETS:
            raise ValueError(f"unknown model size {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides) -> "GPT2Config":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that decide what the parameters mean: equal architectures can share weights."""
        return {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPT2Config fields: {sorted(unknown)}")
        return cls(**d)


def _shape(n_layer, d_model, n_head, d_ff, n_ctx, vocab_size) -> GPT2Config:
    return GPT2Config(
        n_layer=n_layer, d_model=d_model, n_head=n_head, d_ff=d_ff, n_ctx=n_ctx, vocab_size=vocab_size
    )


PRESETS: dict[str, GPT2Config] = {
    # CPU-sized: trains on WikiText-2 on a laptop.
    "tiny": _shape(4, 256, 4, 1024, 128, 32000),
    # The project report's two models: 32k BPE vocabulary, 128-token context.
    "small": _shape(12, 768, 12, 3072, 128, 32000),
    "medium": _shape(24, 1024, 16, 4096, 128, 32000),
    # OpenAI's released shapes (50257-token vocabulary, 1024 positions).
    "gpt2": _shape(12, 768, 12, 3072, 1024, 50257),
    "gpt2-medium": _shape(24, 1024, 16, 4096, 1024, 50257),
    "gpt2-large": _shape(36, 1280, 20, 5120, 1024, 50257),
    "gpt2-xl": _shape(48, 1600, 25, 6400, 1024, 50257),
}


def param_count(cfg: GPT2Config, *, embeddings: bool = True) -> int:
    """Exact number of parameters (the tied LM head counted once); ``embeddings=False``: without the
    token and position embedding tables."""
    D, F = cfg.d_model, cfg.d_ff
    layer_norm = 2 * D
    attention = (D * 3 * D + 3 * D) + (D * D + D)
    mlp = (D * F + F) + (F * D + D)
    body = cfg.n_layer * (2 * layer_norm + attention + mlp) + layer_norm  # + final LayerNorm
    if not embeddings:
        return body
    return body + cfg.vocab_size * D + cfg.n_ctx * D


def main() -> None:
    print(f"{'preset':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_ff':>5} {'ctx':>5} {'vocab':>6}"
          f" {'params':>13} {'non-embedding':>14}")
    for name, c in PRESETS.items():
        print(f"{name:<12} {c.n_layer:>6} {c.d_model:>7} {c.n_head:>5} {c.d_ff:>5} {c.n_ctx:>5} {c.vocab_size:>6}"
              f" {param_count(c):>13,} {param_count(c, embeddings=False):>14,}")


if __name__ == "__main__":
    main()
