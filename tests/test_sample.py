"""Specification of decoding: cache == full forward, greedy == argmax, sliding window, samplers, compilation.

Float32 throughout; cached and full-forward logits agree within 1e-5 absolute (measured ~1e-6).
"""

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import decode, memory
from gpt2_jax.errors import UserError
from gpt2_jax.model import forward, init_cache, init_params
from gpt2_jax.decode import (
    _generate_jit,
    bucket_length,
    decode_step,
    filter_logits,
    generate,
    prefill,
    sample_greedy,
    sample_logits,
    sample_nucleus,
    sample_top_k,
    sampling_settings,
    stream_generate,
)

ATOL = 1e-5


def _peaky_params(cfg, seed=0, std=0.3):
    """Init + N(0, std) noise: freshly initialised models greedily repeat one token, which would
    make sequence comparisons vacuous; these weights give varied continuations."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def cfg():
    from gpt2_jax.config import GPT2Config
    return GPT2Config(vocab_size=97, n_ctx=16, n_layer=2, d_model=32, n_head=4, d_ff=64)


@pytest.fixture(scope="module")
def params(cfg):
    return _peaky_params(cfg)


def _tokens(cfg, n, seed):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (n,), 0, cfg.vocab_size), np.int32)


@functools.cache
def _jit_forward(cfg):
    return jax.jit(lambda params, tokens_BT: forward(params, cfg, tokens_BT))


def reference_greedy(params, cfg, prompt, max_new_tokens, slide_keep):
    """The documented semantics, written naively: a full forward pass over the current window per
    token; the window starts at the prompt's last n_ctx tokens and, when a new token would make it
    longer than n_ctx, restarts as the last `slide_keep` tokens."""
    full_forward = _jit_forward(cfg)
    seq = [int(t) for t in prompt]
    start = max(0, len(seq) - cfg.n_ctx)
    for _ in range(max_new_tokens):
        window = seq[start:]
        padded = np.zeros((1, cfg.n_ctx), np.int32)  # right padding is invisible to a causal model
        padded[0, :len(window)] = window
        logits_V = full_forward(params, padded)[0, len(window) - 1]
        seq.append(int(jnp.argmax(logits_V)))
        if len(seq) - start > cfg.n_ctx:
            start = len(seq) - slide_keep
    return np.asarray(seq)


# ─── cache ───────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("layout", ["training", "inference"])
def test_prefill_then_decode_steps_match_full_forward_at_every_position(cfg, params, layout):
    full_params = params
    if layout == "inference":  # decode.inference_params: Dense kernels stored (out, in) as kernel_OI
        params = decode.inference_params(params, cfg)
        c_fc = params["h_0"]["mlp"]["c_fc"]
        assert "kernel" not in c_fc and c_fc["kernel_OI"].shape == (cfg.d_ff, cfg.d_model)
        np.testing.assert_array_equal(c_fc["kernel_OI"], full_params["h_0"]["mlp"]["c_fc"]["kernel"].T)
    seqs = [_tokens(cfg, cfg.n_ctx, seed=3), _tokens(cfg, cfg.n_ctx, seed=4)]
    full_BTV = forward(full_params, cfg, jnp.asarray(np.stack(seqs)))
    lengths = np.array([3, 6])  # right-padded prompt of width 8, padding = token 5
    prompt_BP = np.full((2, 8), 5, np.int32)
    for b, n in enumerate(lengths):
        prompt_BP[b, :n] = seqs[b][:n]
    logits_BV, cache = prefill(params, cfg, init_cache(cfg, 2), jnp.asarray(prompt_BP), jnp.asarray(lengths))
    np.testing.assert_allclose(logits_BV, full_BTV[np.arange(2), lengths - 1], atol=ATOL)
    position_B = lengths.copy()
    while position_B.max() < cfg.n_ctx:  # up to the last position of the context
        token_B = np.array([seqs[b][min(position_B[b], cfg.n_ctx - 1)] for b in range(2)], np.int32)
        logits_BV, cache = decode_step(params, cfg, cache, jnp.asarray(token_B), jnp.asarray(position_B))
        for b in range(2):
            if position_B[b] < cfg.n_ctx:
                np.testing.assert_allclose(logits_BV[b], full_BTV[b, position_B[b]], atol=ATOL)
        position_B = np.minimum(position_B + 1, cfg.n_ctx)


# ─── greedy generation ───────────────────────────────────────────────────────────────────────────

def test_greedy_generate_equals_argmax_of_repeated_full_forward(cfg, params):
    prompt = _tokens(cfg, 5, seed=7)
    out = np.asarray(generate(params, cfg, prompt[None], max_new_tokens=cfg.n_ctx - 5))
    expected = reference_greedy(params, cfg, prompt, cfg.n_ctx - 5, slide_keep=cfg.n_ctx // 2)
    assert len(set(expected[5:].tolist())) >= 4  # a varied continuation, so equality means something
    np.testing.assert_array_equal(out[0], expected)


@pytest.mark.parametrize("B", [1, 3])
def test_the_decoding_loop_writes_its_cache_in_place_without_copying_it(cfg, params, B):
    # With the cache laid out (B, H, S, K) XLA:CPU merged B and H for attention's products after the
    # step's write, wrote the cache twice and copied it three times per layer and step (small at batch 1:
    # 24 copies of 393 KB a token). The number can only be read from the compiled program. Float32: the
    # cache's dtype on a CPU whatever the compute dtype (decode.cache_dtype; the test below).
    state = decode._start_jit(params, cfg, jnp.zeros((B, 8), jnp.int32), jnp.full((B,), 3, jnp.int32),
                              jax.random.PRNGKey(0), capacity=8)  # 8 + 8 = n_ctx: no slide
    cache_GSK = state.cache[0][0]
    assert cache_GSK.size == B * cfg.n_head * cfg.n_ctx * cfg.d_head
    text = decode._advance_jit.lower(params, cfg, state, sampling_settings(), method="greedy", num_steps=8,
                                     slide_keep=8).compile().as_text()
    loop = text[:text.index("\nENTRY")]  # the while loop's body and the rest; not the entry's one copy of its input
    copies = [tuple(int(d) for d in dims.split(",") if d)
              for dims in re.findall(r"= \w+\[([\d,]*)\]\S* copy\(", loop)]
    cache_sized = [c for c in copies if math.prod(c) == cache_GSK.size]
    assert "while(" in text and not cache_sized, cache_sized


def test_a_bf16_decoding_loop_on_a_cpu_carries_a_float32_cache_and_never_converts_it(cfg, params):
    # XLA:CPU runs attention's decoding products in float32 whatever their inputs: a bf16 cache was
    # written as 16-bit words (not in place), written twice and widened to float32 every layer and step.
    bf16 = cfg.replace(dtype="bfloat16")
    assert decode.cache_dtype(bf16, "cpu") == jnp.float32 and decode.cache_dtype(bf16, "gpu") == jnp.bfloat16
    params16 = decode.inference_params(params, bf16)
    state = decode._start_jit(params16, bf16, jnp.zeros((1, 8), jnp.int32), jnp.full((1,), 3, jnp.int32),
                              jax.random.PRNGKey(0), capacity=8)
    assert all(c.dtype == jnp.float32 for layer in state.cache for c in layer)
    G, S, K = state.cache[0].k_GSK.shape
    text = decode._advance_jit.lower(params16, bf16, state, sampling_settings(), method="greedy", num_steps=8,
                                     slide_keep=8).compile().as_text()
    cache_shaped = re.findall(rf"= (\w+)\[{G},{S},{K}\]", text)
    assert "f32" in cache_shaped and not {"bf16", "u16"} & set(cache_shaped), sorted(set(cache_shaped))
    new = np.asarray(decode._advance_jit(params16, bf16, state, sampling_settings(), method="greedy",
                                         num_steps=8, slide_keep=8)[1])
    np.testing.assert_array_equal(new[0], reference_greedy(params16, bf16, np.zeros(3, np.int32), 8, 8)[3:])


@pytest.mark.slow
@pytest.mark.parametrize("slide_keep", [1, 8, 15, 16])
def test_generation_beyond_the_context_follows_the_sliding_window_semantics(cfg, params, slide_keep):
    prompt = _tokens(cfg, 5, seed=7)
    out = np.asarray(generate(params, cfg, prompt[None], max_new_tokens=45, slide_keep=slide_keep))
    np.testing.assert_array_equal(out[0], reference_greedy(params, cfg, prompt, 45, slide_keep))
    assert out.shape == (1, 50) and out.min() >= 0 and out.max() < cfg.vocab_size


@pytest.mark.slow
def test_default_window_keeps_half_the_context_and_the_window_size_matters(cfg, params):
    prompt = _tokens(cfg, 5, seed=7)
    default = np.asarray(generate(params, cfg, prompt[None], max_new_tokens=45))[0]
    np.testing.assert_array_equal(default, reference_greedy(params, cfg, prompt, 45, slide_keep=8))
    exact = reference_greedy(params, cfg, prompt, 45, slide_keep=16)
    assert (default[cfg.n_ctx + 1:] != exact[cfg.n_ctx + 1:]).any()  # the reference can tell windows apart


@pytest.mark.slow
def test_prompt_longer_than_the_context_starts_from_its_last_n_ctx_tokens(cfg, params):
    prompt = _tokens(cfg, 21, seed=8)
    out = np.asarray(generate(params, cfg, prompt[None], max_new_tokens=12))
    np.testing.assert_array_equal(out[0], reference_greedy(params, cfg, prompt, 12, slide_keep=8))
    np.testing.assert_array_equal(out[0, :21], prompt)


@pytest.mark.slow
def test_padded_batch_rows_equal_their_unpadded_single_row_results(cfg, params):
    """Rows of lengths 3, 9, 14 and 20 (> n_ctx) reach the context's end at different steps."""
    lengths = [3, 9, 14, 20]
    prompts = [_tokens(cfg, n, seed=10 + n) for n in lengths]
    prompt_BP = np.full((4, 20), 7, np.int32)
    for b, p in enumerate(prompts):
        prompt_BP[b, :len(p)] = p
    N = 30
    batch = np.asarray(generate(params, cfg, prompt_BP, max_new_tokens=N, prompt_lengths_B=lengths))
    assert batch.shape == (4, 20 + N)
    for b, p in enumerate(prompts):
        single = np.asarray(generate(params, cfg, p[None], max_new_tokens=N))[0]
        np.testing.assert_array_equal(batch[b, :len(p) + N], single)
        np.testing.assert_array_equal(batch[b, len(p) + N:], 0)  # right padding (no eos_id: 0)


