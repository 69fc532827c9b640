"""Text generation: one-pass prefill, a KV-cache decode loop under ``lax.scan``, pure samplers.

    prompt ─► prefill (ONE forward pass, fills the cache) ─► lax.scan over
              [ sample next token ─► decode_step (write its k/v at its position) ]

Everything numerical is a pure, jit-able function of arrays; ``generate`` runs the whole
prefill + scan as ONE compiled function. Static (a new value compiles again): the config, the
method, ``max_new_tokens``, the rows per call and the prompt's *bucket* (its length rounded up to a
power of two, at least 16, at most ``n_ctx``), so a new prompt length in the same bucket reuses the
compiled function. Dynamic (change freely): parameters, prompt tokens and lengths, rng,
temperature, top_k, top_p, eos_id.

Sampling (``filter_logits`` is the definition): logits are divided by the temperature FIRST, then
top-k keeps exactly the k largest (ties go to the lower token id), then top-p keeps the smallest
prefix of the remaining tokens, by decreasing probability, whose cumulative probability reaches
p, the token that crosses p included. Temperature 0 is greedy (argmax, ties to the lower id).

Beyond the context (learned positions stop at ``n_ctx``), a row slides its window: the window
holds the tokens the model sees, at positions 0..; when a new token does not fit (the window
already holds ``n_ctx`` tokens), the window restarts as the row's last ``slide_keep`` tokens
(default ``n_ctx // 2``), re-prefilled in one pass, and decoding continues from there. So after
the first slide every prediction sees between ``slide_keep`` and ``n_ctx`` tokens, for the cost of one
``slide_keep``-token prefill every ``n_ctx - slide_keep + 1`` tokens. ``slide_keep=n_ctx`` is the exact
sliding window (always the last ``n_ctx`` tokens), at the price of a full ``n_ctx``-token forward pass
per token: 8x slower for the tiny preset on CPU (512 greedy tokens: 534 vs 70 tokens/s, measured with
experiments/generate_speed.py). A prompt longer than ``n_ctx`` starts from its last ``n_ctx`` tokens.

CLI: ``python -m gpt2_jax.sample --run_dir=runs/small --method=nucleus --prompt="The man jumped"``
(``--help`` lists the flags). One sequence is streamed as it is produced, several are printed one
by one, ``--method=all`` prints greedy, top-k and nucleus side by side.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import shutil
import sys
import textwrap
import time
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt2_jax import memory
from gpt2_jax.cli import check, parse_flags, run
from gpt2_jax.errors import UserError
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import GPT2, KVCache, init_cache

METHODS = ("greedy", "top_k", "nucleus", "top_k_nucleus")  # top_k_nucleus: top-k, then top-p
MIN_BUCKET = 16  # shortest prompt bucket: lengths 1..16 share one compilation


# ─── samplers: pure functions of (logits, rng, settings) ───────────────────────────────────────

def _order_keys(z_BV: jax.Array) -> jax.Array:
    """int32 keys that order like the float32 values (-inf lowest; -0.0 counted as +0.0)."""
    bits_BV = jax.lax.bitcast_convert_type(jnp.where(z_BV == 0, 0.0, z_BV).astype(jnp.float32), jnp.int32)
    return jnp.where(bits_BV < 0, bits_BV ^ jnp.int32(0x7FFFFFFF), bits_BV)


def _keep_first(z_BV: jax.Array, weight_BV: jax.Array, target) -> jax.Array:
    """Tokens taken in order of decreasing ``z`` (ties: lower id first) while the weight BEFORE them is < target.

    With weight 1 that is top-k (target k); with probabilities, top-p (the crossing token is in).
    No sort: a bisection over the 2^32 float keys finds the crossing token's value t, the largest
    with weight(z >= t) >= target, in 32 masked sums over V (~0.2 ms per 32k-token row on CPU,
    where a full argsort takes ~6 ms). Tokens tied at t are then taken by id.
    """
    key_BV = _order_keys(z_BV)
    weight_BV = weight_BV.astype(jnp.float32)
    target_B1 = jnp.broadcast_to(jnp.asarray(target, jnp.float32), z_BV.shape[:1])[:, None]

    def halve(_, bounds):  # invariant: weight(key >= lo) >= target > weight(key > hi)
        lo_B1, hi_B1 = bounds
        mid_B1 = (lo_B1 >> 1) + (hi_B1 >> 1) + (((lo_B1 & 1) + (hi_B1 & 1) + 1) >> 1)  # ceil, no overflow
        reached_B1 = jnp.sum(jnp.where(key_BV >= mid_B1, weight_BV, 0.0), axis=-1, keepdims=True) >= target_B1
        return jnp.where(reached_B1, mid_B1, lo_B1), jnp.where(reached_B1, hi_B1, mid_B1 - 1)

    lo_B1 = key_BV.min(axis=-1, keepdims=True)  # if even all tokens miss the target, all are kept
    t_B1, _ = jax.lax.fori_loop(0, 32, halve, (lo_B1, key_BV.max(axis=-1, keepdims=True)))
    above_BV, tied_BV = key_BV > t_B1, key_BV == t_B1
    weight_above_B1 = jnp.sum(jnp.where(above_BV, weight_BV, 0.0), axis=-1, keepdims=True)
    tied_weight_BV = jnp.where(tied_BV, weight_BV, 0.0)
    tied_before_BV = jnp.cumsum(tied_weight_BV, axis=-1) - tied_weight_BV
    return above_BV | (tied_BV & (weight_above_B1 + tied_before_BV < target_B1))


def filter_logits(logits_BV: jax.Array, *, temperature=1.0, top_k=None, top_p=None) -> jax.Array:
    """``logits / temperature`` with every token outside top-k, then outside top-p, set to -inf.

    Order: decreasing probability, ties to the lower id. top-k keeps the first k; top-p keeps, of
    what top-k left (renormalised), the first tokens while the probability before them is < p.
    ``top_k``/``top_p`` may be traced scalars (no recompilation when they change); ``None`` skips
    that filter. ``temperature`` must be > 0 here (``sample_logits`` handles 0 as greedy).
    """
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is not None:
        scaled_BV = jnp.where(_keep_first(scaled_BV, jnp.ones_like(scaled_BV), top_k), scaled_BV, -jnp.inf)
    if top_p is not None:
        probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
        scaled_BV = jnp.where(_keep_first(scaled_BV, probs_BV, top_p), scaled_BV, -jnp.inf)
    return scaled_BV


def sample_greedy(logits_BV: jax.Array) -> jax.Array:
    """The most likely token of each row (ties: lowest id)."""
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def _is_per_row(rng: jax.Array) -> bool:
    """Whether ``rng`` is one key per row rather than one key (raw uint32 keys or typed ones)."""
    return rng.ndim == (1 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 2)


def row_keys(rng: jax.Array, rows_B: jax.Array) -> jax.Array:
    """One key per row, from the row's index alone: the same row gets the same key in any batch."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows_B)


