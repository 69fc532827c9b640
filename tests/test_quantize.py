"""int8 inference (``model.quantize_int8``; ``int8_dynamic`` also quantizes each product's input rows): the
layout, the model reading it, greedy text and perplexity close to float32's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import bench, decode
from gpt2_jax.core import TrainConfig, init_train_state, make_eval_step, make_optimizer, make_schedule, \
    make_train_step
from gpt2_jax.model import Dense, forward, init_params, quantize_int8, token_nll


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_our_dense_is_flax_dense_bitwise_in_float32_and_rounds_once_in_bf16(dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 24))
    ours, flax_dense = Dense(40, dtype=dtype, kernel_init=nn.initializers.normal(0.02)), \
        nn.Dense(40, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02))
    params = ours.init(jax.random.PRNGKey(1), x)
    params["params"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), (40,))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_dense.init(jax.random.PRNGKey(1), x))
    if dtype == jnp.float32:
        np.testing.assert_array_equal(ours.apply(params, x), flax_dense.apply(params, x))
        return
    # bf16: the product of the bf16 inputs and the bias are summed in float32 and rounded once (dots.mixed_matmul),
    # where flax's Dense also rounds the product before adding a bf16 bias.
    p = params["params"]
    exact = x.astype(dtype).astype(jnp.float32) @ p["kernel"].astype(dtype).astype(jnp.float32) + p["bias"]
    ours_err = np.abs(np.asarray(ours.apply(params, x), np.float32) - exact)
    flax_err = np.abs(np.asarray(flax_dense.apply(params, x), np.float32) - exact)
    assert ours.apply(params, x).dtype == jnp.bfloat16
    assert np.all(ours_err <= 2.0 ** -8 * np.abs(exact) + 1e-6)  # within half a bf16 step of the exact value
    assert ours_err.mean() < flax_err.mean() and ours_err.max() <= flax_err.max()


def _dequantized(q):
    """The float weights an int8 tree stands for: int8 · scale, per column (kernels) or per row (wte)."""
    out = jax.tree.map(lambda a: a, q)
    out["wte"] = {"embedding": q["wte"]["embedding"].astype(jnp.float32) * q["wte"]["int8_scale"][:, None]}
    for name, block in out.items():
        if name.startswith("h_"):
            for part in ("attn", "mlp"):
                for layer in block[part].values():
                    layer["kernel"] = layer["kernel"].astype(jnp.float32) * layer.pop("int8_scale")
    return out


def test_quantize_int8_is_per_column_and_per_token_and_keeps_the_rest(micro_cfg):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    q = quantize_int8(params)
    fc, fc_q = params["h_0"]["mlp"]["c_fc"], q["h_0"]["mlp"]["c_fc"]
    assert fc_q["kernel"].dtype == jnp.int8 and fc_q["int8_scale"].shape == (micro_cfg.d_ff,)
    np.testing.assert_allclose(fc_q["int8_scale"], np.abs(fc["kernel"]).max(axis=0) / 127, rtol=1e-6)
    assert q["wte"]["embedding"].dtype == jnp.int8 and q["wte"]["int8_scale"].shape == (micro_cfg.vocab_size,)
    assert int(np.abs(np.asarray(q["wte"]["embedding"], np.int32)).max()) == 127
    deq = _dequantized(q)
    for w, d, s in ((fc["kernel"], deq["h_0"]["mlp"]["c_fc"]["kernel"], fc_q["int8_scale"][None]),
                    (params["wte"]["embedding"], deq["wte"]["embedding"], q["wte"]["int8_scale"][:, None])):
        assert np.all(np.abs(np.asarray(w) - np.asarray(d)) <= np.asarray(s) / 2 + 1e-7)  # rounding: half a step
    for kept in (q["wpe"], q["ln_f"], q["h_1"]["ln_2"], q["h_1"]["attn"]["c_proj"]["bias"]):
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(kept))
    with pytest.raises(AssertionError, match="already quantized"):
        quantize_int8(q)


def test_the_model_reads_int8_weights_as_their_dequantized_floats(micro_cfg):
    params = jax.tree.map(lambda a: a * 5, init_params(micro_cfg, jax.random.PRNGKey(0)))
    q = quantize_int8(params)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, micro_cfg.n_ctx), 0, micro_cfg.vocab_size)
    logits_q = forward(q, micro_cfg, tokens_BT)
    np.testing.assert_allclose(logits_q, forward(_dequantized(q), micro_cfg, tokens_BT), rtol=1e-4, atol=1e-4)
    # the chunked head of evaluation applies the same per-token scales
    batch = {"inputs": tokens_BT[:, :-1], "targets": tokens_BT[:, 1:], "mask": jnp.ones((2, micro_cfg.n_ctx - 1))}
    nll_sum = make_eval_step(micro_cfg, axis_name=None)(q, batch)["nll_sum"]
    expected = token_nll(forward(q, micro_cfg, batch["inputs"]), batch["targets"]).sum()
    np.testing.assert_allclose(nll_sum, expected, rtol=1e-5)
    assert float(jnp.max(jnp.abs(logits_q - forward(params, micro_cfg, tokens_BT)))) > 0  # it did quantize


def _trained(cfg, steps=150):
    """The micro model trained on a learnable stream: token i+1 = 7 · token i + 3 (mod V), 10% noise."""
    rng = np.random.default_rng(0)
    V, T = cfg.vocab_size, cfg.n_ctx
    def batch(n):
        t = np.zeros((n, T + 1), np.int32)
        t[:, 0] = rng.integers(0, V, n)
        for i in range(T):
            noise = rng.random(n) < 0.1
            t[:, i + 1] = np.where(noise, rng.integers(0, V, n), (7 * t[:, i] + 3) % V)
        return {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]), "mask": jnp.ones((n, T))}
    tc = TrainConfig(batch_size=16, max_steps=steps, lr=3e-3, warmup_steps=10)
    schedule = make_schedule(tc, steps)
    optimizer = make_optimizer(tc, steps)
    state = init_train_state(cfg, optimizer, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(cfg, optimizer, schedule, axis_name=None))
    for i in range(steps):
        state, _ = step(state, batch(16), jax.random.PRNGKey(i))
    return state.params, batch(64)


@pytest.fixture(scope="module")
def trained():
    from gpt2_jax.config import GPT2Config
    cfg = GPT2Config(vocab_size=97, n_ctx=16, n_layer=2, d_model=32, n_head=4, d_ff=64, dropout=0.0, attn_dropout=0.0)
    return (cfg, *_trained(cfg))


def _quantized(params, cfg, quantize):
    """The model ``--quantize`` means: weight-only int8 as evaluate reads it, or int8_dynamic's."""
    if quantize == "int8":
        return quantize_int8(params), cfg
    q_cfg = decode.inference_config(cfg, quantize)
    return decode.inference_params(params, q_cfg, quantize), q_cfg