def test_eos_stops_a_row_which_then_emits_only_eos(cfg, params):
    prompt_BP = np.stack([_tokens(cfg, 4, seed=20), _tokens(cfg, 4, seed=21)])
    free = np.asarray(generate(params, cfg, prompt_BP, max_new_tokens=20))[:, 4:]
    eos = int(free[0, 3])  # row 0 says this token at step 3 (perhaps earlier too)
    out = np.asarray(generate(params, cfg, prompt_BP, max_new_tokens=20, eos_id=eos))[:, 4:]
    for b in range(2):
        hits = np.flatnonzero(free[b] == eos)
        stop = hits[0] if hits.size else 20
        np.testing.assert_array_equal(out[b, :stop + 1], free[b, :stop + 1])
        np.testing.assert_array_equal(out[b, stop:], eos)
    assert np.flatnonzero(free[0] == eos)[0] <= 3


# ─── sampling through generate ───────────────────────────────────────────────────────────────────

@pytest.mark.slow
@pytest.mark.parametrize("method", ["top_k", "nucleus", "top_k_nucleus"])
def test_same_seed_gives_same_tokens_and_another_seed_other_tokens(cfg, params, method):
    prompt = _tokens(cfg, 4, seed=30)[None]
    run = lambda seed: np.asarray(generate(params, cfg, prompt, max_new_tokens=24, method=method, top_k=20,
                                           top_p=0.9, rng=jax.random.PRNGKey(seed)))
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a, b)
    assert (a[0, 4:] != c[0, 4:]).sum() >= 5


