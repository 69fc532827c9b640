"""GPT-2 as Flax linen modules, used functionally: ``params`` in, logits out.

    tokens_BT ─► wte + wpe ─► dropout ─► Block × L ─► ln_f ─► x @ wteᵀ ─► logits_BTV
    Block:  x + dropout(attn(ln_1(x)))  then  x + dropout(mlp(ln_2(x)))          (pre-LayerNorm)

Parameter names and layouts are OpenAI's (``wte``, ``h_0/attn/c_attn``, ``Dense`` kernels ``(in, out)``
like GPT-2's ``Conv1D``), so released checkpoints map on one to one. One forward pass serves training
and decoding: given a ``KVCache`` and each token's absolute position (rows may differ), new keys and
values are written at those positions and each query attends to the slots at or before its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from gpt2_jax.config import GPT2Config
from gpt2_jax.dots import int8_matmul_t, matmul_t, mixed_matmul, mixed_matmul_nt, quantize_rows, vocab_chunked_nll
from gpt2_jax.threefry import bernoulli


class LayerCache(NamedTuple):
    """Keys and values of one layer for cache slots 0..S-1 (slot = absolute position), heads-major
    with rows and heads as one axis, ``G = B·H`` (row b's head h at g = b·H + h): the layout attention's
    products read, so a decoding step writes its slots in place and reads the cache as it is. With
    ``(B, H, S, K)`` XLA:CPU merged B and H for the products after the write and then wrote the cache
    twice, copying it three times a step (small at batch 1: 24 copies of 393 KB a token)."""

    k_GSK: jax.Array
    v_GSK: jax.Array


KVCache = tuple[LayerCache, ...]  # one entry per layer


def init_cache(cfg: GPT2Config, batch_size: int, length: int | None = None, dtype=None) -> KVCache:
    """An all-zero cache of ``length`` slots (default ``n_ctx``) in ``dtype`` (default the compute dtype).

    Attention's products run in the wider of the compute and the cache dtype (``decode.cache_dtype``
    keeps a float32 cache on a CPU).
    """
    length = cfg.n_ctx if length is None else length
    assert 1 <= length <= cfg.n_ctx, (length, cfg.n_ctx)
    shape = (batch_size * cfg.n_head, length, cfg.d_head)
    zeros = jnp.zeros(shape, compute_dtype(cfg) if dtype is None else dtype)
    return tuple(LayerCache(zeros, zeros) for _ in range(cfg.n_layer))


def compute_dtype(cfg: GPT2Config) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def _init_normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


# GPT-2 initialisation: N(0, 0.02) everywhere, residual output projections scaled by
# 1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth.
INIT_STD = 0.02


def _residual_init(cfg: GPT2Config) -> nn.initializers.Initializer:
    return _init_normal(INIT_STD / math.sqrt(2 * cfg.n_layer))


class Dense(nn.Module):
    """``x @ kernel + bias`` in the compute dtype, kernel ``(in, out)`` as GPT-2's ``Conv1D``.

    An int8 kernel (``quantize_int8``) comes with a float32 ``int8_scale`` per output column: the product
    of the int8 values is rescaled, so no dequantized copy of the kernel is part of the model. Decoding
    stores the kernel transposed, as ``kernel_OI`` (``decode.inference_params``), the layout the few-row
    products read fastest (``dots.matmul_t``); with ``int8_activations`` an int8 ``kernel_OI`` multiplies
    the input rows quantized to int8 on the fly (``dots.int8_matmul_t``).
    """

    features: int
    dtype: jnp.dtype
    kernel_init: nn.initializers.Initializer
    int8_activations: bool = False

    @nn.compact
    def __call__(self, x_BTI):
        *lead, I = x_BTI.shape
        x_NI = x_BTI.astype(self.dtype).reshape(-1, I)
        scale_O = self.get_variable("params", "int8_scale")
        if self.has_variable("params", "kernel_OI"):
            kernel_OI = self.get_variable("params", "kernel_OI")
            int8_rows = self.int8_activations and kernel_OI.dtype == jnp.int8
            y_NO = int8_matmul_t(x_NI, kernel_OI) if int8_rows else matmul_t(x_NI, kernel_OI)
            bias_O = self.get_variable("params", "bias")
        else:
            kernel_IO = self.param("kernel", self.kernel_init, (I, self.features), jnp.float32)
            bias_O = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if scale_O is None:
                y_NO = mixed_matmul(x_NI, kernel_IO)  # float32 accumulation, fast backward (dots.py)
            else:
                y_NO = jnp.dot(x_NI, kernel_IO.astype(self.dtype), preferred_element_type=jnp.float32)
        if scale_O is not None:
            y_NO = (y_NO * scale_O).astype(self.dtype)  # int8: rescaled, rounded, then the bias as before
            return (y_NO + bias_O.astype(self.dtype)).reshape(*lead, self.features)
        return (y_NO + bias_O).astype(self.dtype).reshape(*lead, self.features)


def attention_implementation(cfg: GPT2Config) -> str | None:
    """The ``jax.nn.dot_product_attention`` backend; ``None`` (auto): the platform's best (see ``attend``)."""
    return None if cfg.attention == "auto" else cfg.attention