@pytest.mark.parametrize("quantize", ["int8", "int8_dynamic"])
def test_int8_perplexity_is_within_one_percent_of_float32_on_a_trained_model(trained, quantize):
    cfg, params, held_out = trained
    nll_f = float(make_eval_step(cfg, axis_name=None)(params, held_out)["nll_sum"]) / float(held_out["mask"].sum())
    q_params, q_cfg = _quantized(params, cfg, quantize)
    nll_q = float(make_eval_step(q_cfg, axis_name=None)(q_params, held_out)["nll_sum"]) / float(held_out["mask"].sum())
    assert nll_f < 0.5 * np.log(cfg.vocab_size)  # it learned the stream (uniform: log 97 = 4.57)
    assert nll_q != nll_f  # the quantized model is another model
    assert abs(np.exp(nll_q) / np.exp(nll_f) - 1) <= 0.01, (np.exp(nll_f), np.exp(nll_q))


def test_int8_dynamic_evaluation_scores_the_logits_decoding_samples_from(trained):
    # The eval step's chunked head sees the rows int8_matmul_t quantizes; the full head (int8 x int8) agrees.
    cfg, params, held_out = trained
    q_params, q_cfg = _quantized(params, cfg, "int8_dynamic")
    logits_BTV = forward(q_params, q_cfg, held_out["inputs"])
    nll_sum = float((token_nll(logits_BTV, held_out["targets"]) * held_out["mask"]).sum())
    assert float(make_eval_step(q_cfg, axis_name=None)(q_params, held_out)["nll_sum"]) == pytest.approx(nll_sum, rel=1e-5)
    x_cfg = cfg.replace(int8_activations=False)  # the same int8 weights, float rows: other logits
    assert not np.allclose(forward(q_params, x_cfg, held_out["inputs"]), logits_BTV, atol=1e-6)