@pytest.mark.slow
def test_rows_with_the_same_prompt_draw_independent_samples(cfg, params):
    prompt_BP = np.repeat(_tokens(cfg, 4, seed=30)[None], 4, axis=0)
    out = np.asarray(generate(params, cfg, prompt_BP, max_new_tokens=20, method="nucleus", top_p=0.95,
                              rng=jax.random.PRNGKey(0)))
    assert len({tuple(r) for r in out[:, 4:].tolist()}) == 4


@pytest.mark.slow
def test_temperature_zero_sampling_is_greedy(cfg, params):
    prompt = _tokens(cfg, 4, seed=31)[None]
    greedy = np.asarray(generate(params, cfg, prompt, max_new_tokens=30))
    for method in ("top_k", "nucleus"):
        cold = generate(params, cfg, prompt, max_new_tokens=30, method=method, temperature=0.0,
                        rng=jax.random.PRNGKey(3))
        np.testing.assert_array_equal(cold, greedy)


@pytest.mark.slow
def test_stream_generate_yields_generate_tokens_chunk_by_chunk(cfg, params):
    prompt = _tokens(cfg, 5, seed=40)[None]
    kwargs = dict(max_new_tokens=21, method="nucleus", top_p=0.9, rng=jax.random.PRNGKey(4))
    chunks = list(stream_generate(params, cfg, prompt, chunk_size=8, **kwargs))
    assert [c.shape for c in chunks] == [(1, 8), (1, 8), (1, 5)]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.asarray(generate(params, cfg, prompt, **kwargs))[:, 5:])


