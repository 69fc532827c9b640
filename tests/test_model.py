import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import GPT2, chunked_token_nll, cross_entropy_loss, forward, init_cache, init_params, token_nll
from gpt2_jax.config import GPT2Config
from gpt2_jax import threefry
from gpt2_jax.model import attend


def _tokens(cfg, B, T, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, cfg.vocab_size)


def test_forward_shapes_and_dtypes(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    logits_BTV = forward(params, micro_cfg, _tokens(micro_cfg, 3, 7))
    chex.assert_shape(logits_BTV, (3, 7, micro_cfg.vocab_size))
    assert logits_BTV.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.float32
    chex.assert_shape(params["h_0"]["attn"]["c_attn"]["kernel"], (32, 96))  # fused QKV, (in, out)
    assert "bias" in params["h_0"]["attn"]["c_attn"] and "lm_head" not in params  # tied head


@pytest.mark.slow
def test_init_statistics_follow_gpt2(micro_cfg):
    cfg = micro_cfg.replace(d_model=256, n_head=4, d_ff=1024, n_layer=8)
    params = init_params(cfg, jax.random.PRNGKey(0))
    std = lambda a: float(np.std(np.asarray(a)))
    assert std(params["h_0"]["attn"]["c_attn"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert std(params["h_0"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(params["h_3"]["attn"]["c_proj"]["kernel"]) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert float(jnp.abs(params["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0.0
    np.testing.assert_array_equal(params["ln_f"]["scale"], 1.0)


def test_causality_future_tokens_never_change_past_logits(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 2, 12)
    base = forward(params, micro_cfg, tokens)
    for t in (0, 5, 11):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % micro_cfg.vocab_size)
        out = forward(params, micro_cfg, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert float(jnp.abs(out[:, t] - base[:, t]).max()) > 1e-4  # the changed position itself moves


@pytest.mark.slow
def test_deterministic_vs_dropout(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 2, 10)
    a = forward(params, micro_cfg, tokens)
    np.testing.assert_array_equal(a, forward(params, micro_cfg, tokens))
    d1 = forward(params, micro_cfg, tokens, deterministic=False, rng=jax.random.PRNGKey(1))
    d1b = forward(params, micro_cfg, tokens, deterministic=False, rng=jax.random.PRNGKey(1))
    d2 = forward(params, micro_cfg, tokens, deterministic=False, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(d1, d1b)
    assert float(jnp.abs(d1 - a).max()) > 1e-3 and float(jnp.abs(d1 - d2).max()) > 1e-3
    no_dropout = micro_cfg.replace(dropout=0.0, attn_dropout=0.0)
    np.testing.assert_allclose(forward(params, no_dropout, tokens, deterministic=False,
                                       rng=jax.random.PRNGKey(1)), a, atol=1e-6)


def test_threefry_matches_the_published_test_vectors_and_draws_jax_randoms_bits_bit_for_bit():
    # Threefry-2x32 (20 rounds) known-answer vectors, as in Random123 and JAX's own random tests.
    for key, count, expected in [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
                                 ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 2, (0x1CB996FC, 0xBB002BE7)),
                                 ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]:
        y = threefry.threefry2x32(jnp.array(key, jnp.uint32), *(jnp.array([c], jnp.uint32) for c in count))
        assert [int(w[0]) for w in y] == list(expected)
    # The dropout masks are jax.random's, raw and typed keys, odd shapes, under jit and vmap.
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(3), r))(jnp.arange(4))
    for shape in [(1,), (7,), (3, 5, 129), (2, 16, 16)]:
        np.testing.assert_array_equal(jax.jit(jax.vmap(lambda k: threefry.random_bits(k, shape)))(keys),
                                      jax.vmap(lambda k: jax.random.bits(k, shape))(keys))
        for p in (0.9, 0.5, 0.0):
            np.testing.assert_array_equal(jax.vmap(lambda k: threefry.bernoulli(k, p, shape))(keys),
                                          jax.vmap(lambda k: jax.random.bernoulli(k, p, shape))(keys))
    typed = jax.random.key(11)
    np.testing.assert_array_equal(threefry.random_bits(typed, (100,)), jax.random.bits(typed, (100,)))
    keep = threefry.bernoulli(keys[0], 0.9, (200_000,))
    assert abs(float(keep.mean()) - 0.9) < 0.003  # 4.5 standard deviations


@pytest.mark.slow
def test_a_rows_dropout_masks_follow_its_own_key_alone(micro_cfg):
    # What lets the train step stay batched (no vmap over rows) and still give each global row the
    # same masks however the batch is split: row b of a batch equals that row run alone with its key.
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 3, 10)
    keys_B = jax.random.split(jax.random.PRNGKey(4), 3)
    batch = forward(params, micro_cfg, tokens, deterministic=False, dropout_keys_B=keys_B)
    for b in range(3):
        alone = forward(params, micro_cfg, tokens[b:b + 1], deterministic=False, dropout_keys_B=keys_B[b:b + 1])
        np.testing.assert_allclose(alone[0], batch[b], atol=1e-5)
    other = forward(params, micro_cfg, tokens[1:2], deterministic=False, dropout_keys_B=keys_B[2:3])
    assert float(jnp.abs(other[0] - batch[1]).max()) > 1e-3  # another key, other masks
    # rng= is the same as keys fold_in(rng, row).
    rows = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(4), r))(jnp.arange(3))
    np.testing.assert_array_equal(forward(params, micro_cfg, tokens, deterministic=False, rng=jax.random.PRNGKey(4)),
                                  forward(params, micro_cfg, tokens, deterministic=False, dropout_keys_B=rows))
    with pytest.raises(ValueError, match="needs rng= or dropout_keys_B="):
        forward(params, micro_cfg, tokens, deterministic=False)


@pytest.mark.slow
def test_attention_dropout_path_matches_fused_without_dropout():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 3, 6, 8)) for i in range(3))  # heads-major BHTK
    fused = attend(q, k, v, None)
    explicit = attend(q, k, v, None, dropout_rate=1e-9, dropout_keys_B=jax.random.split(jax.random.PRNGKey(0), 2))
    np.testing.assert_allclose(explicit, fused, atol=1e-5)
    # Manual reference: softmax(QKᵀ/√K + causal) V.
    s = jnp.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(8)
    s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -jnp.inf)
    ref = jnp.einsum("bhts,bhsk->bhtk", jax.nn.softmax(s, -1), v)
    np.testing.assert_allclose(fused, ref, atol=1e-5)