@pytest.mark.parametrize("quantize", ["int8", "int8_dynamic"])
def test_int8_greedy_text_is_float32_greedy_text_on_a_trained_model(trained, quantize):
    cfg, params, held_out = trained
    prompt_BP = np.asarray(held_out["inputs"][:8, :4])
    f32 = np.asarray(decode.generate(params, cfg, prompt_BP, max_new_tokens=24, method="greedy"))
    q_cfg = decode.inference_config(cfg, quantize)
    q8 = np.asarray(decode.generate(decode.inference_params(params, q_cfg, quantize), q_cfg, prompt_BP,
                                    max_new_tokens=24, method="greedy"))
    np.testing.assert_array_equal(q8, f32)
    assert len(set(f32[:, 4:].ravel().tolist())) > 8  # the text is not one repeated token


def test_bench_generate_reports_a_quarter_of_the_weight_bytes_with_int8(micro_cfg):
    kw = dict(batch_size=1, prompt_len=4, new_tokens=4, method="greedy", repeats=1)
    f32, q8, q8_dynamic = (bench.bench_generate(micro_cfg, quantize=q, **kw) for q in ("none", "int8", "int8_dynamic"))
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    assert f32["weight_bytes"] == 4 * sum(x.size for x in jax.tree.leaves(params))
    assert 0.25 < q8["weight_bytes"] / f32["weight_bytes"] < 0.35 and q8["quantize"] == "int8"
    assert q8_dynamic["weight_bytes"] == q8["weight_bytes"] and q8_dynamic["quantize"] == "int8_dynamic"


@pytest.mark.parametrize("rows", [1, 5, 20])  # both orders of the product (dots.int8_matmul_t)
def test_int8_matmul_t_is_the_int8_product_of_the_rows_quantized_to_int8(rows):
    from gpt2_jax.dots import int8_matmul_t

    x_NI = jax.random.normal(jax.random.PRNGKey(0), (rows, 48)) * jnp.arange(1, rows + 1)[:, None]
    x_NI = x_NI.at[0, 3].set(0.0)
    w8_OI = jax.random.randint(jax.random.PRNGKey(1), (40, 48), -127, 128).astype(jnp.int8)
    x = np.asarray(x_NI, np.float64)
    scale_N1 = np.abs(x).max(axis=1, keepdims=True) / 127
    q_NI = np.round(x / scale_N1)
    assert np.abs(q_NI).max() == 127
    expected_NO = (q_NI @ np.asarray(w8_OI, np.float64).T) * scale_N1
    np.testing.assert_allclose(int8_matmul_t(x_NI, w8_OI), expected_NO, rtol=1e-5, atol=1e-4)
    # Not the float product: the rows really are rounded to 255 levels.
    assert not np.allclose(np.asarray(int8_matmul_t(x_NI, w8_OI)), x @ np.asarray(w8_OI, np.float64).T, rtol=1e-4)