@pytest.mark.slow
def test_stream_generate_stops_once_every_row_emitted_eos(cfg, params):
    prompt = _tokens(cfg, 4, seed=20)[None]
    free = np.asarray(generate(params, cfg, prompt, max_new_tokens=8))[0, 4:]
    eos = int(free[2])
    chunks = list(stream_generate(params, cfg, prompt, max_new_tokens=40, chunk_size=4, eos_id=eos))
    assert len(chunks) == 1  # stopped after the chunk holding eos, not 10 chunks
    first = np.flatnonzero(free == eos)[0]
    np.testing.assert_array_equal(chunks[0][0, :first + 1], free[:first + 1])


# ─── compilation ─────────────────────────────────────────────────────────────────────────────────

@contextlib.contextmanager
def _compilations(name):
    """Counts XLA compilations of the jitted function ``name``, through public jax.monitoring."""
    names = []

    def listen(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield lambda: names.count(f"jit({name})")
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_prompt_buckets_are_powers_of_two_from_16_capped_at_the_context():
    assert [bucket_length(n, 128) for n in (1, 16, 17, 32, 33, 100, 128)] == [16, 16, 32, 32, 64, 128, 128]
    assert [bucket_length(n, 40) for n in (1, 17, 33, 40)] == [16, 32, 40, 40]


@pytest.mark.slow
def test_new_prompt_length_and_new_settings_in_the_same_bucket_do_not_recompile(cfg):
    cfg = cfg.replace(vocab_size=101, n_ctx=64)  # a config no other test compiles for
    params = init_params(cfg, jax.random.PRNGKey(0))
    gen = lambda n, **kw: generate(params, cfg, _tokens(cfg, n, seed=n)[None], max_new_tokens=6,
                                   method="nucleus", rng=jax.random.PRNGKey(n), **kw)
    with _compilations("_generate_jit") as compiled:
        gen(5)
        assert compiled() == 1
        gen(11, temperature=0.7, top_p=0.5, eos_id=3)  # same bucket (16), other settings
        gen(16, temperature=0.0, top_p=1.0)
        assert compiled() == 1
        gen(17)  # next bucket (32): one more compilation
        assert compiled() == 2


# ─── samplers on fixed logits ────────────────────────────────────────────────────────────────────

def _kept(filtered_BV):
    return set(np.flatnonzero(np.isfinite(np.asarray(filtered_BV)[0])).tolist())


def test_filters_break_ties_at_the_threshold_by_lower_id_and_count_each_tied_token():
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.1, 0.4, 0.1, 0.1]]))
    assert _kept(filter_logits(logits, top_p=0.65)) == {3, 1, 0}  # 0.4 + 0.2 < 0.65: one of the 0.1 ties
    assert _kept(filter_logits(logits, top_p=0.75)) == {3, 1, 0, 2}  # 0.7 < 0.75: a second tie
    assert _kept(filter_logits(logits, top_k=4)) == {3, 1, 0, 2}
    signed_zeros = jnp.array([[-0.0, 0.0, -1.0]])  # equal values, whatever their sign bit
    assert _kept(filter_logits(signed_zeros, top_k=1)) == {0}
    many = jnp.zeros((1, 50))  # all tied: exactly k, the lowest ids
    assert _kept(filter_logits(many, top_k=7)) == set(range(7))
    assert _kept(filter_logits(many, top_p=0.31)) == set(range(16))  # 15 * 0.02 = 0.30 < 0.31