class TestJitAgrees(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_jit_and_eager_agree(self):
        from gpt2_jax import GPT2Config
        cfg = GPT2Config(vocab_size=97, n_ctx=16, n_layer=2, d_model=32, n_head=4, d_ff=64)
        params = init_params(cfg, jax.random.PRNGKey(0))
        tokens = _tokens(cfg, 2, 9)
        ref = GPT2(cfg).apply({"params": params}, tokens)
        out = self.variant(lambda p, t: GPT2(cfg).apply({"params": p}, t))(params, tokens)
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vmap_and_grad_through_model(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 4, 8)
    per_row = jax.vmap(lambda t: forward(params, micro_cfg, t[None])[0])(tokens)
    np.testing.assert_allclose(per_row, forward(params, micro_cfg, tokens), atol=1e-5)
    loss = lambda p: cross_entropy_loss(forward(p, micro_cfg, tokens[:, :-1]), tokens[:, 1:])
    grads = jax.grad(loss)(params)
    chex.assert_trees_all_equal_shapes(grads, params)
    assert float(jnp.abs(grads["wte"]["embedding"]).max()) > 0


def test_uniform_model_loss_is_log_vocab():
    V = 1000
    logits = jnp.zeros((3, 5, V))
    targets = jax.random.randint(jax.random.PRNGKey(0), (3, 5), 0, V)
    assert float(cross_entropy_loss(logits, targets)) == pytest.approx(math.log(V), rel=1e-6)


def test_masked_loss_ignores_masked_positions():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 11))
    targets = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]])
    expected = (token_nll(logits, targets) * mask).sum() / 3
    assert float(cross_entropy_loss(logits, targets, mask)) == pytest.approx(float(expected), rel=1e-6)
    garbage = logits.at[0, 3].set(1e4)  # a masked position cannot move the loss
    assert float(cross_entropy_loss(garbage, targets, mask)) == pytest.approx(float(expected), rel=1e-6)
    manual = -jax.nn.log_softmax(logits[0, 0])[1]
    assert float(token_nll(logits, targets)[0, 0]) == pytest.approx(float(manual), rel=1e-5)


def test_cached_prefill_and_decode_match_full_forward(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 2, 12)
    full = forward(params, micro_cfg, tokens)
    model = GPT2(micro_cfg)
    logits, cache = model.apply({"params": params}, tokens[:, :7], cache=init_cache(micro_cfg, 2))
    np.testing.assert_allclose(logits, full[:, :7], atol=1e-5)
    for t in range(7, 12):
        pos = jnp.full((2, 1), t, jnp.int32)
        step, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache=cache, positions_BT=pos)
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


