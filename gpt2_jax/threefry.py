"""Dropout's random draws: ``jax.random.bernoulli``'s exact masks, computed as one fused loop.

JAX's default keys hash counters with Threefry-2x32 (20 rounds; Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011). On CPU, ``jax.random`` lowers the hash as a rolled loop of
five steps that XLA cannot fuse, so every step writes both 32-bit words of every element to memory:
small's dropout masks cost ~180 ms of a 2.3 s training step on the 2-core CPU. Written out as plain
uint32 arithmetic, the same hash is one elementwise loop: a batch of small's attention masks takes
0.75 instead of 6.55 ms (``experiments/train_parts_cpu.py``).
``bernoulli`` returns the very masks ``jax.random.bernoulli`` draws from the same key (a test checks it),
so runs, checkpoints and resumed runs are unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants, alternating
_PARITY = np.uint32(0x1BD11BDA)  # the key schedule's third word is k0 ^ k1 ^ this


def threefry2x32(key_2: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 of the uint32 word pairs ``(x0, x1)`` under ``key_2`` (two uint32 words)."""
    k = (key_2[0], key_2[1], key_2[0] ^ key_2[1] ^ _PARITY)
    x0, x1 = x0 + k[0], x1 + k[1]
    for i in range(5):  # five groups of four rounds, a key injection after each group
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0 = x0 + k[(i + 1) % 3]
        x1 = x1 + k[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bits(key, shape)`` (uint32) for a threefry key, raw (``uint32[2]``) or typed.

    Element i hashes the 64-bit counter i (high word, low word), and its bits are the two output
    words xor-ed: ``jax.random``'s scheme under ``jax_threefry_partitionable`` (the default).
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    assert key.shape == (2,) and key.dtype == jnp.uint32, (key.shape, key.dtype)
    assert math.prod(shape) < 2**32, shape  # the counters' high word stays 0
    low = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    y0, y1 = threefry2x32(key, jnp.zeros_like(low), low)
    return y0 ^ y1


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """``jax.random.bernoulli(key, p, shape)``: True with probability ``p``, the same draws bit for bit.

    As ``jax.random.uniform`` does, the top 23 bits become a float32 in [0, 1), compared with ``p``.
    """
    mantissa = random_bits(key, shape) >> np.uint32(9)
    u = jax.lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - 1.0
    return u < p