def test_top_k_keeps_exactly_k_tokens_breaking_ties_towards_the_lower_id():
    logits = jnp.array([[0.0, 2.0, 5.0, 2.0, 2.0, -1.0]])
    assert _kept(filter_logits(logits, top_k=3)) == {2, 1, 3}
    assert _kept(filter_logits(logits, top_k=1)) == {2}
    assert _kept(filter_logits(logits, top_k=6)) == set(range(6))
    draws = sample_top_k(jnp.repeat(logits, 4000, axis=0), jax.random.PRNGKey(0), top_k=3)
    assert set(np.unique(draws).tolist()) == {1, 2, 3}  # never outside the top 3, every one of them reached


def test_nucleus_keeps_the_smallest_set_reaching_p_including_the_crossing_token():
    probs = {2: 0.5, 0: 0.3, 3: 0.15, 1: 0.05}  # ids deliberately not in probability order
    logits = jnp.log(jnp.array([[probs[i] for i in range(4)]]))
    assert _kept(filter_logits(logits, top_p=0.1)) == {2}  # the top token alone already reaches p
    assert _kept(filter_logits(logits, top_p=0.6)) == {2, 0}  # 0.5 < 0.6 <= 0.8: token 0 crosses p
    assert _kept(filter_logits(logits, top_p=0.81)) == {2, 0, 3}
    assert _kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3}
    draws = sample_nucleus(jnp.repeat(logits, 4000, axis=0), jax.random.PRNGKey(0), top_p=0.6)
    assert set(np.unique(draws).tolist()) == {0, 2}


def test_temperature_is_applied_before_filtering():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    # p=0.7 is crossed by token 1 at T=1 (0.5, 0.8); T=0.25 sharpens to (0.88, ...) so token 0
    # alone reaches it; T=3 flattens to (0.34, 0.28, 0.22, 0.16) so token 2 crosses it.
    assert _kept(filter_logits(logits, temperature=1.0, top_p=0.7)) == {0, 1}
    assert _kept(filter_logits(logits, temperature=0.25, top_p=0.7)) == {0}
    assert _kept(filter_logits(logits, temperature=3.0, top_p=0.7)) == {0, 1, 2}
    np.testing.assert_allclose(filter_logits(logits, temperature=0.25), logits / 0.25, rtol=1e-6)


def test_top_k_then_top_p_renormalises_after_top_k():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]]))
    # After top-2 the probabilities are (0.57, 0.43): token 0 alone reaches 0.5. Top-p on the
    # full distribution would have kept token 1 too (0.4 < 0.5).
    assert _kept(filter_logits(logits, top_k=2, top_p=0.5)) == {0}
    assert _kept(filter_logits(logits, top_p=0.5)) == {0, 1}


def test_temperature_zero_and_greedy_pick_the_argmax_lowest_id_on_ties():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [9.0, 1.0, 2.0, 9.5]])
    np.testing.assert_array_equal(sample_greedy(logits), [1, 3])
    for key in range(5):
        for method in ("top_k", "nucleus", "top_k_nucleus"):
            tokens = sample_logits(logits, jax.random.PRNGKey(key), method=method, temperature=0.0, top_k=3)
            np.testing.assert_array_equal(tokens, [1, 3])


def reference_distribution(logits_V, *, temperature, top_k=None, top_p=None):
    """numpy restatement of the sampler's definition, for the frequency tests."""
    z = np.asarray(logits_V, np.float64) / temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        p = np.exp(z[keep] - z[keep].max())
        p /= p.sum()
        mass_before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        keep = [i for i, m in zip(keep, mass_before) if m < top_p]
    probs = np.zeros(len(z))
    probs[keep] = np.exp(z[keep] - z[keep].max())
    return probs / probs.sum()