@pytest.mark.slow
def test_rows_at_different_positions_share_one_cache(micro_cfg):
    """Row 0 has a 3-token prompt, row 1 a 6-token prompt: per-row positions keep them independent."""
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    a, b = _tokens(micro_cfg, 1, 4, seed=3)[0], _tokens(micro_cfg, 1, 7, seed=4)[0]
    model = GPT2(micro_cfg)
    prompt = jnp.stack([jnp.concatenate([a[:3], jnp.zeros(3, a.dtype)]), b[:6]])  # right-padded
    _, cache = model.apply({"params": params}, prompt, cache=init_cache(micro_cfg, 2))
    nxt = jnp.stack([a[3:4], b[6:7]])
    step, _ = model.apply({"params": params}, nxt, cache=cache, positions_BT=jnp.array([[3], [6]]))
    np.testing.assert_allclose(step[0, 0], forward(params, micro_cfg, a[None])[0, 3], atol=1e-5)
    np.testing.assert_allclose(step[1, 0], forward(params, micro_cfg, b[None])[0, 6], atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 2, 10)
    ref = forward(params, micro_cfg, tokens)
    bf = forward(params, micro_cfg.replace(dtype="bfloat16"), tokens)
    assert bf.dtype == jnp.float32
    err = float(jnp.abs(bf - ref).max())
    assert 0 < err < 0.1  # bf16 really is used (not bitwise equal), yet close


@pytest.mark.slow
def test_remat_gives_same_loss_and_grads(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    tokens = _tokens(micro_cfg, 2, 9)
    def loss(p, cfg):
        return cross_entropy_loss(forward(p, cfg, tokens[:, :-1], deterministic=False,
                                          rng=jax.random.PRNGKey(5)), tokens[:, 1:])
    l1, g1 = jax.value_and_grad(loss)(params, micro_cfg)
    l2, g2 = jax.value_and_grad(loss)(params, micro_cfg.replace(remat=True))
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    chex.assert_trees_all_close(g1, g2, atol=1e-6)


@pytest.mark.parametrize("vocab_chunk", [32, 2048])  # several chunks; one
@pytest.mark.parametrize("N, D, V", [(16, 16, 40), (64, 32, 97), (512, 64, 512)])
def test_the_bf16_head_gradient_runs_at_small_shapes_and_equals_float32s(N, D, V, vocab_chunk):
    # XLA folded a transpose into the head's weight-gradient product at these shapes; YNNPACK then
    # refused the product and XLA:CPU's own dot cannot run bf16 x bf16 -> float32 ("UNIMPLEMENTED").
    from gpt2_jax.dots import vocab_chunked_nll

    x_ND = jax.random.normal(jax.random.PRNGKey(0), (N, D)).astype(jnp.bfloat16)
    w_VD = jax.random.normal(jax.random.PRNGKey(1), (V, D)) * 0.3
    t_N = jax.random.randint(jax.random.PRNGKey(2), (N,), 0, V)
    grad = jax.jit(jax.grad(lambda x, w: vocab_chunked_nll(x, w, t_N, vocab_chunk=vocab_chunk).sum(), argnums=(0, 1)))
    dx, dw = grad(x_ND, w_VD)
    # float32 on the values the bf16 products multiply
    dx32, dw32 = grad(x_ND.astype(jnp.float32), w_VD.astype(jnp.bfloat16).astype(jnp.float32))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    for g, g32 in ((dx, dx32), (dw, dw32)):
        np.testing.assert_allclose(np.asarray(g, np.float32), g32, atol=0.02 * float(jnp.abs(g32).max()))


@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("bfloat16", 0.03)])
@pytest.mark.parametrize("vocab_chunk", [5, 16, 1000])  # micro vocab: padded chunks, one chunk
def test_chunked_head_loss_and_gradients_equal_the_full_logits(micro_cfg, dtype, rtol, vocab_chunk):
    cfg = micro_cfg.replace(dtype=dtype)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens_BT, targets_BT = _tokens(cfg, 3, 7), _tokens(cfg, 3, 7, seed=2)
    weights_BT = jax.random.uniform(jax.random.PRNGKey(3), (3, 7))  # every token's nll counts differently

    def plain(p):
        return (token_nll(forward(p, cfg, tokens_BT), targets_BT) * weights_BT).sum()

    def chunked(p):
        x_BTD = forward(p, cfg, tokens_BT, head=False)
        return (chunked_token_nll(x_BTD, p["wte"]["embedding"], targets_BT, vocab_chunk=vocab_chunk) * weights_BT).sum()

    (a, ga), (b, gb) = jax.value_and_grad(plain)(params), jax.value_and_grad(chunked)(params)
    np.testing.assert_allclose(b, a, rtol=rtol)
    # bf16: the plain head rounds its logits to bf16, the chunked one accumulates in float32.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ga))
    chex.assert_trees_all_close(gb, ga, atol=rtol * scale, rtol=0)
    assert float(jnp.abs(gb["wte"]["embedding"]).max()) > 0.1 * scale  # the head's gradient reaches wte