def sample_logits(logits_BV: jax.Array, rng: jax.Array, *, method: str, temperature=1.0, top_k=50,
                  top_p=0.9) -> jax.Array:
    """One token per row by ``method`` (see ``METHODS``); temperature 0 means greedy.

    Only the settings the method uses are read (``top_k`` for top_k/top_k_nucleus, ``top_p`` for
    nucleus/top_k_nucleus). ``rng`` is one key, from which the rows draw independent noise (each
    row's noise then depends on the batch's shape), or one key per row (``row_keys``): a row's
    token then depends on its own logits and key only, whichever rows share the call.
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
    if _is_per_row(rng):
        sampled_B = jax.vmap(lambda key, z_V: jax.random.categorical(key, z_V))(rng, filtered_BV)
    else:
        sampled_B = jax.random.categorical(rng, filtered_BV, axis=-1)
    sampled_B = sampled_B.astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_B, sample_greedy(logits_BV))


def sample_top_k(logits_BV: jax.Array, rng: jax.Array, *, top_k, temperature=1.0) -> jax.Array:
    """Sample among the ``top_k`` most likely tokens (exactly k; ties to the lower id)."""
    return sample_logits(logits_BV, rng, method="top_k", temperature=temperature, top_k=top_k)


def sample_nucleus(logits_BV: jax.Array, rng: jax.Array, *, top_p, temperature=1.0, top_k=None) -> jax.Array:
    """Nucleus sampling (Holtzman et al. 2020), optionally inside the ``top_k`` first."""
    method = "nucleus" if top_k is None else "top_k_nucleus"
    return sample_logits(logits_BV, rng, method=method, temperature=temperature, top_k=top_k, top_p=top_p)


# ─── decoding: prefill, decode_step, the scanned loop ──────────────────────────────────────────

def prefill(params, cfg: GPT2Config, cache: KVCache, prompt_BP: jax.Array, lengths_B: jax.Array):
    """Run a right-padded prompt through the model in ONE pass, writing cache slots 0..P-1.

    Returns ``(next_logits_BV, cache)``: row b's prediction after its ``lengths_B[b]`` tokens.
    Padding writes garbage to slots >= length; decoding overwrites each slot before any query
    can see it (a query attends to slots <= its own position).
    """
    B, P = prompt_BP.shape
    chex.assert_shape(lengths_B, (B,))
    assert P <= cfg.n_ctx, (P, cfg.n_ctx)
    logits_BPV, cache = GPT2(cfg).apply({"params": params}, prompt_BP, cache=cache)
    next_logits_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return next_logits_BV, cache


def decode_step(params, cfg: GPT2Config, cache: KVCache, token_B: jax.Array, position_B: jax.Array):
    """Feed one token per row at its own position; returns ``(logits_BV, cache)``."""
    chex.assert_equal_shape([token_B, position_B])
    logits_B1V, cache = GPT2(cfg).apply(
        {"params": params}, token_B[:, None], positions_BT=position_B[:, None], cache=cache)
    return logits_B1V[:, 0], cache


class Sampling(NamedTuple):
    """The dynamic sampler settings, as arrays so that new values reuse the compiled loop."""

    temperature: jax.Array  # float32 scalar, 0 = greedy
    top_k: jax.Array  # int32 scalar
    top_p: jax.Array  # float32 scalar
    eos_id: jax.Array  # int32 scalar, -1 = never stop


def sampling_settings(*, temperature=1.0, top_k=50, top_p=0.9, eos_id=None) -> Sampling:
    return Sampling(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                    jnp.int32(-1 if eos_id is None else eos_id))


class DecodeState(NamedTuple):
    """Everything the decode loop carries from one token to the next (a pytree)."""

    cache: KVCache
    logits_BV: jax.Array  # each row's prediction for its next token
    position_B: jax.Array  # tokens in the row's current window = position the next token takes
    history_BS: jax.Array  # each row's tokens from its first window's start on (right-padded)
    length_B: jax.Array  # tokens held in history_BS
    done_B: jax.Array  # the row has emitted eos_id; it now emits eos_id forever
    rng_B: jax.Array  # each row's own key: its tokens do not depend on the other rows of the batch


def start_decoding(params, cfg: GPT2Config, window_BW: jax.Array, lengths_B: jax.Array, rng: jax.Array, *,
                   capacity: int, rows_B: jax.Array | None = None) -> DecodeState:
    """Prefill the (right-padded, <= n_ctx) prompt windows; room for ``capacity`` new tokens.

    Row b samples with ``fold_in(rng, rows_B[b])``; ``rows_B`` (default 0..B-1) is each row's index
    in the whole batch when a large batch is decoded a slice at a time.
    """
    B, W = window_BW.shape
    rows_B = jnp.arange(B) if rows_B is None else rows_B
    logits_BV, cache = prefill(params, cfg, init_cache(cfg, B), window_BW, lengths_B)
    history_BS = jnp.zeros((B, W + capacity), jnp.int32).at[:, :W].set(window_BW)
    return DecodeState(cache, logits_BV, lengths_B, history_BS, lengths_B, jnp.zeros((B,), bool),
                       row_keys(rng, rows_B))


def advance_decoding(params, cfg: GPT2Config, state: DecodeState, sampling: Sampling, *, method: str,
                     num_steps: int, slide_keep: int) -> tuple[DecodeState, jax.Array]:
    """Sample ``num_steps`` tokens per row (``lax.scan``); returns ``(state, new_tokens_BN)``.

    The caller guarantees ``history_BS`` has room for them (``start_decoding``'s capacity).
    """
    assert 1 <= slide_keep <= cfg.n_ctx, (slide_keep, cfg.n_ctx)
    B = state.length_B.shape[0]
    rows_B = jnp.arange(B)

    def slide(args):
        # Rows whose window is full restart from their last `slide_keep` tokens (the new one included).
        logits_BV, cache, position_B, history_BS, length_B, full_B = args
        idx_BW = length_B[:, None] - slide_keep + jnp.arange(slide_keep)[None, :]
        window_BW = jnp.take_along_axis(history_BS, jnp.maximum(idx_BW, 0), axis=1)
        re_logits_BV, re_cache = prefill(params, cfg, cache, window_BW, jnp.full((B,), slide_keep, jnp.int32))
        pick = lambda new, old: jnp.where(full_B.reshape((B,) + (1,) * (old.ndim - 1)), new, old)
        return (pick(re_logits_BV, logits_BV), jax.tree_util.tree_map(pick, re_cache, cache),
                jnp.where(full_B, slide_keep, position_B))

    def step(state: DecodeState) -> tuple[DecodeState, jax.Array]:
        keys_B2 = jax.vmap(jax.random.split)(state.rng_B)
        rng_B, key_B = keys_B2[:, 0], keys_B2[:, 1]
        token_B = sample_logits(state.logits_BV, key_B, method=method, temperature=sampling.temperature,
                                top_k=sampling.top_k, top_p=sampling.top_p)
        token_B = jnp.where(state.done_B, sampling.eos_id, token_B)
        done_B = state.done_B | (token_B == sampling.eos_id)
        history_BS = state.history_BS.at[rows_B, state.length_B].set(token_B)
        length_B = state.length_B + 1
        # Feed the token. A full window's row writes nowhere useful (clamped) and is slid below.
        full_B = state.position_B >= cfg.n_ctx
        logits_BV, cache = decode_step(params, cfg, state.cache, token_B, jnp.minimum(state.position_B, cfg.n_ctx - 1))
        position_B = state.position_B + 1
        logits_BV, cache, position_B = jax.lax.cond(
            jnp.any(full_B), slide, lambda args: args[:3],
            (logits_BV, cache, position_B, history_BS, length_B, full_B))
        return DecodeState(cache, logits_BV, position_B, history_BS, length_B, done_B, rng_B), token_B

    def finished(state: DecodeState) -> tuple[DecodeState, jax.Array]:
        return state, jnp.full((B,), sampling.eos_id, jnp.int32)

    def body(state, _):
        # Once every row has stopped, the remaining steps cost nothing but this test.
        return jax.lax.cond(jnp.all(state.done_B), finished, step, state)

    state, tokens_NB = jax.lax.scan(body, state, None, length=num_steps)
    return state, tokens_NB.T


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "slide_keep"))
def _generate_jit(params, window_BW, lengths_B, rng, rows_B, sampling, *, cfg, method, max_new_tokens, slide_keep):
    """Prefill + the whole decode loop: ONE compiled function per (cfg, method, N, bucket, B)."""
    state = start_decoding(params, cfg, window_BW, lengths_B, rng, capacity=max_new_tokens, rows_B=rows_B)
    _, new_BN = advance_decoding(params, cfg, state, sampling, method=method, num_steps=max_new_tokens,
                                 slide_keep=slide_keep)
    return new_BN


_start_jit = jax.jit(start_decoding, static_argnames=("cfg", "capacity"))
_advance_jit = jax.jit(advance_decoding, static_argnames=("cfg", "method", "num_steps", "slide_keep"))


# ─── the host-side entry points: validation, bucketing, assembling the output ──────────────────

def bucket_length(length: int, n_ctx: int) -> int:
    """The padded prompt width: the next power of two >= length, at least MIN_BUCKET, at most n_ctx."""
    assert 1 <= length <= n_ctx, (length, n_ctx)
    return min(n_ctx, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


def check_sampling_args(cfg: GPT2Config, *, method: str, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int = 50, top_p: float = 0.9, eos_id: int | None = None,
                        slide_keep: int | None = None) -> None:
    """UserError (one line) for settings that make no sense; only the ones ``method`` uses are checked."""
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not max_new_tokens >= 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if method != "greedy" and not temperature >= 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if method in ("top_k", "top_k_nucleus") and not 1 <= top_k <= cfg.vocab_size:
        raise UserError(f"top_k must be between 1 and the vocabulary size {cfg.vocab_size}, got {top_k}")
    if method in ("nucleus", "top_k_nucleus") and not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise UserError(f"eos_id must be a token id in [0, {cfg.vocab_size}), got {eos_id}")
    if slide_keep is not None and not 1 <= slide_keep <= cfg.n_ctx:
        raise UserError(f"slide_keep must be between 1 and n_ctx={cfg.n_ctx}, got {slide_keep}")


def prompt_windows(cfg: GPT2Config, prompt_BP, prompt_lengths_B=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check a right-padded prompt batch; return ``(window_BW, window_lengths_B, lengths_B)``.

    A row's window is its last min(length, n_ctx) tokens, right-padded with 0 to the bucket W.
    """
    prompt_BP = np.asarray(prompt_BP)
    if prompt_BP.ndim != 2 or prompt_BP.shape[0] == 0:
        raise UserError(f"prompt must be a (batch, length) array of token ids, got shape {prompt_BP.shape}")
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
        raise UserError(f"prompt has token ids outside the model's vocabulary [0, {cfg.vocab_size})")
    window_lengths_B = np.minimum(lengths_B, cfg.n_ctx)
    W = bucket_length(int(window_lengths_B.max()), cfg.n_ctx)
    window_BW = np.zeros((B, W), np.int32)
    for b in range(B):
        window_BW[b, :window_lengths_B[b]] = prompt_BP[b, lengths_B[b] - window_lengths_B[b]:lengths_B[b]]
    return window_BW, window_lengths_B.astype(np.int32), lengths_B.astype(np.int32)


def _rng_or_default(rng) -> jax.Array:
    return jax.random.PRNGKey(0) if rng is None else rng


def generate(params, cfg: GPT2Config, prompt_BP, *, max_new_tokens: int, method: str = "greedy",
             top_k: int = 50, top_p: float = 0.9, temperature: float = 1.0, rng: jax.Array | None = None,
             prompt_lengths_B=None, eos_id: int | None = None, slide_keep: int | None = None,
             rows_per_call: int | None = None) -> jax.Array:
    """Continue each prompt row by ``max_new_tokens`` tokens; returns int32 ``out_BS``, S = P + N.

    Row b is its ``prompt_lengths_B[b]`` prompt tokens (default: all P), then its N new tokens,
    then padding (``eos_id``, or 0 without it) up to S. With ``eos_id``, a row that emits it keeps
    emitting it. ``rng`` defaults to ``PRNGKey(0)``; ``slide_keep`` to ``n_ctx // 2`` (module doc).
    Row b samples with its own key ``fold_in(rng, b)``, so its tokens do not depend on the other
    rows: a batch is decoded ``rows_per_call`` rows at a time (default: as many as fit in free
    memory, ``memory.rows_that_fit``) with the same result as in one call.
    Call it outside ``jit`` (it checks and buckets the prompt on the host); its compiled core is
    ``start_decoding`` + ``advance_decoding``, which jit-traced code can call directly.
    """
    window_BW, window_lengths_B, lengths_B = prompt_windows(cfg, prompt_BP, prompt_lengths_B)
    slide_keep = cfg.n_ctx // 2 if slide_keep is None else slide_keep
    check_sampling_args(cfg, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_id=eos_id, slide_keep=slide_keep)
    if rows_per_call is not None and rows_per_call < 1:
        raise UserError(f"rows_per_call must be >= 1, got {rows_per_call}")
    B, W = window_BW.shape
    rng = _rng_or_default(rng)
    sampling = sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    static = dict(cfg=cfg, method=method, max_new_tokens=max_new_tokens, slide_keep=slide_keep)
    if rows_per_call is None:
        int_shape = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
        rows_per_call = memory.rows_that_fit(
            lambda n: _generate_jit.lower(params, int_shape(n, W), int_shape(n), rng, int_shape(n), sampling,
                                          **static).compile(), B, jax.local_devices()[:1])
    rows_per_call = min(rows_per_call, B)
    calls = []
    for start in range(0, B, rows_per_call):
        rows_R = np.arange(start, start + rows_per_call, dtype=np.int32)
        take_R = np.minimum(rows_R, B - 1)  # the last call is padded with copies of the last row
        calls.append(_generate_jit(params, jnp.asarray(window_BW[take_R]), jnp.asarray(window_lengths_B[take_R]),
                                   rng, jnp.asarray(rows_R), sampling, **static))
    new_BN = np.concatenate([np.asarray(new_RN) for new_RN in calls])[:B]
    return jnp.asarray(join_continuations(np.asarray(prompt_BP), lengths_B, new_BN,
                                          pad_id=0 if eos_id is None else eos_id))


def join_continuations(prompt_BP: np.ndarray, lengths_B: np.ndarray, new_BN: np.ndarray, *, pad_id: int) -> np.ndarray:
    """Each row's prompt tokens followed by its new tokens, right-padded with ``pad_id``."""
    B, P = prompt_BP.shape
    N = new_BN.shape[1]
    out_BS = np.full((B, P + N), pad_id, np.int32)
    for b in range(B):
        out_BS[b, :lengths_B[b]] = prompt_BP[b, :lengths_B[b]]
        out_BS[b, lengths_B[b]:lengths_B[b] + N] = new_BN[b]
    return out_BS


def stream_generate(params, cfg: GPT2Config, prompt_BP, *, max_new_tokens: int, chunk_size: int = 8,
                    method: str = "greedy", top_k: int = 50, top_p: float = 0.9, temperature: float = 1.0,
                    rng: jax.Array | None = None, prompt_lengths_B=None, eos_id: int | None = None,
                    slide_keep: int | None = None) -> Iterator[np.ndarray]:
    """``generate``'s new tokens as they are produced: yields ``chunk_BC`` arrays (the last may be shorter).

    Same settings and seed give the same tokens as ``generate``. Each chunk is one call of the
    same compiled ``chunk_size``-step loop; with ``eos_id`` it stops once every row has emitted it.
    (Chunks rather than a ``jax.debug.callback`` per token: the loop stays pure, printing stays in
    the CLI, and the host is synchronised once per chunk instead of once per token.)
    """
    window_BW, window_lengths_B, _ = prompt_windows(cfg, prompt_BP, prompt_lengths_B)
    slide_keep = cfg.n_ctx // 2 if slide_keep is None else slide_keep
    check_sampling_args(cfg, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, eos_id=eos_id, slide_keep=slide_keep)
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    num_chunks = -(-max_new_tokens // chunk_size)
    sampling = sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    state = _start_jit(params, cfg, jnp.asarray(window_BW), jnp.asarray(window_lengths_B), _rng_or_default(rng),
                       capacity=num_chunks * chunk_size)
    produced = 0
    for _ in range(num_chunks):
        state, chunk_BC = _advance_jit(params, cfg, state, sampling, method=method, num_steps=chunk_size,
                                       slide_keep=slide_keep)
        chunk_BC = np.asarray(chunk_BC)[:, :max_new_tokens - produced]
        produced += chunk_BC.shape[1]
        yield chunk_BC
        if bool(state.done_B.all()):
            return


# ─── benchmark (importable; ``gpt2_jax.bench`` calls it) ──────────────────────────────────────

def time_generate(params, cfg: GPT2Config, *, batch_size: int, prompt_length: int, max_new_tokens: int,
                  method: str = "greedy", top_k: int = 50, top_p: float = 0.9, temperature: float = 1.0,
                  slide_keep: int | None = None, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """Wall-clock of ``generate``'s compiled function: compile seconds and new tokens per second.

    Random prompts of ``prompt_length`` tokens; the best of ``repeats`` timed runs (after the
    compile) counts, so noise from other processes inflates the time the least.
    """
    prompt_BP = jax.random.randint(jax.random.PRNGKey(seed), (batch_size, prompt_length), 0, cfg.vocab_size)
    window_BW, window_lengths_B, _ = prompt_windows(cfg, np.asarray(prompt_BP))
    slide_keep = cfg.n_ctx // 2 if slide_keep is None else slide_keep
    check_sampling_args(cfg, method=method, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, slide_keep=slide_keep)
    args = (params, jnp.asarray(window_BW), jnp.asarray(window_lengths_B), jax.random.PRNGKey(seed),
            jnp.arange(batch_size, dtype=jnp.int32),
            sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p))
    static = dict(cfg=cfg, method=method, max_new_tokens=max_new_tokens, slide_keep=slide_keep)
    t0 = time.perf_counter()
    compiled = _generate_jit.lower(*args, **static).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up (allocations)
    run_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        run_s.append(time.perf_counter() - t0)
    best = min(run_s)
    return {"compile_s": compile_s, "run_s": best, "new_tokens_per_s": batch_size * max_new_tokens / best,
            "batch_size": batch_size, "prompt_length": prompt_length, "max_new_tokens": max_new_tokens}


# ─── CLI ───────────────────────────────────────────────────────────────────────────────────────

DESCRIPTION = """Sample text from a trained run: greedy, top-k, nucleus (or all three side by side).

  python -m gpt2_jax.sample --run_dir=runs/small --method=nucleus --prompt="The man jumped" \\
      --max_new_tokens=60 --top_p=0.9 --temperature=1.0 --num_samples=3 --seed=0
"""

CLI_METHODS = ("greedy", "top_k", "nucleus", "top_k_nucleus", "all")
ALL_METHODS = ("greedy", "top_k", "nucleus")  # what --method=all compares, as the report does
STREAM_CHUNK = 8  # tokens per streamed print: one host round trip per chunk, invisible next to decoding
# Rows are decoded as many at a time as fit; what is left to lower is the length of one row (or the rows' output).
OUT_OF_MEMORY = "lower --max_new_tokens or --num_samples"


def define_flags() -> flags.FlagValues:
    """The sampler's flags on a private FlagValues (a tool extending the CLI adds its own here)."""
    from gpt2_jax.checkpoint import define_model_flags  # CLI-only import

    fv = flags.FlagValues()
    define_model_flags(fv, "sample from")
    flags.DEFINE_enum("method", "nucleus", CLI_METHODS, "Decoding method; 'all' prints greedy, top_k and "
                      "nucleus side by side; top_k_nucleus applies top-k then top-p.", flag_values=fv)
    flags.DEFINE_multi_string("prompt", None, "Prompt text (UTF-8); repeat the flag for several prompts.",
                              flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 60, "Tokens to generate after each prompt.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("top_k", 50, "top_k: sample among the k most likely tokens (at most the vocabulary).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_float("top_p", 0.9, "nucleus: sample among the smallest set of most likely tokens whose "
                       "probability reaches p (the token crossing p included); in (0, 1].", flag_values=fv)
    check(fv, "top_p", lambda p: 0 < p <= 1, "must be in (0, 1]")
    flags.DEFINE_float("temperature", 1.0, "Divides the logits before any filtering; 0 means greedy.",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("num_samples", 1, "Samples per prompt (and method).", lower_bound=1, flag_values=fv)
    # jax.random.PRNGKey keeps 32 bits: a larger seed would silently repeat a smaller one's text.
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same text.", lower_bound=0,
                         upper_bound=2**32 - 1, flag_values=fv)
    flags.DEFINE_bool("stop_at_eos", True, "Stop a sample at the end-of-text token.", flag_values=fv)
    flags.DEFINE_integer("slide_keep", None, "Beyond the context, tokens a sliding window keeps "
                         "(default n_ctx // 2; n_ctx = exact sliding window, slowest).", lower_bound=1,
                         flag_values=fv)
    return fv


def _check_prompts_are_utf8(prompts: Sequence[str]) -> None:
    """UserError unless every ``--prompt`` came in as UTF-8.

    Python decodes command-line bytes that are not UTF-8 to lone surrogates (surrogateescape);
    the tokenizer would encode those as garbage, so they are refused instead.
    """
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(p[e.start]) - 0xDC00 if 0xDC80 <= ord(p[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02x}" if byte is not None else "an unpaired surrogate"
            which = f" of prompt {i + 1}" if len(prompts) > 1 else ""
            raise UserError(f"--prompt is not valid UTF-8 ({what} at character {e.start}{which}); "
                            f"give the text in UTF-8") from None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: GPT2Config
    params: Any
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int | None  # the end-of-text token, if the tokenizer has one
    description: str  # shown in the header: where the weights came from


def _load_model(fv: flags.FlagValues) -> LoadedModel:
    """Weights, config and tokenizer named by the flags (a run at --step, or --hf_dir)."""
    from gpt2_jax import checkpoint, tokenizer  # CLI-only imports: research code needs neither

    loaded = checkpoint.load_model(fv.run_dir, fv.hf_dir, fv.step)  # checks tokenizer vs model vocab
    where = f"{fv.hf_dir} (Hugging Face)" if fv.hf_dir else f"{loaded.run_dir} step {loaded.step}"
    return LoadedModel(loaded.cfg, loaded.params, loaded.tokenizer, loaded.tokenizer.token_to_id(tokenizer.EOT),
                       where)


def _decode(tok, ids: Sequence[int]) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _trim(new_N: np.ndarray, eos_id: int | None) -> np.ndarray:
    """The continuation up to (not including) the first end-of-text."""
    if eos_id is None:
        return new_N
    stops = np.flatnonzero(new_N == eos_id)
    return new_N[:stops[0]] if stops.size else new_N


def _method_label(method: str, fv: flags.FlagValues) -> str:
    settings = {"greedy": "", "top_k": f"k={fv.top_k}", "nucleus": f"p={fv.top_p}",
                "top_k_nucleus": f"k={fv.top_k}, p={fv.top_p}"}[method]
    if method != "greedy":
        settings += f", T={fv.temperature}"
    return f"{method} ({settings})" if settings else method


def side_by_side(columns: dict[str, str], width: int) -> str:
    """Texts as wrapped columns under their titles, separated by ' │ '.

    Control characters (newlines included) become spaces: they would break the table's rows.
    """
    n = len(columns)
    col_w = max(20, (width - 3 * (n - 1)) // n)
    printable = ["".join(c if c.isprintable() else " " for c in text) for text in columns.values()]
    wrapped = [textwrap.wrap(text, col_w, break_long_words=False) or [""] for text in printable]
    lines = [" │ ".join(title.ljust(col_w) for title in columns), "─┼─".join("─" * col_w for _ in columns)]
    for row in itertools.zip_longest(*wrapped, fillvalue=""):
        lines.append(" │ ".join(cell.ljust(col_w) for cell in row).rstrip())
    return "\n".join(lines)


def _generate_rows(model: LoadedModel, prompts_ids: list[list[int]], fv, method: str, rng) -> list[np.ndarray]:
    """Each prompt × num_samples as one padded batch; returns each row's trimmed continuation."""
    rows = [ids for ids in prompts_ids for _ in range(fv.num_samples)]
    lengths_B = np.array([len(r) for r in rows])
    prompt_BP = np.zeros((len(rows), lengths_B.max()), np.int32)
    for b, r in enumerate(rows):
        prompt_BP[b, :len(r)] = r
    eos_id = model.eos_id if fv.stop_at_eos else None
    out_BS = np.asarray(generate(
        model.params, model.cfg, prompt_BP, max_new_tokens=fv.max_new_tokens, method=method, top_k=fv.top_k,
        top_p=fv.top_p, temperature=fv.temperature, rng=rng, prompt_lengths_B=lengths_B, eos_id=eos_id,
        slide_keep=fv.slide_keep))
    return [_trim(out_BS[b, lengths_B[b]:lengths_B[b] + fv.max_new_tokens], eos_id) for b in range(len(rows))]


def _stream_one(model: LoadedModel, ids: list[int], fv, method: str, rng, out) -> None:
    """Print the prompt, then the continuation chunk by chunk as it is decoded."""
    eos_id = model.eos_id if fv.stop_at_eos else None
    shown = _decode(model.tokenizer, ids)
    out.write(shown)
    out.flush()
    new: list[int] = []
    for chunk_1C in stream_generate(model.params, model.cfg, np.asarray([ids]), max_new_tokens=fv.max_new_tokens,
                                    chunk_size=STREAM_CHUNK, method=method, top_k=fv.top_k, top_p=fv.top_p,
                                    temperature=fv.temperature, rng=rng, eos_id=eos_id, slide_keep=fv.slide_keep):
        new.extend(chunk_1C[0].tolist())
        trimmed = _trim(np.asarray(new), eos_id)
        text = _decode(model.tokenizer, ids + trimmed.tolist())
        # A byte-level token may end inside a UTF-8 character: hold it back until it completes.
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
        if len(trimmed) < len(new):
            break
    out.write(_decode(model.tokenizer, ids + _trim(np.asarray(new), eos_id).tolist())[len(shown):] + "\n")
    out.flush()


def main(argv: Sequence[str], *, define: Callable[[], flags.FlagValues] = define_flags,
         load: Callable[[flags.FlagValues], LoadedModel] = _load_model, out=None) -> int:
    out = sys.stdout if out is None else out
    fv = parse_flags(define(), argv, DESCRIPTION)
    if not fv.prompt:
        raise UserError('give at least one --prompt="text" (repeat the flag for several prompts)')
    _check_prompts_are_utf8(fv.prompt)
    model = load(fv)
    if fv.stop_at_eos and model.eos_id is None:
        raise UserError("this tokenizer has no end-of-text token to stop at; pass --nostop_at_eos")
    methods = ALL_METHODS if fv.method == "all" else (fv.method,)
    for m in methods:  # before any work: fail on bad flags at once, naming the flag
        try:
            check_sampling_args(model.cfg, method=m, max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                                top_k=fv.top_k, top_p=fv.top_p, slide_keep=fv.slide_keep)
        except UserError as e:
            raise UserError(f"--{e}") from None
    prompts_ids = [model.tokenizer.encode(p).ids for p in fv.prompt]
    for p, ids in zip(fv.prompt, prompts_ids):
        if not ids:
            raise UserError(f"--prompt={p!r} is empty after tokenization; give some text to continue")
    key = jax.random.PRNGKey(fv.seed)
    rngs = {m: jax.random.fold_in(key, i) for i, m in enumerate(METHODS)}
    out.write(f"# {model.description} · {model.cfg.n_layer} layers, d_model {model.cfg.d_model}, "
              f"n_ctx {model.cfg.n_ctx}\n")

    if len(methods) == 1 and len(prompts_ids) == 1 and fv.num_samples == 1:
        out.write(f"## {_method_label(methods[0], fv)}\n")
        _stream_one(model, prompts_ids[0], fv, methods[0], rngs[methods[0]], out)
        return 0

    results = {m: _generate_rows(model, prompts_ids, fv, m, rngs[m]) for m in methods}
    width = shutil.get_terminal_size((150, 24)).columns
    for i, ids in enumerate(prompts_ids):
        for s in range(fv.num_samples):
            row = i * fv.num_samples + s
            texts = {_method_label(m, fv): _decode(model.tokenizer, ids + results[m][row].tolist()) for m in methods}
            title = f"prompt {i + 1}/{len(prompts_ids)}, sample {s + 1}/{fv.num_samples}"
            if len(methods) == 1:
                out.write(f"\n## {title} · {next(iter(texts))}\n{next(iter(texts.values()))}\n")
            else:
                out.write(f"\n## {title}\n{side_by_side(texts, width)}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    run(main, out_of_memory=OUT_OF_MEMORY)