@pytest.mark.parametrize("method,temperature,top_k,top_p", [
    ("top_k", 1.0, 4, None),
    ("top_k", 0.7, 6, None),
    ("nucleus", 1.0, None, 0.8),
    ("nucleus", 1.5, None, 0.6),
    ("top_k_nucleus", 0.8, 5, 0.7),
])
def test_sampled_frequencies_match_the_renormalised_truncated_distribution(method, temperature, top_k, top_p):
    logits_V = jnp.array([1.3, -0.2, 0.9, 2.1, 0.1, 1.6, -1.0, 0.5, 1.1, -0.5])
    n = 50_000
    draws = sample_logits(jnp.broadcast_to(logits_V, (n, 10)), jax.random.PRNGKey(1), method=method,
                          temperature=temperature, top_k=top_k or 0, top_p=top_p or 0.0)
    freq = np.bincount(np.asarray(draws), minlength=10) / n
    expected = reference_distribution(logits_V, temperature=temperature, top_k=top_k, top_p=top_p)
    assert 1 < (expected > 0).sum() < 10  # the filter truncates, and leaves a choice
    np.testing.assert_array_equal(freq[expected == 0], 0.0)  # truncated tokens are never drawn
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-4), (freq, expected)
    chi2 = float(((freq - expected)[expected > 0] ** 2 / expected[expected > 0]).sum() * n)
    dof = int((expected > 0).sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # far above the 99.9% quantile for dof <= 5


@pytest.mark.slow
@pytest.mark.parametrize("scale,method,top_k,top_p", [
    (3.0, "nucleus", None, 0.9),  # peaked: a few dozen tokens
    (0.1, "nucleus", None, 0.9),  # flat: hundreds
    (0.1, "top_k", 300, None),
    (0.1, "top_k_nucleus", 400, 0.5),
])
def test_sampling_matches_the_definition_on_a_larger_vocabulary(scale, method, top_k, top_p):
    V, n = 600, 40_000
    logits_V = scale * jax.random.normal(jax.random.PRNGKey(2), (V,))
    expected = reference_distribution(logits_V, temperature=1.0, top_k=top_k, top_p=top_p)
    kept = set(np.flatnonzero(expected).tolist())
    assert _kept(filter_logits(logits_V[None], top_k=top_k, top_p=top_p)) == kept
    draws = sample_logits(jnp.broadcast_to(logits_V, (n, V)), jax.random.PRNGKey(3), method=method,
                          top_k=top_k or 0, top_p=top_p or 0.0)
    freq = np.bincount(np.asarray(draws), minlength=V) / n
    np.testing.assert_array_equal(freq[expected == 0], 0.0)
    support = expected > 0
    chi2 = float(((freq - expected)[support] ** 2 / expected[support]).sum() * n)
    dof = int(support.sum()) - 1
    assert dof > 10 and chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_samplers_are_jit_compatible_with_traced_settings():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    def top_k_nucleus(l, k, t, kk, p):
        return sample_logits(l, k, method="top_k_nucleus", temperature=t, top_k=kk, top_p=p)

    jitted = jax.jit(top_k_nucleus)
    with _compilations("top_k_nucleus") as compiled:
        for seed in range(20):
            token = jitted(logits, jax.random.PRNGKey(seed), 1.0, 3, 0.6)
            assert int(token[0]) in (0, 1)
    assert compiled() == 1


# ─── batches larger than memory ──────────────────────────────────────────────────────────────────

def _mixed_batch(cfg):
    """7 rows with prompts of 1 to 22 tokens (some beyond the 16-token context): rows slide at different steps."""
    lengths = [1, 5, 22, 9, 16, 3, 12]
    prompt_BP = np.zeros((len(lengths), max(lengths)), np.int32)
    for b, n in enumerate(lengths):
        prompt_BP[b, :n] = _tokens(cfg, n, seed=50 + b)
    return prompt_BP, lengths


@pytest.mark.slow
@pytest.mark.parametrize("method", ["greedy", "top_k", "nucleus", "top_k_nucleus"])
def test_rows_decoded_a_slice_at_a_time_equal_the_whole_batch_bit_for_bit(cfg, params, method):
    """Each row samples with its own key (from rng and its row index): which rows share a call does not matter."""
    prompt_BP, lengths = _mixed_batch(cfg)
    kwargs = dict(max_new_tokens=30, method=method, top_k=20, top_p=0.9, rng=jax.random.PRNGKey(8),
                  prompt_lengths_B=lengths, eos_id=5)
    whole = np.asarray(generate(params, cfg, prompt_BP, rows_per_call=7, **kwargs))
    for rows in (1, 3, 4):
        np.testing.assert_array_equal(np.asarray(generate(params, cfg, prompt_BP, rows_per_call=rows, **kwargs)), whole)
    if method != "greedy":
        assert len({tuple(r) for r in whole[:, 22:].tolist()}) == 7  # the rows did sample, differently


class _CallSpy:
    """``_generate_jit`` that records the rows of each call."""

    def __init__(self, jitted):
        self.jitted, self.rows = jitted, []

    def __call__(self, *args, **kwargs):
        self.rows.append(args[1].shape[0])
        return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)