@pytest.mark.slow
def test_chunked_head_never_holds_the_full_logits_of_the_batch():
    # Tiny's head at a batch of 16 x 128: 262 MB of float32 logits (and as much for their gradient)
    # in the plain loss; XLA's own account of the compiled step's scratch memory says what is held.
    cfg = GPT2Config.preset("tiny")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens_BT = jax.ShapeDtypeStruct((16, 128), jnp.int32)

    def scratch_bytes(loss):
        grad = jax.jit(jax.grad(lambda p, t: loss(p, t).mean()))
        return grad.lower(params, tokens_BT).compile().memory_analysis().temp_size_in_bytes

    full = scratch_bytes(lambda p, t: token_nll(forward(p, cfg, t), t))
    chunked = scratch_bytes(lambda p, t: chunked_token_nll(forward(p, cfg, t, head=False), p["wte"]["embedding"], t))
    logits_bytes = 16 * 128 * cfg.vocab_size * 4
    # Measured on the 2-core Intel Xeon (vocabulary-chunked loss): 785 MB against 365 MB (the rest is the
    # blocks' activations and the head's float32 weight gradient).
    assert full - chunked > 1.5 * logits_bytes and chunked < full / 2, (full, chunked, logits_bytes)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 0.02)])
def test_mixed_matmul_value_and_gradients_are_the_plain_products(dtype, rtol):
    from gpt2_jax.dots import mixed_matmul

    x_NI = jax.random.normal(jax.random.PRNGKey(0), (12, 24), dtype)
    w_IO = jax.random.normal(jax.random.PRNGKey(1), (24, 40))  # a float32 master weight
    g_NO = jax.random.normal(jax.random.PRNGKey(2), (12, 40))
    y, vjp = jax.vjp(mixed_matmul, x_NI, w_IO)
    dx, dw = vjp(g_NO)
    x32, w32 = x_NI.astype(jnp.float32), w_IO.astype(dtype).astype(jnp.float32)  # the values it multiplies
    assert y.dtype == jnp.float32 and dx.dtype == dtype and dw.dtype == jnp.float32
    np.testing.assert_allclose(y, x32 @ w32, rtol=1e-5, atol=1e-5)
    scale = lambda a: float(jnp.abs(a).max())
    np.testing.assert_allclose(dx.astype(jnp.float32), g_NO @ w32.T, atol=rtol * scale(g_NO @ w32.T))
    np.testing.assert_allclose(dw, x32.T @ g_NO, atol=rtol * scale(x32.T @ g_NO))


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 0.02)])
def test_mixed_matmul_nt_value_and_gradients_are_the_plain_products(dtype, rtol):
    from gpt2_jax.dots import mixed_matmul_nt

    q_GTK = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 8), dtype)  # (batch, heads, T, K)
    k_GSK = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 7, 8), dtype)
    g_GTS = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5, 7))
    y, vjp = jax.vjp(mixed_matmul_nt, q_GTK, k_GSK)
    dq, dk = vjp(g_GTS)
    q32, k32 = q_GTK.astype(jnp.float32), k_GSK.astype(jnp.float32)
    assert y.shape == (2, 3, 5, 7) and y.dtype == jnp.float32 and dq.dtype == dk.dtype == dtype
    np.testing.assert_allclose(y, jnp.einsum("gtk,gsk->gts", q32.reshape(6, 5, 8), k32.reshape(6, 7, 8)).reshape(y.shape),
                               rtol=1e-5, atol=1e-5)
    scale = lambda a: float(jnp.abs(a).max())
    want_dq, want_dk = g_GTS @ k32, jnp.swapaxes(g_GTS, 2, 3) @ q32
    np.testing.assert_allclose(dq.astype(jnp.float32), want_dq, atol=rtol * scale(want_dq))
    np.testing.assert_allclose(dk.astype(jnp.float32), want_dk, atol=rtol * scale(want_dk))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 70])  # both orders of the product (dots.matmul_t)