def attend(
    q_BHTK: jax.Array,
    k_BHSK: jax.Array,
    v_BHSK: jax.Array,
    mask_BTS: jax.Array | None,
    *,
    dropout_rate: float = 0.0,
    dropout_keys_B: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention, heads-major in and out (``y_BHTK``); ``mask_BTS=None`` means causal
    over aligned T == S.

    Softmax runs in float32 whatever the compute dtype, and both products accumulate in float32.
    ``jax.nn.dot_product_attention`` (cuDNN's fused kernel where it supports the call) serves the
    calls without dropout on GPUs, or whenever ``implementation`` names it; elsewhere, and for
    dropout on the probabilities (row b's mask drawn from ``dropout_keys_B[b]``), the explicit
    formulation runs (heads-major: on XLA:CPU twice as fast as contracting a ``BTHK`` layout).
    """
    use_dropout = dropout_rate > 0.0 and dropout_keys_B is not None
    if not use_dropout and (implementation is not None or jax.default_backend() != "cpu"):
        mask = None if mask_BTS is None else mask_BTS[:, None, :, :]
        impl = implementation if mask_BTS is None else "xla"  # cuDNN wants causal / seq-lengths masks
        q_BTHK, k_BSHK, v_BSHK = (jnp.swapaxes(a, 1, 2) for a in (q_BHTK, k_BHSK, v_BHSK))
        y_BTHK = jax.nn.dot_product_attention(
            q_BTHK, k_BSHK, v_BSHK, mask=mask, is_causal=mask_BTS is None, implementation=impl
        )
        return jnp.swapaxes(y_BTHK, 1, 2)
    T, S = q_BHTK.shape[2], k_BHSK.shape[2]
    if mask_BTS is None:
        assert T == S, (T, S)
        mask_BTS = jnp.tril(jnp.ones((T, S), bool))[None]
    scale = 1.0 / math.sqrt(q_BHTK.shape[-1])
    scores_BHTS = mixed_matmul_nt(q_BHTK, k_BHSK)
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * scale, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
    probs_BHTS = dropout(probs_BHTS, dropout_rate if use_dropout else 0.0, dropout_keys_B).astype(v_BHSK.dtype)
    return mixed_matmul(probs_BHTS, v_BHSK).astype(q_BHTK.dtype)


def fold_in_rows(keys_B: jax.Array | None, site: int) -> jax.Array | None:
    """``jax.random.fold_in`` of every row's key: one key per row for each dropout site (``None``: none)."""
    return None if keys_B is None else jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, site)


def dropout(x_B: jax.Array, rate: float, keys_B: jax.Array | None) -> jax.Array:
    """Inverted dropout whose row b draws its mask from ``keys_B[b]`` alone (``None`` or rate 0: identity).

    Per-row keys make a row's masks independent of how the batch is split over devices, and keep
    the rest of the model batched: the whole forward pass is not vmapped over rows.
    """
    if keys_B is None or rate == 0.0:
        return x_B
    keep_B = jax.vmap(lambda key: bernoulli(key, 1.0 - rate, x_B.shape[1:]))(keys_B)  # jax.random's masks
    return jnp.where(keep_B, x_B / (1.0 - rate), 0.0).astype(x_B.dtype)


def take_rows(table_VD: jax.Array, ids_BT: jax.Array, dtype) -> jax.Array:
    """``table_VD[ids_BT]`` in ``dtype`` (an embedding lookup): the rows are gathered first, then cast.

    XLA:CPU widens a bf16 gather's whole table to float32, and inside the decode loop it hoists that
    widened copy out of the loop: every ``generate`` call converted small's 32k embedding (145 ms, 2.3
    ms a token over 64 tokens). The barrier ties the table to the ids, so it is no loop invariant and
    the widening stays fused into the gather, row by row. (``nn.Embed`` casts the table first.)
    """
    table_VD, ids_BT = lax.optimization_barrier((table_VD, ids_BT))
    return jnp.take(table_VD, ids_BT, axis=0).astype(dtype)


def write_cache(cache: LayerCache, k_BHTK: jax.Array, v_BHTK: jax.Array, positions_BT: jax.Array) -> LayerCache:
    """Store new keys/values at their absolute positions (per row).

    One token per row (a decoding step) is written row by row with ``dynamic_update_slice``, in place
    (a position past the cache writes its last slot); longer chunks are scattered, dropping writes past
    the cache. XLA:CPU runs a scatter as a loop over a copy of the whole cache: fine once per prompt,
    not once per token.
    """
    B, H, T, K = k_BHTK.shape
    if T == 1:
        def store(c_GSK, new_BH1K):
            # As raw 16-bit words: XLA:CPU widens a bf16 dynamic_update_slice to float32, whole cache.
            dtype = c_GSK.dtype
            words = jnp.uint16 if dtype == jnp.bfloat16 else dtype
            c_GSK = lax.bitcast_convert_type(c_GSK, words)
            new_G1K = lax.bitcast_convert_type(new_BH1K.astype(dtype), words).reshape(B * H, 1, K)
            for b in range(B):
                c_GSK = lax.dynamic_update_slice(c_GSK, new_G1K[b * H:(b + 1) * H], (b * H, positions_BT[b, 0], 0))
            return lax.bitcast_convert_type(c_GSK, dtype)

        return LayerCache(store(cache.k_GSK, k_BHTK), store(cache.v_GSK, v_BHTK))

    def scatter(c_GSK, new_BHTK):
        # Indexing [rows, :, positions] addresses the slots as (B, T, H, K): the new chunk's own layout.
        c_BHSK = c_GSK.reshape(B, H, -1, K)
        c_BHSK = c_BHSK.at[jnp.arange(B)[:, None], :, positions_BT].set(
            jnp.swapaxes(new_BHTK, 1, 2).astype(c_GSK.dtype), mode="drop")
        return c_BHSK.reshape(c_GSK.shape)

    return LayerCache(scatter(cache.k_GSK, k_BHTK), scatter(cache.v_GSK, v_BHTK))


class CausalSelfAttention(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: LayerCache | None, keys_B: jax.Array | None):
        cfg = self.cfg
        B, T, D = x_BTD.shape
        H, K = cfg.n_head, cfg.d_head
        dense = dict(dtype=compute_dtype(cfg), int8_activations=cfg.int8_activations)
        qkv_BT3D = Dense(3 * D, kernel_init=_init_normal(INIT_STD), name="c_attn", **dense)(x_BTD)
        q_BHTK, k_BHTK, v_BHTK = (a.reshape(B, T, H, K).transpose(0, 2, 1, 3) for a in jnp.split(qkv_BT3D, 3, axis=-1))

        options = dict(dropout_rate=cfg.attn_dropout, dropout_keys_B=keys_B,
                       implementation=attention_implementation(cfg))
        if cache is None:  # training / full forward: keys are the chunk itself
            y_BHTK = attend(q_BHTK, k_BHTK, v_BHTK, None, **options)
        else:  # decoding: write this chunk into the cache, attend to every slot up to our position
            cache = write_cache(cache, k_BHTK, v_BHTK, positions_BT)
            mask_BTS = jnp.arange(cache.k_GSK.shape[1])[None, None, :] <= positions_BT[:, :, None]
            q_BHTK = q_BHTK.astype(jnp.promote_types(q_BHTK.dtype, cache.k_GSK.dtype))
            k_GSK, v_GSK = (c_GSK.astype(q_BHTK.dtype) for c_GSK in cache)
            if keys_B is None:  # each (row, head) one batch entry g of attention's products: the cache as stored
                y_G1TK = attend(q_BHTK.reshape(B * H, 1, T, K), k_GSK[:, None], v_GSK[:, None],
                                jnp.repeat(mask_BTS, H, axis=0), implementation=options["implementation"])
                y_BHTK = y_G1TK.reshape(B, H, T, K)
            else:  # dropout draws row b's masks from keys_B[b]
                y_BHTK = attend(q_BHTK, k_GSK.reshape(B, H, -1, K), v_GSK.reshape(B, H, -1, K), mask_BTS, **options)
        y_BTD = y_BHTK.transpose(0, 2, 1, 3).reshape(B, T, D)
        y_BTD = Dense(D, kernel_init=_residual_init(cfg), name="c_proj", **dense)(y_BTD)
        return y_BTD, cache


class MLP(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.cfg
        dense = dict(dtype=compute_dtype(cfg), int8_activations=cfg.int8_activations)
        h_BTF = Dense(cfg.d_ff, kernel_init=_init_normal(INIT_STD), name="c_fc", **dense)(x_BTD)
        # GPT-2's "gelu_new" (tanh approximation), in float32: XLA:CPU runs a bf16 tanh 3-5x slower
        # (small's c_fc output, 1024 x 3072: forward 3.9 against 1.35 ms, forward and backward 7.7 against 1.7).
        h_BTF = nn.gelu(h_BTF.astype(jnp.float32), approximate=True).astype(h_BTF.dtype)
        return Dense(cfg.d_model, kernel_init=_residual_init(cfg), name="c_proj", **dense)(h_BTF)


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    # Exact two-pass variance (as PyTorch), statistics in float32 even for bf16 compute.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


class Block(nn.Module):
    cfg: GPT2Config

    @nn.compact
    def __call__(self, x_BTD, positions_BT, cache: LayerCache | None, keys_B: jax.Array | None):
        """``keys_B``: this layer's dropout keys, one per row (``None``: no dropout)."""
        a_BTD, cache = CausalSelfAttention(self.cfg, name="attn")(
            _layer_norm(self.cfg, "ln_1")(x_BTD), positions_BT, cache, fold_in_rows(keys_B, 0))
        x_BTD = x_BTD + dropout(a_BTD, self.cfg.dropout, fold_in_rows(keys_B, 1))
        m_BTD = MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x_BTD))
        x_BTD = x_BTD + dropout(m_BTD, self.cfg.dropout, fold_in_rows(keys_B, 2))
        return x_BTD, cache


class GPT2(nn.Module):
    """GPT-2 language model.

    ``apply({"params": p}, tokens_BT)`` returns float32 ``logits_BTV``. With ``cache=`` it
    returns ``(logits_BTV, new_cache)``; ``positions_BT`` then gives each token's absolute
    position (default ``0..T-1`` for every row). ``dropout_keys_B`` (one key per row) turns
    dropout on; each site's masks come from ``fold_in`` of those keys, never from Flax's rng streams.
    """

    cfg: GPT2Config

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        dropout_keys_B: jax.Array | None = None,
        *,
        positions_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        head: bool = True,
    ):
        cfg = self.cfg
        B, T = tokens_BT.shape
        assert T <= cfg.n_ctx, f"{T} tokens do not fit the model's context of {cfg.n_ctx}"
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        chex.assert_shape(positions_BT, (B, T))

        wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_init_normal(INIT_STD),
                       dtype=compute_dtype(cfg), param_dtype=jnp.float32, name="wte")
        wpe = nn.Embed(cfg.n_ctx, cfg.d_model, embedding_init=_init_normal(INIT_STD),
                       dtype=compute_dtype(cfg), param_dtype=jnp.float32, name="wpe")
        wte_scale_V = self.variables.get("params", {}).get("wte", {}).get("int8_scale")  # int8 (quantize_int8)
        dtype = compute_dtype(cfg)
        tok_BTD = take_rows(wte.embedding, tokens_BT, dtype)
        if wte_scale_V is not None:
            tok_BTD = tok_BTD * wte_scale_V[tokens_BT][..., None].astype(tok_BTD.dtype)
        if dropout_keys_B is not None:
            chex.assert_axis_dimension(dropout_keys_B, 0, B)
        x_BTD = dropout(tok_BTD + take_rows(wpe.embedding, positions_BT, dtype), cfg.dropout,
                        fold_in_rows(dropout_keys_B, 0))

        block_cls = nn.remat(Block) if cfg.remat else Block
        new_cache = []
        for i in range(cfg.n_layer):
            layer_cache = None if cache is None else cache[i]
            layer_keys_B = fold_in_rows(dropout_keys_B, i + 1)
            x_BTD, layer_cache = block_cls(cfg, name=f"h_{i}")(x_BTD, positions_BT, layer_cache, layer_keys_B)
            new_cache.append(layer_cache)

        x_BTD = _layer_norm(cfg, "ln_f")(x_BTD)
        if not head:  # the features the tied head reads: for a loss that never holds all the logits
            return x_BTD if cache is None else (x_BTD, tuple(new_cache))
        # LM head tied to the token embedding, float32 accumulation; wte is (V, D): matmul_t's layout.
        product = int8_matmul_t if cfg.int8_activations and wte_scale_V is not None else matmul_t
        logits_BTV = product(x_BTD.reshape(B * T, -1), wte.embedding).reshape(B, T, -1)
        if wte_scale_V is not None:
            logits_BTV = logits_BTV * wte_scale_V
        chex.assert_shape(logits_BTV, (B, T, cfg.vocab_size))
        if cache is None:
            return logits_BTV
        return logits_BTV, tuple(new_cache)


