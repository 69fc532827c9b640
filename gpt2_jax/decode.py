"""Decoding: one-pass prefill, a KV-cache decode loop under ``lax.scan``, pure samplers.

    prompt ─► prefill (ONE forward pass fills the cache) ─► lax.scan over
              [ sample next token ─► decode_step (write its k/v at its position) ]

``generate`` compiles prefill + scan as ONE function, static in the config, method, new-token
count, rows per call and the prompt's bucket (``bucket_length``); parameters, tokens, rng and
sampler settings are traced, so new values never recompile. Beyond ``n_ctx`` a row's window
restarts as its last ``slide_keep`` tokens (default ``n_ctx // 2``), re-prefilled in one pass;
``slide_keep=n_ctx`` is the exact sliding window, at a full forward pass per token.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import memory
from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.model import GPT2, KVCache, compute_dtype, init_cache, quantize_int8

METHODS = ("greedy", "top_k", "nucleus", "top_k_nucleus")  # top_k_nucleus: top-k, then top-p
# Inference quantization: int8 = weight-only (model.quantize_int8); int8_dynamic = the same weights with
# each product's input rows quantized to int8 on the fly (GPT2Config.int8_activations; inference_config).
QUANTIZE = ("none", "int8", "int8_dynamic")
MIN_BUCKET = 16  # shortest prompt bucket: lengths 1..16 share one compilation


# ─── samplers: pure functions of (logits, rng, settings) ───────────────────────────────────────

def _order_keys(z_BV: jax.Array) -> jax.Array:
    """int32 keys that order like the float32 values (-inf lowest; -0.0 counted as +0.0)."""
    z_BV = jnp.where(z_BV == 0, 0.0, z_BV).astype(jnp.float32)
    bits_BV = jax.lax.bitcast_convert_type(z_BV, jnp.int32)
    return jnp.where(bits_BV < 0, bits_BV ^ jnp.int32(0x7FFFFFFF), bits_BV)


def _keep_first(z_BV: jax.Array, weight_BV: jax.Array, target) -> jax.Array:
    """Tokens by decreasing ``z`` (ties: lower id first) while the weight BEFORE them is < target.

    Weight 1 gives top-k, probabilities give top-p. No sort: a bisection over the 2^32 float keys
    finds the crossing value in 32 masked sums over V; tokens tied at it are taken by id.
    """
    key_BV = _order_keys(z_BV)
    weight_BV = weight_BV.astype(jnp.float32)
    target_B1 = jnp.broadcast_to(jnp.asarray(target, jnp.float32), z_BV.shape[:1])[:, None]
    mass = lambda mask_BV: jnp.sum(jnp.where(mask_BV, weight_BV, 0.0), axis=-1, keepdims=True)

    def halve(_, bounds):  # invariant: weight(key >= lo) >= target > weight(key > hi)
        lo_B1, hi_B1 = bounds
        mid_B1 = (lo_B1 >> 1) + (hi_B1 >> 1) + (((lo_B1 & 1) + (hi_B1 & 1) + 1) >> 1)  # ceil
        reached_B1 = mass(key_BV >= mid_B1) >= target_B1
        return jnp.where(reached_B1, mid_B1, lo_B1), jnp.where(reached_B1, hi_B1, mid_B1 - 1)

    lo_B1 = key_BV.min(axis=-1, keepdims=True)  # if even all tokens miss the target, all are kept
    t_B1, _ = jax.lax.fori_loop(0, 32, halve, (lo_B1, key_BV.max(axis=-1, keepdims=True)))
    above_BV, tied_BV = key_BV > t_B1, key_BV == t_B1
    tied_weight_BV = jnp.where(tied_BV, weight_BV, 0.0)
    tied_before_BV = jnp.cumsum(tied_weight_BV, axis=-1) - tied_weight_BV
    return above_BV | (tied_BV & (mass(above_BV) + tied_before_BV < target_B1))


def filter_logits(logits_BV: jax.Array, *, temperature=1.0, top_k=None, top_p=None) -> jax.Array:
    """``logits / temperature``, then -inf outside top-k, then outside top-p (the definition).

    top-k keeps exactly k (ties to the lower id); top-p keeps, of what is left (renormalised), the
    smallest prefix by probability reaching p, the crossing token included. ``None`` skips a
    filter; the settings may be traced. ``temperature`` > 0 here (``sample_logits`` handles 0).
    """
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is not None:
        keep_BV = _keep_first(scaled_BV, jnp.ones_like(scaled_BV), top_k)
        scaled_BV = jnp.where(keep_BV, scaled_BV, -jnp.inf)
    if top_p is not None:
        keep_BV = _keep_first(scaled_BV, jax.nn.softmax(scaled_BV, axis=-1), top_p)
        scaled_BV = jnp.where(keep_BV, scaled_BV, -jnp.inf)
    return scaled_BV


def sample_greedy(logits_BV: jax.Array) -> jax.Array:
    """The most likely token of each row (ties: lowest id)."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def row_keys(rng: jax.Array, rows_B: jax.Array) -> jax.Array:
    """One key per row from its index alone: a row gets the same key in any batch."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows_B)


def sample_logits(logits_BV: jax.Array, rng: jax.Array, *, method: str, temperature=1.0,
                  top_k=50, top_p=0.9) -> jax.Array:
    """One token per row by ``method`` (``METHODS``); temperature 0 is greedy.

    ``rng`` is one key (rows' noise then depends on the batch shape) or one key per row
    (``row_keys``: a row's token then depends on its own logits and key only).
    """
    assert method in METHODS, method
    if method == "greedy":
        return sample_greedy(logits_BV)
    temperature = jnp.asarray(temperature, jnp.float32)
    filtered_BV = filter_logits(
        logits_BV,
        temperature=jnp.where(temperature > 0, temperature, 1.0),
        top_k=top_k if method in ("top_k", "top_k_nucleus") else None,
        top_p=top_p if method in ("nucleus", "top_k_nucleus") else None,
    )
    if rng.ndim == (1 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 2):  # per row
        sampled_B = jax.vmap(jax.random.categorical)(rng, filtered_BV)
    else:
        sampled_B = jax.random.categorical(rng, filtered_BV, axis=-1)
    return jnp.where(temperature > 0, sampled_B.astype(jnp.int32), sample_greedy(logits_BV))


def sample_top_k(logits_BV: jax.Array, rng: jax.Array, *, top_k, temperature=1.0) -> jax.Array:
    """Sample among the ``top_k`` most likely tokens (exactly k; ties to the lower id)."""
    return sample_logits(logits_BV, rng, method="top_k", temperature=temperature, top_k=top_k)


def sample_nucleus(logits_BV: jax.Array, rng: jax.Array, *, top_p, temperature=1.0,
                   top_k=None) -> jax.Array:
    """Nucleus sampling (Holtzman et al. 2020), optionally inside the ``top_k`` first."""
    method = "nucleus" if top_k is None else "top_k_nucleus"
    return sample_logits(logits_BV, rng, method=method, temperature=temperature, top_k=top_k,
                         top_p=top_p)


# ─── decoding: prefill, decode_step, the scanned loop ──────────────────────────────────────────

def inference_config(cfg: GPT2Config, quantize: str = "none") -> GPT2Config:
    """``cfg`` for ``inference_params(..., quantize)``: ``int8_dynamic`` quantizes activations too."""
    assert quantize in QUANTIZE, quantize
    return cfg.replace(int8_activations=quantize == "int8_dynamic")


def inference_params(params, cfg: GPT2Config, quantize: str = "none"):
    """``params`` as decoding reads them, every weight once per token: in ``cfg``'s compute dtype
    (bf16 halves the bytes), or with ``quantize="int8"`` / ``"int8_dynamic"`` as ``quantize_int8``'s
    int8 kernels and embedding (a quarter) with float32 scales; what stays float is in the compute
    dtype. Dense kernels are stored transposed, as ``kernel_OI`` (see ``model.Dense``). Run them with
    ``inference_config(cfg, quantize)``."""
    assert quantize in QUANTIZE, quantize
    if quantize != "none":
        params = quantize_int8(params)
    dtype = compute_dtype(cfg)

    def cast(path, a):
        keep = path[-1].key == "int8_scale" or not jnp.issubdtype(a.dtype, jnp.floating)
        return a if keep else a.astype(dtype)

    def transpose_kernels(tree):
        if "kernel" in tree and getattr(tree["kernel"], "ndim", 0) == 2:
            tree = {("kernel_OI" if k == "kernel" else k): (v.T if k == "kernel" else v) for k, v in tree.items()}
        return {k: transpose_kernels(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return transpose_kernels(jax.tree_util.tree_map_with_path(cast, params))


def prefill(params, cfg: GPT2Config, cache: KVCache, prompt_BP: jax.Array, lengths_B: jax.Array):
    """A right-padded prompt in ONE pass; returns ``(next_logits_BV, cache)``."""
    B, P = prompt_BP.shape
    chex.assert_shape(lengths_B, (B,))
    assert P <= cfg.n_ctx, (P, cfg.n_ctx)
    # Padding writes garbage to slots >= length: decoding overwrites each before a query sees it.
    logits_BPV, cache = GPT2(cfg).apply({"params": params}, prompt_BP, cache=cache)
    next_logits_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return next_logits_BV, cache


def decode_step(params, cfg: GPT2Config, cache: KVCache, token_B: jax.Array,
                position_B: jax.Array):
    """Feed one token per row at its own position; returns ``(logits_BV, cache)``."""
    chex.assert_equal_shape([token_B, position_B])
    logits_B1V, cache = GPT2(cfg).apply(
        {"params": params}, token_B[:, None], positions_BT=position_B[:, None], cache=cache)
    return logits_B1V[:, 0], cache


class Sampling(NamedTuple):
    """The sampler settings as arrays, so that new values reuse the compiled loop."""

    temperature: jax.Array  # float32 scalar, 0 = greedy
    top_k: jax.Array  # int32 scalar
    top_p: jax.Array  # float32 scalar
    eos_id: jax.Array  # int32 scalar, -1 = never stop


def sampling_settings(*, temperature=1.0, top_k=50, top_p=0.9, eos_id=None) -> Sampling:
    return Sampling(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                    jnp.int32(-1 if eos_id is None else eos_id))


def cache_dtype(cfg: GPT2Config, platform: str) -> jnp.dtype:
    """The decoding KV cache's dtype on ``platform``: the compute dtype, but float32 on a CPU.

    XLA:CPU runs decoding's attention products (one query against the cache, per row and head) in
    float32 whatever their inputs. A bf16 cache cost three passes over it a layer and step: its write
    was not in place (the cache is written as 16-bit words, see ``model.write_cache``), XLA wrote it
    twice, and widened it to float32 for the products. A float32 cache is written in place and read as
    it is (small, bf16, batch 1, 2-core Zen 5: see the README's Performance section).
    """
    return jnp.dtype(jnp.float32) if platform == "cpu" else compute_dtype(cfg)


class DecodeState(NamedTuple):
    """What the decode loop carries from one token to the next (a pytree)."""

    cache: KVCache
    logits_BV: jax.Array  # each row's prediction for its next token
    position_B: jax.Array  # tokens in the row's current window = the next token's position
    history_BS: jax.Array  # each row's tokens from its first window's start on (right-padded)
    length_B: jax.Array  # tokens held in history_BS
    done_B: jax.Array  # the row has emitted eos_id; it now emits eos_id forever
    rng_B: jax.Array  # each row's own key: its tokens do not depend on the other rows


def start_decoding(params, cfg: GPT2Config, window_BW: jax.Array, lengths_B: jax.Array,
                   rng: jax.Array, *, capacity: int, rows_B: jax.Array | None = None
                   ) -> DecodeState:
    """Prefill windows, room for ``capacity`` tokens; row b's key: fold_in(rng, rows_B[b]).

    ``rows_B`` (default 0..B-1) are the rows' indices in the whole batch, decoded in slices.
    """
    B, W = window_BW.shape
    rows_B = jnp.arange(B) if rows_B is None else rows_B
    # Room for the window and every new token, at most n_ctx slots: attention reads all of a
    # cache's slots each step, so a short generation reads a short cache.
    cache = init_cache(cfg, B, min(cfg.n_ctx, W + capacity), cache_dtype(cfg, jax.default_backend()))
    logits_BV, cache = prefill(params, cfg, cache, window_BW, lengths_B)
    history_BS = jnp.zeros((B, W + capacity), jnp.int32).at[:, :W].set(window_BW)
    return DecodeState(cache, logits_BV, lengths_B, history_BS, lengths_B, jnp.zeros((B,), bool),
                       row_keys(rng, rows_B))


def advance_decoding(params, cfg: GPT2Config, state: DecodeState, sampling: Sampling, *,
                     method: str, num_steps: int, slide_keep: int
                     ) -> tuple[DecodeState, jax.Array]:
    """``num_steps`` tokens per row (within ``start_decoding``'s capacity); ``(state, new_BN)``.

    A ``lax.scan`` with no ``lax.cond`` around the cache: XLA copies every operand a cond passes
    through, which here is the whole cache each step (small's batch-8 step took 13-20% longer). So a
    window that cannot fill (the history fits in ``n_ctx``) has no slide at all, statically, and
    steps after every row has emitted ``eos_id`` still run (``stream_generate`` stops at the chunk).
    """
    assert 1 <= slide_keep <= cfg.n_ctx, (slide_keep, cfg.n_ctx)
    B, S = state.history_BS.shape
    rows_B = jnp.arange(B)
    may_slide = S > cfg.n_ctx

    def slide(args):  # rows whose window is full restart from their last slide_keep tokens
        logits_BV, cache, position_B, history_BS, length_B, full_B = args
        idx_BW = length_B[:, None] - slide_keep + jnp.arange(slide_keep)[None, :]
        window_BW = jnp.take_along_axis(history_BS, jnp.maximum(idx_BW, 0), axis=1)
        re_logits_BV, re_cache = prefill(params, cfg, cache, window_BW,
                                         jnp.full((B,), slide_keep, jnp.int32))
        def pick(new, old):  # new's row b where full_B[b]; the cache's leading axis is G = B·H
            full = jnp.repeat(full_B, old.shape[0] // B).reshape((old.shape[0],) + (1,) * (old.ndim - 1))
            return jnp.where(full, new, old)

        return (pick(re_logits_BV, logits_BV), jax.tree_util.tree_map(pick, re_cache, cache),
                jnp.where(full_B, slide_keep, position_B))

    def step(state: DecodeState) -> tuple[DecodeState, jax.Array]:
        keys_B2 = jax.vmap(jax.random.split)(state.rng_B)
        token_B = sample_logits(state.logits_BV, keys_B2[:, 1], method=method,
                                temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p)
        token_B = jnp.where(state.done_B, sampling.eos_id, token_B)
        history_BS = state.history_BS.at[rows_B, state.length_B].set(token_B)
        # A full window's row writes nowhere useful (position clamped) and is slid below.
        full_B = state.position_B >= cfg.n_ctx
        logits_BV, cache = decode_step(params, cfg, state.cache, token_B,
                                       jnp.minimum(state.position_B, cfg.n_ctx - 1))
        position_B = state.position_B + 1
        if may_slide:
            logits_BV, cache, position_B = jax.lax.cond(
                jnp.any(full_B), slide, lambda args: args[:3],
                (logits_BV, cache, position_B, history_BS, state.length_B + 1, full_B))
        return DecodeState(cache, logits_BV, position_B, history_BS, state.length_B + 1,
                           state.done_B | (token_B == sampling.eos_id), keys_B2[:, 0]), token_B

    state, tokens_NB = jax.lax.scan(lambda state, _: step(state), state, None, length=num_steps)
    return state, tokens_NB.T


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "slide_keep"))
def _generate_jit(params, window_BW, lengths_B, rng, rows_B, sampling, *, cfg, method,
                  max_new_tokens, slide_keep):
    """Prefill + the whole decode loop: ONE compiled function per (cfg, method, N, bucket, B)."""
    state = start_decoding(params, cfg, window_BW, lengths_B, rng, capacity=max_new_tokens,
                           rows_B=rows_B)
    _, new_BN = advance_decoding(params, cfg, state, sampling, method=method,
                                 num_steps=max_new_tokens, slide_keep=slide_keep)
    return new_BN


_start_jit = jax.jit(start_decoding, static_argnames=("cfg", "capacity"))
_advance_jit = jax.jit(advance_decoding,
                       static_argnames=("cfg", "method", "num_steps", "slide_keep"))


# ─── host-side entry points: validation, bucketing, assembling the output ─────────────────────

def bucket_length(length: int, n_ctx: int) -> int:
    """Padded prompt width: the next power of two >= length, in [MIN_BUCKET, n_ctx]."""
    assert 1 <= length <= n_ctx, (length, n_ctx)
    return min(n_ctx, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def check_sampling_args(cfg: GPT2Config, *, method: str, max_new_tokens: int,
                        temperature: float = 1.0, top_k: int = 50, top_p: float = 0.9,
                        eos_id: int | None = None, slide_keep: int | None = None) -> None:
    """One-line UserError for settings that make no sense (only those ``method`` uses)."""
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not max_new_tokens >= 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if method != "greedy" and not temperature >= 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if method in ("top_k", "top_k_nucleus") and not 1 <= top_k <= cfg.vocab_size:
        raise UserError(
            f"top_k must be between 1 and the vocabulary size {cfg.vocab_size}, got {top_k}")
    if method in ("nucleus", "top_k_nucleus") and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise UserError(f"eos_id must be a token id in [0, {cfg.vocab_size}), got {eos_id}")
    if slide_keep is not None and not 1 <= slide_keep <= cfg.n_ctx:
        raise UserError(f"slide_keep must be between 1 and n_ctx={cfg.n_ctx}, got {slide_keep}")


def prompt_windows(cfg: GPT2Config, prompt_BP, prompt_lengths_B=None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(window_BW, window_lengths_B, lengths_B)``: each row's last <= n_ctx tokens, 0-padded."""
    prompt_BP = np.asarray(prompt_BP)
    if prompt_BP.ndim != 2 or prompt_BP.shape[0] == 0:
        raise UserError(
            f"prompt must be a (batch, length) array of token ids, got shape {prompt_BP.shape}")
    if not np.issubdtype(prompt_BP.dtype, np.integer):
        raise UserError(f"prompt must hold integer token ids, got dtype {prompt_BP.dtype}")
    B, P = prompt_BP.shape
    lengths_B = np.full((B,), P) if prompt_lengths_B is None else np.asarray(prompt_lengths_B)
    if lengths_B.shape != (B,) or not np.issubdtype(lengths_B.dtype, np.integer):
        raise UserError(f"prompt_lengths must be {B} integers, one per row, got {lengths_B!r}")
    if P == 0 or lengths_B.min() < 1:
        raise UserError("empty prompt: every row needs at least one token")
    if lengths_B.max() > P:
        raise UserError(f"prompt_lengths {lengths_B.tolist()} exceed the prompt width {P}")
    valid_BP = np.arange(P)[None, :] < lengths_B[:, None]
    if np.any(valid_BP & ((prompt_BP < 0) | (prompt_BP >= cfg.vocab_size))):
        raise UserError(
            f"prompt has token ids outside the model's vocabulary [0, {cfg.vocab_size})")
    window_lengths_B = np.minimum(lengths_B, cfg.n_ctx)
    window_BW = np.zeros((B, bucket_length(int(window_lengths_B.max()), cfg.n_ctx)), np.int32)
    for b, (n, w) in enumerate(zip(lengths_B, window_lengths_B)):
        window_BW[b, :w] = prompt_BP[b, n - w:n]
    return window_BW, window_lengths_B.astype(np.int32), lengths_B.astype(np.int32)


def _prepare(cfg, prompt_BP, prompt_lengths_B, *, slide_keep, method, max_new_tokens,
             temperature, top_k, top_p, eos_id=None):
    """The checks and settings every entry point shares: windows, slide_keep, Sampling."""
    windows = prompt_windows(cfg, prompt_BP, prompt_lengths_B)
    slide_keep = cfg.n_ctx // 2 if slide_keep is None else slide_keep
    check_sampling_args(cfg, method=method, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                        slide_keep=slide_keep)
    sampling = sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    return windows, slide_keep, sampling


def generate(params, cfg: GPT2Config, prompt_BP, *, max_new_tokens: int, method: str = "greedy",
             top_k: int = 50, top_p: float = 0.9, temperature: float = 1.0,
             rng: jax.Array | None = None, prompt_lengths_B=None, eos_id: int | None = None,
             slide_keep: int | None = None, rows_per_call: int | None = None) -> jax.Array:
    """Continue each prompt row by N tokens; returns int32 ``out_BS``, S = P + N.

    Row b: its ``prompt_lengths_B[b]`` tokens (default P), its N new ones, then padding (eos_id,
    else 0); a row that emits eos_id keeps emitting it. Rows sample with their own keys, so
    ``rows_per_call`` (default: as many as fit in memory) never changes the result.
    """
    (window_BW, window_lengths_B, lengths_B), slide_keep, sampling = _prepare(
        cfg, prompt_BP, prompt_lengths_B, slide_keep=slide_keep, method=method,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_id=eos_id)
    if rows_per_call is not None and rows_per_call < 1:
        raise UserError(f"rows_per_call must be >= 1, got {rows_per_call}")
    B, W = window_BW.shape
    rng = jax.random.PRNGKey(0) if rng is None else rng
    static = dict(cfg=cfg, method=method, max_new_tokens=max_new_tokens, slide_keep=slide_keep)
    if rows_per_call is None:
        ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        rows_per_call = memory.rows_that_fit(
            lambda n: _generate_jit.lower(params, ints(n, W), ints(n), rng, ints(n), sampling,
                                          **static).compile(), B, jax.local_devices()[:1])
    rows_per_call = min(rows_per_call, B)
    new_BN = []
    for start in range(0, B, rows_per_call):
        rows_R = np.arange(start, start + rows_per_call, dtype=np.int32)
        take_R = np.minimum(rows_R, B - 1)  # the last call is padded with copies of the last row
        new_BN.append(np.asarray(_generate_jit(
            params, jnp.asarray(window_BW[take_R]), jnp.asarray(window_lengths_B[take_R]), rng,
            jnp.asarray(rows_R), sampling, **static)))
    return jnp.asarray(join_continuations(np.asarray(prompt_BP), lengths_B,
                                          np.concatenate(new_BN)[:B],
                                          pad_id=0 if eos_id is None else eos_id))


def join_continuations(prompt_BP: np.ndarray, lengths_B: np.ndarray, new_BN: np.ndarray, *,
                       pad_id: int) -> np.ndarray:
    """Each row's prompt tokens followed by its new tokens, right-padded with ``pad_id``."""
    (B, P), N = prompt_BP.shape, new_BN.shape[1]
    out_BS = np.full((B, P + N), pad_id, np.int32)
    for b, n in enumerate(lengths_B):
        out_BS[b, :n] = prompt_BP[b, :n]
        out_BS[b, n:n + N] = new_BN[b]
    return out_BS


def stream_generate(params, cfg: GPT2Config, prompt_BP, *, max_new_tokens: int,
                    chunk_size: int = 8, method: str = "greedy", top_k: int = 50,
                    top_p: float = 0.9, temperature: float = 1.0, rng: jax.Array | None = None,
                    prompt_lengths_B=None, eos_id: int | None = None,
                    slide_keep: int | None = None) -> Iterator[np.ndarray]:
    """``generate``'s new tokens as ``chunk_BC`` arrays (the last may be shorter), same tokens.

    Chunks rather than a callback per token: the loop stays pure and the host syncs once per
    chunk. With ``eos_id`` it stops once every row has emitted it.
    """
    (window_BW, window_lengths_B, _), slide_keep, sampling = _prepare(
        cfg, prompt_BP, prompt_lengths_B, slide_keep=slide_keep, method=method,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_id=eos_id)
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    num_chunks = -(-max_new_tokens // chunk_size)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    state = _start_jit(params, cfg, jnp.asarray(window_BW), jnp.asarray(window_lengths_B), rng,
                       capacity=num_chunks * chunk_size)
    for i in range(num_chunks):
        state, chunk_BC = _advance_jit(params, cfg, state, sampling, method=method,
                                       num_steps=chunk_size, slide_keep=slide_keep)
        yield np.asarray(chunk_BC)[:, :max_new_tokens - i * chunk_size]
        if bool(state.done_B.all()):
            return
