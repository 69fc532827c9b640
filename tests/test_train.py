"""Training: the optimizer and step are what they claim, and runs survive kills, signals, damage and bad input.

The pure pieces are checked in-process on the micro model. The CLI is run in subprocesses on the
micro model with a 512-token BPE over the real WikiText-2 (tokenizer and streams are cached by
the data module; compiled steps by a JAX compilation cache shared by the session's subprocesses).
"""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax import checkpoint as ckpt
from gpt2_jax import train
from gpt2_jax.cli import UserError
from gpt2_jax.metrics import read_jsonl
from gpt2_jax.model import cross_entropy_loss, forward, init_params

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the optimizer


def test_decay_mask_decays_kernels_and_embeddings_but_not_biases_or_layernorm(micro_cfg):
    params = init_params(micro_cfg, jax.random.key(0))
    flat = {"/".join(k.key for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(train.decay_mask(params))}
    decayed = sorted(k for k, v in flat.items() if v)
    kept = sorted(k for k, v in flat.items() if not v)
    assert decayed == sorted(["wte/embedding", "wpe/embedding"] + [
        f"h_{i}/{m}/kernel" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")])
    assert all(k.endswith(("/bias", "/scale")) for k in kept)
    assert len(kept) == 2 * (4 + 4) + 2  # per layer: 4 Dense biases + 2 LayerNorms x (scale, bias); + ln_f


def test_adamw_weight_decay_shrinks_matrices_and_leaves_biases_and_layernorm_untouched(micro_cfg):
    cfg = train.TrainConfig(lr=0.01, warmup_steps=0, weight_decay=0.5, grad_clip=1.0)
    params = init_params(micro_cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 1.0, params)  # LayerNorm biases start at 0: make decay visible
    opt = train.make_optimizer(cfg, num_steps=10)
    # Zero gradients: Adam's step is exactly 0, so whatever changes is weight decay alone.
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        q = new
        for k in path:
            q = q[k.key]
        if path[-1].key in ("kernel", "embedding"):
            np.testing.assert_allclose(q, p * (1 - 0.01 * 0.5), rtol=1e-6)
        else:
            np.testing.assert_array_equal(q, p)


def test_schedule_warms_up_linearly_to_the_peak_then_cosine_decays_to_the_final_fraction():
    cfg = train.TrainConfig(lr=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    lr = train.make_schedule(cfg, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(60), (1e-3 + 1e-4) / 2, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose([lr(110), lr(500)], [1e-4, 1e-4], rtol=1e-6)
    decay = np.array([lr(s) for s in range(10, 111)])
    assert np.all(np.diff(decay) < 0)
    with pytest.raises(ValueError, match="warmup_steps=10 must be smaller than the 10 training steps"):
        train.make_schedule(cfg, 10)


def test_total_steps_is_all_epochs_unless_max_steps_comes_first():
    assert train.total_steps(train.TrainConfig(epochs=5), 600) == 3000
    assert train.total_steps(train.TrainConfig(epochs=5, max_steps=200), 600) == 200
    assert train.total_steps(train.TrainConfig(epochs=1, max_steps=9000), 600) == 600


# ---------------------------------------------------------------- the step


def _batch(cfg, B=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, cfg.vocab_size, (B, cfg.n_ctx + 1)).astype(np.int32)
    mask = np.ones((B, cfg.n_ctx), np.float32)
    mask[-1, cfg.n_ctx // 2:] = 0.0  # a padded row, as in the last evaluation batch
    return {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": mask}


def test_train_step_loss_is_the_masked_mean_and_masked_targets_change_nothing(micro_cfg):
    cfg = micro_cfg.replace(dropout=0.0, attn_dropout=0.0)
    tcfg = train.TrainConfig(lr=1e-3, warmup_steps=1)
    opt = train.make_optimizer(tcfg, 10)
    state = train.init_train_state(cfg, opt, jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(cfg, opt, train.make_schedule(tcfg, 10), axis_name=None))
    batch = _batch(cfg)
    new, m = step(state, batch, jax.random.PRNGKey(1))
    want = cross_entropy_loss(forward(state.params, cfg, batch["inputs"]), batch["targets"], batch["mask"])
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
    assert int(new.step) == 1 and float(m["tokens"]) == 4 * 16 - 8 and float(m["lr"]) == 0.0
    other = dict(batch, targets=np.where(batch["mask"] > 0, batch["targets"], 0))
    new2, m2 = step(state, other, jax.random.PRNGKey(1))
    assert float(m2["loss"]) == float(m["loss"])
    chex.assert_trees_all_equal(new2.params, new.params)


def test_pmapped_step_on_one_device_matches_the_plain_step_bitwise(micro_cfg):
    cfg = micro_cfg.replace(dropout=0.0, attn_dropout=0.0)  # the plain step folds in no device index
    tcfg = train.TrainConfig(lr=1e-3, warmup_steps=1)
    opt, schedule = train.make_optimizer(tcfg, 10), train.make_schedule(tcfg, 10)
    state = train.init_train_state(cfg, opt, jax.random.PRNGKey(0))
    plain = jax.jit(train.make_train_step(cfg, opt, schedule, axis_name=None))
    p_step = jax.pmap(train.make_train_step(cfg, opt, schedule), axis_name=train.AXIS, in_axes=(0, 0, None))
    batch, rng = _batch(cfg), jax.random.PRNGKey(1)
    s1, m1 = plain(state, batch, rng)
    s1, m1 = plain(s1, _batch(cfg, seed=1), rng)
    add_axis = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    sN, mN = p_step(add_axis(state), add_axis(batch), rng)
    sN, mN = p_step(sN, add_axis(_batch(cfg, seed=1)), rng)
    assert float(mN["loss"][0]) == float(m1["loss"]) and float(mN["grad_norm"][0]) == float(m1["grad_norm"])
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], sN), s1)


def test_dropout_is_reproducible_and_differs_per_step_and_per_device(micro_cfg):
    rng = jax.random.PRNGKey(7)
    keys = lambda step: jax.vmap(lambda _: train.step_rng(rng, step), axis_name=train.AXIS)(jnp.arange(3))  # noqa: E731
    k3, k4 = np.asarray(keys(3)), np.asarray(keys(4))
    np.testing.assert_array_equal(k3, np.asarray(keys(3)))
    assert len({tuple(k) for k in k3} | {tuple(k) for k in k4}) == 6  # 3 devices x 2 steps, all distinct
    # And the step really draws from it: same step -> same loss, next step -> other dropout masks.
    tcfg = train.TrainConfig(lr=1e-3, warmup_steps=1)
    opt = train.make_optimizer(tcfg, 10)
    state = train.init_train_state(micro_cfg, opt, jax.random.PRNGKey(0))
    step = jax.jit(train.make_train_step(micro_cfg, opt, train.make_schedule(tcfg, 10), axis_name=None))
    batch = _batch(micro_cfg)
    _, a = step(state, batch, rng)
    _, b = step(state, batch, rng)
    _, c = step(state.replace(step=state.step + 1), batch, rng)
    assert float(a["loss"]) == float(b["loss"]) != float(c["loss"])


def test_eval_step_sums_give_the_exact_masked_mean(micro_cfg):
    params = init_params(micro_cfg, jax.random.key(0))
    batch = _batch(micro_cfg)
    out = jax.jit(train.make_eval_step(micro_cfg, axis_name=None))(params, batch)
    want = cross_entropy_loss(forward(params, micro_cfg, batch["inputs"]), batch["targets"], batch["mask"])
    assert float(out["tokens"]) == 56.0
    np.testing.assert_allclose(out["nll_sum"] / out["tokens"], want, rtol=1e-6)