def init_params(cfg: GPT2Config, rng: jax.Array) -> dict:
    """Freshly initialised float32 parameters (GPT-2's initialisation)."""
    tokens_BT = jnp.zeros((1, min(cfg.n_ctx, 8)), jnp.int32)
    return GPT2(cfg).init(rng, tokens_BT)["params"]


def quantize_int8(params: dict) -> dict:
    """Weight-only int8 ``params`` for inference: every Dense kernel per output column and the tied token
    embedding per token, ``w ≈ int8 · int8_scale`` with ``int8_scale = max|w| / 127`` (float32). Biases,
    LayerNorms and the position table stay as they are. The model reads the result like ``params``."""
    def int8(w, axis):  # per slice along the other axis: dots.quantize_rows on w with ``axis`` last
        q, scale = quantize_rows(jnp.moveaxis(w, axis, -1))
        return jnp.moveaxis(q, -1, axis), scale[..., 0]

    def walk(tree, path):
        if path == ("wte",):
            q, scale = int8(tree["embedding"], axis=1)
            return {**tree, "embedding": q, "int8_scale": scale}
        if "kernel" in tree and getattr(tree["kernel"], "ndim", 0) == 2:
            q, scale = int8(tree["kernel"], axis=0)
            return {**tree, "kernel": q, "int8_scale": scale}
        return {k: walk(v, path + (k,)) if isinstance(v, dict) else v for k, v in tree.items()}

    assert "int8_scale" not in params["wte"], "params are already quantized"
    return walk(dict(params), ())