def _bytes_for_rows(params, cfg, rows, *, max_new_tokens, method):
    """What one call of ``rows`` rows with prompts as long as the context needs."""
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    compiled = _generate_jit.lower(params, shape(rows, cfg.n_ctx), shape(rows), jax.random.PRNGKey(0), shape(rows),
                                   sampling_settings(), cfg=cfg, method=method, max_new_tokens=max_new_tokens,
                                   slide_keep=cfg.n_ctx // 2).compile()
    return memory.bytes_needed(compiled)


@pytest.mark.slow
def test_a_batch_larger_than_free_memory_is_split_into_calls_giving_the_same_tokens(cfg, params, monkeypatch):
    prompt_BP, lengths = _mixed_batch(cfg)
    kwargs = dict(max_new_tokens=30, method="nucleus", rng=jax.random.PRNGKey(9), prompt_lengths_B=lengths)
    whole = np.asarray(generate(params, cfg, prompt_BP, rows_per_call=7, **kwargs))
    monkeypatch.setattr(memory, "free_bytes", lambda devices: _bytes_for_rows(params, cfg, 3, max_new_tokens=30,
                                                                                method="nucleus"))
    spy = _CallSpy(_generate_jit)
    monkeypatch.setattr(decode, "_generate_jit", spy)
    np.testing.assert_array_equal(np.asarray(generate(params, cfg, prompt_BP, **kwargs)), whole)
    assert spy.rows == [3, 3, 3]  # 7 rows, 3 fit: three calls, the last padded


@pytest.mark.slow
def test_a_row_that_alone_needs_more_than_free_memory_is_an_out_of_memory_error(cfg, params, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 1000)
    with pytest.raises(memory.OutOfMemory, match=r"^1 row needs [0-9.]+ [KM]iB, more than the 1000 bytes that can"):
        generate(params, cfg, np.ones((4, 3), np.int32), max_new_tokens=10, method="top_k")


# ─── bad input ───────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_BP=np.zeros((1, 0), np.int32)), "empty prompt"),
    (dict(prompt_lengths_B=[2, 0]), "empty prompt"),
    (dict(prompt_lengths_B=[2, 9]), "exceed the prompt width"),
    (dict(prompt_BP=np.array([[1, 97]])), "outside the model's vocabulary"),
    (dict(prompt_BP=np.array([1, 2, 3])), "(batch, length)"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(method="beam"), "method must be one of"),
    (dict(method="nucleus", top_p=0.0), "top_p must be in (0, 1]"),
    (dict(method="nucleus", top_p=1.5), "top_p must be in (0, 1]"),
    (dict(method="top_k", top_k=0), "top_k must be between 1 and the vocabulary size 97"),
    (dict(method="top_k", top_k=98), "top_k must be between 1 and the vocabulary size 97"),
    (dict(method="top_k", temperature=-0.5), "temperature must be >= 0"),
    (dict(eos_id=97), "eos_id must be a token id"),
    (dict(slide_keep=17), "slide_keep must be between 1 and n_ctx=16"),
    (dict(rows_per_call=0), "rows_per_call must be >= 1"),
])
def test_bad_arguments_raise_one_line_user_errors(cfg, params, kwargs, message):
    args = dict(prompt_BP=np.array([[1, 2], [3, 4]], np.int32), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(UserError) as e:
        generate(params, cfg, args.pop("prompt_BP"), **args)
    assert message in str(e.value) and "\n" not in str(e.value)