def test_matmul_t_is_x_times_the_transposed_weight(dtype, rows):
    from gpt2_jax.dots import matmul_t

    x_NI = jax.random.normal(jax.random.PRNGKey(0), (rows, 24), dtype)
    w_OI = jax.random.normal(jax.random.PRNGKey(1), (40, 24))
    y_NO = matmul_t(x_NI, w_OI)
    x32, w32 = x_NI.astype(jnp.float32), w_OI.astype(dtype).astype(jnp.float32)  # the values it multiplies
    assert y_NO.shape == (rows, 40) and y_NO.dtype == jnp.float32
    np.testing.assert_allclose(y_NO, x32 @ w32.T, rtol=1e-5, atol=1e-5)
    if dtype == jnp.bfloat16:  # one bf16 row is computed as two: bit for bit a row of a 2-row batch
        pair_NO = matmul_t(jnp.concatenate([x_NI[:1], -x_NI[:1]]), w_OI)
        np.testing.assert_array_equal(matmul_t(x_NI[:1], w_OI), pair_NO[:1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_write_cache_puts_each_rows_keys_and_values_at_its_own_positions(dtype, T):
    from gpt2_jax.model import LayerCache, write_cache

    B, H, S, K = 3, 2, 8, 4
    old = LayerCache(*(jax.random.normal(jax.random.PRNGKey(i), (B * H, S, K), dtype) for i in (0, 1)))
    k_BHTK, v_BHTK = (jax.random.normal(jax.random.PRNGKey(i), (B, H, T, K), dtype) for i in (2, 3))
    positions_BT = jnp.asarray([[5, 6, 7], [0, 1, 2], [2, 3, 4]], jnp.int32)[:, :T]  # T=1 per-row DUS, T=3 scatter
    new = write_cache(old, k_BHTK, v_BHTK, positions_BT)
    # Row b's head h lives at g = b·H + h.
    expected_k, expected_v = (np.asarray(c).reshape(B, H, S, K).copy() for c in old)
    for b in range(B):
        for t in range(T):
            expected_k[b, :, positions_BT[b, t]] = k_BHTK[b, :, t]
            expected_v[b, :, positions_BT[b, t]] = v_BHTK[b, :, t]
    assert new.k_GSK.dtype == dtype and new.k_GSK.shape == (B * H, S, K)
    np.testing.assert_array_equal(np.asarray(new.k_GSK), expected_k.reshape(B * H, S, K))
    np.testing.assert_array_equal(np.asarray(new.v_GSK), expected_v.reshape(B * H, S, K))


def test_every_product_of_the_bf16_train_step_takes_narrow_inputs_and_accumulates_in_float32(micro_cfg):
    # What makes bf16 training fast on XLA:CPU (dots.py): no dot mixes a float32 operand with a bf16 one
    # (XLA would widen both) and none rounds its output to bf16, forward or backward, head included.
    from gpt2_jax import core

    cfg = micro_cfg.replace(dtype="bfloat16")
    train_cfg = core.TrainConfig(batch_size=2, warmup_steps=1)
    opt = core.make_optimizer(train_cfg, 10)
    step = core.make_train_step(cfg, opt, core.make_schedule(train_cfg, 10), axis_name=None)
    state = core.init_train_state(cfg, opt, jax.random.PRNGKey(0))
    tokens = _tokens(cfg, 2, cfg.n_ctx)
    batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones(tokens.shape)}
    jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.PRNGKey(1))

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for p in eqn.params.values():
                for j in p if isinstance(p, (tuple, list)) else (p,):
                    if isinstance(j, jax.extend.core.ClosedJaxpr):
                        yield from dots(j.jaxpr)
                    elif isinstance(j, jax.extend.core.Jaxpr):
                        yield from dots(j)

    found = [(tuple(str(v.aval.dtype) for v in e.invars), str(e.outvars[0].aval.dtype)) for e in dots(jaxpr.jaxpr)]
    # forward + backward of 4 Dense layers a block, 2 attention products a block, the head's 4 per chunk
    assert len(found) >= 2 * (3 * 4 + 3 * 2) + 4, found
    bad = [f for f in found if f != (("bfloat16", "bfloat16"), "float32")]
    assert not bad, bad