def forward(params, cfg: GPT2Config, tokens_BT, *, deterministic: bool = True, rng: jax.Array | None = None,
            dropout_keys_B: jax.Array | None = None, head: bool = True):
    """``logits_BTV = forward(params, cfg, tokens_BT)``: the model as a plain function.

    ``deterministic=False`` turns dropout on, row b drawing its masks from ``dropout_keys_B[b]``
    (default: ``fold_in(rng, b)``). ``head=False`` returns the final LayerNorm's output ``x_BTD``
    instead (see ``chunked_token_nll``).
    """
    if deterministic:
        dropout_keys_B = None
    elif dropout_keys_B is None:
        if rng is None:
            raise ValueError("forward(deterministic=False) needs rng= or dropout_keys_B= for its dropout masks")
        dropout_keys_B = jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(tokens_BT.shape[0]))
    return GPT2(cfg).apply({"params": params}, tokens_BT, dropout_keys_B, head=head)


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood ``nll_BT`` in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)


def chunked_token_nll(x_BTD: jax.Array, wte_VD: jax.Array, targets_BT: jax.Array, *,
                      vocab_chunk: int = 2048, scale_V: jax.Array | None = None) -> jax.Array:
    """``token_nll`` of the tied head's logits ``x_BTD @ wte_VDᵀ``, never holding the B·T x V logits.

    ``dots.vocab_chunked_nll`` walks the vocabulary ``vocab_chunk`` words at a time, forward and
    backward, accumulating in float32 whatever ``x_BTD``'s dtype. ``scale_V``: the per-token scales
    of an int8 ``wte_VD`` (``quantize_int8``).
    """
    B, T, D = x_BTD.shape
    nll_N = vocab_chunked_nll(x_BTD.reshape(B * T, D), wte_VD, targets_BT.reshape(B * T),
                              vocab_chunk=vocab_chunk, scale_V=scale_V)
    return nll_N.reshape(B, T)


def cross_entropy_loss(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy over the unmasked positions (``mask_BT`` 1 = scored)."""
    nll_BT = token_nll(logits_BTV, targets_BT)
    if mask_BT is None:
        return nll_BT.mean()
    mask_BT = mask_BT.astype(jnp.float32)
    return (nll_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


__all__: Sequence[str] = (
    "GPT2", "Block", "Dense", "CausalSelfAttention", "MLP", "LayerCache", "KVCache", "attend", "dropout",
    "fold_in_rows", "write_cache", "init_cache", "init_params", "quantize_int8", "forward", "token_nll",
    "chunked_token_nll", "cross_entropy_loss", "count_params",
)
