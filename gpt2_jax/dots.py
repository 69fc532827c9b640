"""The model's two big products with float32 accumulation, forward and backward in the fast forms.

    mixed_matmul(a_GMK, b_GKN)          every Dense layer and attention's probabilities x values:  a @ b
    mixed_matmul_nt(a_GMK, b_GNK)       attention's scores:  q @ kᵀ
    vocab_chunked_nll(x_ND, w_VD, t_N)  the tied 32k head and its loss:  -log softmax(x @ wᵀ)[t]
    matmul_t(x_NI, w_OI)                inference, weights stored (out, in):  x @ wᵀ
    int8_matmul_t(x_NI, w8_OI)          the same with int8 weights, x's rows quantized to int8 on the fly

The products take inputs in the compute dtype (bf16 or float32) and accumulate in float32; the gradients are
written out by hand (``jax.custom_vjp``) so that every backward product is also "narrow inputs, float32
accumulator", which XLA's own transpose of a dot is not: it multiplies a float32 cotangent by a bf16
operand, which widens both to float32. On XLA:CPU that, and dots with a bf16 *output*, leave the
AMX/AVX512-BF16 kernels unused (measured on a 2-core Intel Xeon with AMX, small's ``c_fc`` shape,
1024 x 768 x 3072: 4 ms a dot in the forms used here against 21-22 ms for a bf16-output dot or one
contracting the leading axis of a 2-D operand; forward plus backward of the layer 10 ms against 49 ms).
The weight gradients contract over an explicit leading unit axis as well as the tokens: the same
product, but the form YNNPACK, XLA:CPU's dot library, accepts (without it the dot falls back to a
float32 loop five times slower). On GPUs both forms are plain cuBLAS calls.

The head's loss walks the vocabulary in balanced chunks of at most ``vocab_chunk`` rows (online
log-sum-exp forward, the softmax recomputed per chunk backward), so neither pass ever holds the N x V
logits and each chunk's weight gradient is written once, contracting over all N tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _contract_rows(a_GMK: jax.Array, b_GMN: jax.Array) -> jax.Array:
    """``a_GMKᵀ @ b_GMN`` in float32 over the leading batch axes ``G``, contracting the rows M.

    A unit axis in front of M makes it two contracted axes: the same product, but the form YNNPACK,
    XLA:CPU's dot library, takes (see the module doc; 3-5x faster at the weight gradients' and
    attention's shapes).
    """
    n = a_GMK.ndim
    batch = tuple(range(n - 2))
    return lax.dot_general(jnp.expand_dims(a_GMK, n - 2), jnp.expand_dims(b_GMN, n - 2),
                           (((n - 2, n - 1), (n - 2, n - 1)), (batch, batch)), preferred_element_type=F32)


def _product(a, b, contract_a: int, contract_b: int) -> jax.Array:
    """Float32 product of ``a`` and ``b`` over their leading batch axes, contracting one axis of each."""
    batch = tuple(range(a.ndim - 2))
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), (batch, batch)), preferred_element_type=F32)


@jax.custom_vjp
def mixed_matmul(a_GMK: jax.Array, b_GKN: jax.Array) -> jax.Array:
    """``a_GMK @ b_GKN`` in float32 over any leading batch axes ``G`` (none for a Dense layer), ``b``
    used in ``a``'s dtype; each gradient comes back in its input's dtype (a float32 master weight gets
    its float32 gradient, never a rounded bf16 one)."""
    return _product(a_GMK, b_GKN.astype(a_GMK.dtype), a_GMK.ndim - 1, b_GKN.ndim - 2)


def _mixed_matmul_fwd(a_GMK, b_GKN):
    return mixed_matmul(a_GMK, b_GKN), (a_GMK, b_GKN)


def _mixed_matmul_bwd(res, g_GMN):
    a_GMK, b_GKN = res
    g_GMN = g_GMN.astype(a_GMK.dtype)
    n = a_GMK.ndim
    da_GMK = _product(g_GMN, b_GKN.astype(a_GMK.dtype), n - 1, n - 1)
    db_GKN = _contract_rows(a_GMK, g_GMN)
    return da_GMK.astype(a_GMK.dtype), db_GKN.astype(b_GKN.dtype)


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


@jax.custom_vjp
def mixed_matmul_nt(a_GMK: jax.Array, b_GNK: jax.Array) -> jax.Array:
    """``a_GMK @ b_GNKᵀ`` in float32 (attention's scores ``q @ kᵀ``), both in ``a``'s dtype: the
    contraction over both last axes, so neither operand is transposed in memory. ``mixed_matmul(q,
    swapaxes(k))`` made XLA:CPU copy the transposed keys, at every decoding step the whole cache:
    0.8 ms a token for small with a float32 cache."""
    return _product(a_GMK, b_GNK.astype(a_GMK.dtype), a_GMK.ndim - 1, b_GNK.ndim - 1)


def _mixed_matmul_nt_fwd(a_GMK, b_GNK):
    return mixed_matmul_nt(a_GMK, b_GNK), (a_GMK, b_GNK)


def _mixed_matmul_nt_bwd(res, g_GMN):
    a_GMK, b_GNK = res
    g_GMN = g_GMN.astype(a_GMK.dtype)
    da_GMK = _product(g_GMN, b_GNK.astype(a_GMK.dtype), g_GMN.ndim - 1, b_GNK.ndim - 2)
    db_GNK = _contract_rows(g_GMN, a_GMK)
    return da_GMK.astype(a_GMK.dtype), db_GNK.astype(b_GNK.dtype)


mixed_matmul_nt.defvjp(_mixed_matmul_nt_fwd, _mixed_matmul_nt_bwd)


def _chunk_size(V: int, vocab_chunk: int) -> int:
    """The fewest chunks of at most ``vocab_chunk`` words, balanced (32000 words in 16 chunks of 2000, not
    15 of 2048 and a padded one), rounded up to 16 words where that stays within ``vocab_chunk``."""
    balanced = -(-V // -(-V // vocab_chunk))
    return min(vocab_chunk, -(-balanced // 16) * 16)


def _vocab_chunks(w_VD: jax.Array, scale_V: jax.Array | None, v: int):
    """``w_CvD`` (zero rows pad the last chunk), ``scale_Cv`` (or None) and each chunk's token ids ``ids_Cv``."""
    V, D = w_VD.shape
    C = -(-V // v)
    pad = C * v - V
    w_CvD = jnp.pad(w_VD, ((0, pad), (0, 0))).reshape(C, v, D)
    scale_Cv = None if scale_V is None else jnp.pad(scale_V, (0, pad)).reshape(C, v)
    return w_CvD, scale_Cv, jnp.arange(C * v).reshape(C, v)


def _chunk_logits(x_ND, w_vD, scale_v, ids_v, V):
    logits_Nv = _product(x_ND, w_vD, 1, 1)
    if scale_v is not None:
        logits_Nv = logits_Nv * scale_v
    if V % ids_v.size:  # the last chunk is padded: its padding rows are no tokens
        logits_Nv = jnp.where(ids_v < V, logits_Nv, -jnp.inf)
    return logits_Nv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll(x_ND, w_VD, scale_V, t_N, v):
    return _nll_fwd(x_ND, w_VD, scale_V, t_N, v)[0]


def _nll_fwd(x_ND, w_VD, scale_V, t_N, v):
    V, N = w_VD.shape[0], x_ND.shape[0]
    w_CvD, scale_Cv, ids_Cv = _vocab_chunks(w_VD.astype(x_ND.dtype), scale_V, v)

    def online_logsumexp(carry, chunk):
        max_N, sum_N = carry
        logits_Nv = _chunk_logits(x_ND, *chunk, V)
        new_max_N = jnp.maximum(max_N, logits_Nv.max(axis=-1))
        sum_N = sum_N * jnp.exp(max_N - new_max_N) + jnp.exp(logits_Nv - new_max_N[:, None]).sum(axis=-1)
        return (new_max_N, sum_N), None

    init = (jnp.full((N,), -jnp.inf, F32), jnp.zeros((N,), F32))
    (max_N, sum_N), _ = lax.scan(online_logsumexp, init, (w_CvD, scale_Cv, ids_Cv))
    lse_N = max_N + jnp.log(sum_N)
    w_ND = w_VD[t_N].astype(x_ND.dtype).astype(F32)  # the target rows as the chunks see them
    target_logit_N = (x_ND.astype(F32) * w_ND).sum(axis=-1)
    if scale_V is not None:
        target_logit_N = target_logit_N * scale_V[t_N]
    return lse_N - target_logit_N, (x_ND, w_VD, scale_V, t_N, lse_N)


def _nll_bwd(v, res, g_N):
    x_ND, w_VD, scale_V, t_N, lse_N = res
    (V, D), N = w_VD.shape, x_ND.shape[0]
    w_CvD, scale_Cv, ids_Cv = _vocab_chunks(w_VD.astype(x_ND.dtype), scale_V, v)
    # Each chunk's weight gradient as xᵀ @ dlogits, x transposed once here: contracting the tokens of
    # dlogits_Nv itself made XLA:CPU transpose it in memory, N x v at every chunk (49 of tiny's 720 ms a step).
    # The barrier keeps XLA from folding the transpose into the product (which YNNPACK then rejects at
    # small shapes, leaving a bf16 product XLA:CPU's own dot cannot run).
    x_DN = lax.optimization_barrier(jnp.transpose(x_ND))

    def chunk_grads(dx_ND, chunk):
        w_vD, scale_v, ids_v = chunk
        probs_Nv = jnp.exp(_chunk_logits(x_ND, w_vD, scale_v, ids_v, V) - lse_N[:, None])
        # d nll / d logits = softmax - onehot(target), times the cotangent; then through the scale.
        dlogits_Nv = (probs_Nv - (ids_v[None, :] == t_N[:, None])) * g_N[:, None]
        if scale_v is not None:
            dlogits_Nv = dlogits_Nv * scale_v
        dlogits_Nv = dlogits_Nv.astype(x_ND.dtype)
        dx_ND = dx_ND + _product(dlogits_Nv, w_vD, 1, 0)
        return dx_ND, _product(x_DN, dlogits_Nv, 1, 0)

    dx_ND, dw_CDv = lax.scan(chunk_grads, jnp.zeros((N, D), F32), (w_CvD, scale_Cv, ids_Cv))
    dw_VD = jnp.swapaxes(dw_CDv, 1, 2).reshape(-1, D)[:V]
    dscale_V = None if scale_V is None else jnp.zeros_like(scale_V)
    return dx_ND.astype(x_ND.dtype), dw_VD.astype(w_VD.dtype), dscale_V, None


_nll.defvjp(_nll_fwd, _nll_bwd)


def vocab_chunked_nll(x_ND: jax.Array, w_VD: jax.Array, t_N: jax.Array, *, vocab_chunk: int = 2048,
                      scale_V: jax.Array | None = None) -> jax.Array:
    """Per-token ``nll_N`` (float32) of the logits ``(x_ND @ w_VDᵀ) * scale_V``, at most ``vocab_chunk`` words at a time.

    ``w_VD`` is used in ``x_ND``'s dtype (its gradient comes back in its own); ``scale_V`` (the per-token
    scales of an int8 ``w_VD``, ``model.quantize_int8``) gets no gradient. The largest temporary is
    N x ``vocab_chunk`` float32.
    """
    V = w_VD.shape[0]
    scale_V = None if scale_V is None else scale_V.astype(F32)
    return _nll(x_ND, w_VD, scale_V, t_N, _chunk_size(V, min(vocab_chunk, V)))


def _weight_first(w_OI: jax.Array, x_MI: jax.Array, accumulator) -> jax.Array:
    """``x_MI @ w_OIᵀ`` computed as ``(w_OI @ x_MIᵀ)ᵀ``: the weight as the product's left operand.

    The barrier keeps XLA from folding the transpose back into the dot, which would turn it into
    ``x @ wᵀ`` again (its algebraic simplifier does, and the compiled program is then the same).
    """
    y_OM = lax.dot_general(w_OI, x_MI, (((1,), (1,)), ((), ())), preferred_element_type=accumulator)
    return lax.optimization_barrier(y_OM).T


WEIGHT_FIRST_ROWS = 64  # up to this many rows, decoding's products put the weight on the left
INT8_WEIGHT_FIRST_ROWS = 16


def matmul_t(x_NI: jax.Array, w_OI: jax.Array) -> jax.Array:
    """``x_NI @ w_OIᵀ`` in float32 for inference, the weight (stored ``(out, in)``) used in ``x``'s dtype.

    Decoding's products read every weight for a few rows. Up to ``WEIGHT_FIRST_ROWS`` rows they run
    with the weight as the left operand (``(w @ xᵀ)ᵀ``), which XLA:CPU reads faster than ``x @ wᵀ``
    (``experiments/matvec_cpu.py``, weights read from memory, 2-core Xeon with AMX, small's shapes:
    bf16 ``c_fc`` 1-64 rows 203-310 us against 299-428, the 32k head 2.1-3.2 ms against 3.0-5.0;
    float32 ``c_proj`` at 8 rows 428 against 942 us). One bf16 row is computed as two (the copy
    dropped): XLA:CPU has no bf16 matrix-vector kernel, and a lone row runs at a tenth of the speed.
    More rows (prefill) keep ``x @ wᵀ``.
    """
    N = x_NI.shape[0]
    w_OI = w_OI.astype(x_NI.dtype)
    if N > WEIGHT_FIRST_ROWS:
        return _product(x_NI, w_OI, 1, 1)
    x_MI = jnp.concatenate([x_NI, x_NI]) if N == 1 and x_NI.dtype != F32 else x_NI
    return _weight_first(w_OI, x_MI, F32)[:N]


def int8_matmul_t(x_NI: jax.Array, w8_OI: jax.Array) -> jax.Array:
    """``x_NI @ w8_OIᵀ`` in float32 with each row of ``x`` quantized to int8 on the fly (dynamic
    quantization: ``x ≈ q · s``, ``s = max|row| / 127``), multiplied int8 x int8 with int32 accumulation
    and rescaled by ``s``; the weight's own scales are the caller's. XLA:CPU runs this product on its
    int8 kernels, fastest up to ``INT8_WEIGHT_FIRST_ROWS`` rows with the weight as the left operand
    (``experiments/matvec_cpu.py``, small's ``c_fc`` at 2 rows: 139 us against 208 for ``x @ wᵀ`` and
    203 in bf16; the 32k head 1.2 against 2.0 ms); from 32 rows ``x @ wᵀ`` is as fast or faster. One
    row is computed as two, as in ``matmul_t``.
    """
    N = x_NI.shape[0]
    q_MI, scale_M1 = quantize_rows(jnp.concatenate([x_NI, x_NI]) if N == 1 else x_NI)
    if N <= INT8_WEIGHT_FIRST_ROWS:
        acc_MO = _weight_first(w8_OI, q_MI, jnp.int32)
    else:
        acc_MO = lax.dot_general(q_MI, w8_OI, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc_MO.astype(F32) * scale_M1)[:N]


def quantize_rows(x_NI: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(q_NI, scale_N1)``: int8 ``q = round(x / scale)``, ``scale = max|row| / 127`` in float32 (1 for a zero row)."""
    x_NI = x_NI.astype(F32)
    scale_N1 = jnp.max(jnp.abs(x_NI), axis=-1, keepdims=True) / 127.0
    scale_N1 = jnp.where(scale_N1 > 0, scale_N1, 1.0)
    return jnp.round(x_NI / scale_N1).astype(jnp.int8), scale_N1
