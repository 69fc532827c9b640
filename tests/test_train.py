"""Training: the optimizer and step are what they claim, and runs survive kills, signals, damage and bad input.

The pure pieces are checked in-process on the micro model. The CLI is run in subprocesses on the
micro model with a 512-token BPE over the real WikiText-2 (tokenizer and streams are cached by
the data module; compiled steps by a JAX compilation cache shared by the session's subprocesses).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
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
from gpt2_jax import budget, core, loop, parallel, pretrained, rundir, train
from gpt2_jax.errors import UserError
from gpt2_jax.metrics import read_jsonl
from gpt2_jax.model import cross_entropy_loss, forward, init_params

from conftest import kill_once_saved

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the optimizer


def test_decay_mask_decays_kernels_and_embeddings_but_not_biases_or_layernorm(micro_cfg):
    params = init_params(micro_cfg, jax.random.key(0))
    flat = {"/".join(k.key for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(core.decay_mask(params))}
    decayed = sorted(k for k, v in flat.items() if v)
    kept = sorted(k for k, v in flat.items() if not v)
    assert decayed == sorted(["wte/embedding", "wpe/embedding"] + [
        f"h_{i}/{m}/kernel" for i in range(2) for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")])
    assert all(k.endswith(("/bias", "/scale")) for k in kept)
    assert len(kept) == 2 * (4 + 4) + 2  # per layer: 4 Dense biases + 2 LayerNorms x (scale, bias); + ln_f


def test_adamw_weight_decay_shrinks_matrices_and_leaves_biases_and_layernorm_untouched(micro_cfg):
    cfg = core.TrainConfig(lr=0.01, warmup_steps=0, weight_decay=0.5, grad_clip=1.0)
    params = init_params(micro_cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p + 1.0, params)  # LayerNorm biases start at 0: make decay visible
    opt = core.make_optimizer(cfg, num_steps=10)
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


def test_clip_by_global_norm_gives_optaxs_updates_and_state_as_one_multiply():
    grads = {"a": jnp.arange(6.0).reshape(2, 3) - 2.5, "b": {"c": jnp.array([0.5, -4.0])}}
    norm = float(optax.global_norm(grads))
    for max_norm in (2 * norm, norm / 3, norm / 1000):
        ours, state = core.clip_by_global_norm(max_norm).update(grads, core.clip_by_global_norm(max_norm).init(grads))
        ref, ref_state = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
        assert state == ref_state == optax.EmptyState()
        if max_norm > norm:  # unclipped: the very same arrays' values
            jax.tree.map(np.testing.assert_array_equal, ours, ref)
        else:
            jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours, ref)
            np.testing.assert_allclose(float(optax.global_norm(ours)), max_norm, rtol=1e-6)
    nan = core.clip_by_global_norm(1.0).update({"a": jnp.array([1.0, jnp.nan])}, optax.EmptyState())[0]
    assert bool(jnp.isnan(nan["a"]).all())  # a non-finite norm is not hidden
    zero = core.clip_by_global_norm(1.0).update({"a": jnp.zeros(3)}, optax.EmptyState())[0]
    np.testing.assert_array_equal(zero["a"], jnp.zeros(3))
    # The optimizer state keeps the tree optax's clip gave it: older checkpoints restore as before.
    params = {"w": {"kernel": jnp.ones((2, 2))}}
    cfg = core.TrainConfig(grad_clip=1.0)
    chain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(core.make_schedule(cfg, 10), mask=core.decay_mask))
    ours = core.make_optimizer(cfg, 10)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(chain.init(params))


def test_schedule_warms_up_linearly_to_the_peak_then_cosine_decays_to_the_final_fraction():
    cfg = core.TrainConfig(lr=1e-3, warmup_steps=10, final_lr_fraction=0.1)
    lr = core.make_schedule(cfg, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(60), (1e-3 + 1e-4) / 2, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose([lr(110), lr(500)], [1e-4, 1e-4], rtol=1e-6)
    decay = np.array([lr(s) for s in range(10, 111)])
    assert np.all(np.diff(decay) < 0)
    with pytest.raises(ValueError, match="warmup_steps=10 must be smaller than the 10 training steps"):
        core.make_schedule(cfg, 10)


def test_wsd_schedule_warms_up_holds_the_peak_then_decays_linearly_to_the_final_fraction():
    cfg = core.TrainConfig(lr=1e-3, warmup_steps=10, final_lr_fraction=0.1, schedule="wsd", decay_fraction=0.2)
    lr = core.make_schedule(cfg, 100)  # the decay: the last 20 steps, 80 -> 100
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)  # warmup end: the peak
    np.testing.assert_allclose([lr(s) for s in (11, 50, 80)], [1e-3] * 3, rtol=1e-6)  # stable
    np.testing.assert_allclose([lr(90), lr(99)], [(1e-3 + 1e-4) / 2, 1e-4 + 9e-4 / 20], rtol=1e-5)  # linear
    np.testing.assert_allclose([lr(100), lr(500)], [1e-4, 1e-4], rtol=1e-6)  # the last step's end value
    cosine = core.make_schedule(dataclasses.replace(cfg, schedule="cosine"), 100)
    assert [float(lr(s)) for s in range(11)] == [float(cosine(s)) for s in range(11)]  # one warmup for both
    # A decay longer than the steps after the warmup starts where the warmup ends.
    whole = core.make_schedule(dataclasses.replace(cfg, decay_fraction=1.0), 100)
    np.testing.assert_allclose([whole(10), whole(55), whole(100)], [1e-3, (1e-3 + 1e-4) / 2, 1e-4], rtol=1e-5)


def test_train_config_refuses_an_unknown_schedule_a_decay_outside_0_1_and_a_budget_of_no_time():
    for bad, match in [({"schedule": "linear"}, "schedule must be one of cosine, wsd"),
                       ({"decay_fraction": 0.0}, r"decay_fraction must be in \(0, 1\]"),
                       ({"time_budget_minutes": 0.0}, "time_budget_minutes must be > 0")]:
        with pytest.raises(ValueError, match=match):
            core.TrainConfig(**bad)


def test_total_steps_is_all_epochs_unless_max_steps_comes_first():
    assert core.total_steps(core.TrainConfig(epochs=5), 600) == 3000
    assert core.total_steps(core.TrainConfig(epochs=5, max_steps=200), 600) == 200
    assert core.total_steps(core.TrainConfig(epochs=1, max_steps=9000), 600) == 600


# ---------------------------------------------------------------- the step


def _batch(cfg, B=4, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.integers(0, cfg.vocab_size, (B, cfg.n_ctx + 1)).astype(np.int32)
    mask = np.ones((B, cfg.n_ctx), np.float32)
    mask[-1, cfg.n_ctx // 2:] = 0.0  # a padded row, as in the last evaluation batch
    return {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": mask}


def test_train_step_loss_is_the_masked_mean_and_masked_targets_change_nothing(micro_cfg):
    cfg = micro_cfg.replace(dropout=0.0, attn_dropout=0.0)
    tcfg = core.TrainConfig(lr=1e-3, warmup_steps=1)
    opt = core.make_optimizer(tcfg, 10)
    state = core.init_train_state(cfg, opt, jax.random.PRNGKey(0))
    step = jax.jit(core.make_train_step(cfg, opt, core.make_schedule(tcfg, 10), axis_name=None))
    batch = _batch(cfg)
    new, m = step(state, batch, jax.random.PRNGKey(1))
    want = cross_entropy_loss(forward(state.params, cfg, batch["inputs"]), batch["targets"], batch["mask"])
    np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
    assert int(new.step) == 1 and float(m["tokens"]) == 4 * 16 - 8 and float(m["lr"]) == 0.0
    other = dict(batch, targets=np.where(batch["mask"] > 0, batch["targets"], 0))
    new2, m2 = step(state, other, jax.random.PRNGKey(1))
    assert float(m2["loss"]) == float(m["loss"])
    chex.assert_trees_all_equal(new2.params, new.params)


def _copied_inputs(compiled_text: str) -> tuple[int, int]:
    """(entry parameters the compiled program copies, entry parameters) of an optimized HLO module's text."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    names = set(re.findall(r"%(\S+) = \S+ parameter\(", entry))
    return sum(m.group(1) in names for m in re.finditer(r"= \S+ copy\(%([^)]+)\)", entry)), len(names)


def test_the_pmapped_step_updates_its_donated_state_in_place_without_copying_it(micro_cfg):
    # With the state along a device axis (flax.jax_utils.replicate, in_axes=0) XLA copied 141 of tiny's
    # 163 inputs before writing over them (1.3 GB a step for small); without the axis, what is left is
    # a few scalars. The number can only be read from the compiled program: XLA's own account.
    cfg = micro_cfg.replace(dtype="bfloat16")
    tcfg = core.TrainConfig(batch_size=4, warmup_steps=1)
    state = parallel.replicate(core.init_train_state(cfg, core.make_optimizer(tcfg, 10), jax.random.PRNGKey(0)))
    batch = jax.tree.map(lambda x: x[None], _batch(cfg))
    text = loop._pmapped_step(cfg, tcfg, 10).lower(state, batch, jax.random.PRNGKey(1)).compile().as_text()
    copied, inputs = _copied_inputs(text)
    assert inputs > len(jax.tree.leaves(state)) and copied <= 4, (copied, inputs)
    old = jax.pmap(core.make_train_step(cfg, core.make_optimizer(tcfg, 10), core.make_schedule(tcfg, 10)),
                   axis_name=core.AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
    state_N = jax.tree.map(lambda x: x[None], jax.device_get(state))
    old_copied, _ = _copied_inputs(old.lower(state_N, batch, jax.random.PRNGKey(1)).compile().as_text())
    assert old_copied > len(jax.tree.leaves(state)) // 2, old_copied  # what the test guards against


@pytest.mark.slow
def test_pmapped_step_on_one_device_matches_the_plain_step_bitwise(micro_cfg):
    cfg = micro_cfg  # dropout on: the one device holds global rows 0..B-1, the plain step's rows
    tcfg = core.TrainConfig(lr=1e-3, warmup_steps=1)
    opt, schedule = core.make_optimizer(tcfg, 10), core.make_schedule(tcfg, 10)
    state = core.init_train_state(cfg, opt, jax.random.PRNGKey(0))
    plain = jax.jit(core.make_train_step(cfg, opt, schedule, axis_name=None))
    p_step = jax.pmap(core.make_train_step(cfg, opt, schedule), axis_name=core.AXIS, in_axes=(None, 0, None),
                      out_axes=(None, 0), donate_argnums=(0,))  # as loop._pmapped_step
    batch, rng = _batch(cfg), jax.random.PRNGKey(1)
    s1, m1 = plain(state, batch, rng)
    s1, m1 = plain(s1, _batch(cfg, seed=1), rng)
    add_axis = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    sp, mN = p_step(parallel.replicate(state), add_axis(batch), rng)
    sp, mN = p_step(sp, add_axis(_batch(cfg, seed=1)), rng)
    assert float(mN["loss"][0]) == float(m1["loss"]) and float(mN["grad_norm"][0]) == float(m1["grad_norm"])
    chex.assert_trees_all_equal(sp, s1)  # no device axis: the state as the plain step holds it


@pytest.mark.slow
def test_dropout_is_reproducible_and_differs_per_step_and_per_row_not_per_device_split(micro_cfg):
    rng = jax.random.PRNGKey(7)
    k3, k4 = np.asarray(core.example_keys(rng, 3, 0, 6)), np.asarray(core.example_keys(rng, 4, 0, 6))
    np.testing.assert_array_equal(k3, np.asarray(core.example_keys(rng, 3, 0, 6)))
    assert len({tuple(k) for k in k3} | {tuple(k) for k in k4}) == 12  # 6 rows x 2 steps, all distinct
    # A device holding global rows 2..5 draws exactly those rows' keys.
    np.testing.assert_array_equal(np.asarray(core.example_keys(rng, 3, 2, 4)), k3[2:])
    # And the step really draws from it: same step -> same loss, next step -> other dropout masks.
    tcfg = core.TrainConfig(lr=1e-3, warmup_steps=1)
    opt = core.make_optimizer(tcfg, 10)
    state = core.init_train_state(micro_cfg, opt, jax.random.PRNGKey(0))
    step = jax.jit(core.make_train_step(micro_cfg, opt, core.make_schedule(tcfg, 10), axis_name=None))
    batch = _batch(micro_cfg)
    _, a = step(state, batch, rng)
    _, b = step(state, batch, rng)
    _, c = step(state.replace(step=state.step + 1), batch, rng)
    assert float(a["loss"]) == float(b["loss"]) != float(c["loss"])


def test_eval_step_sums_give_the_exact_masked_mean(micro_cfg):
    params = init_params(micro_cfg, jax.random.key(0))
    batch = _batch(micro_cfg)
    out = jax.jit(core.make_eval_step(micro_cfg, axis_name=None))(params, batch)
    want = cross_entropy_loss(forward(params, micro_cfg, batch["inputs"]), batch["targets"], batch["mask"])
    assert float(out["tokens"]) == 56.0
    np.testing.assert_allclose(out["nll_sum"] / out["tokens"], want, rtol=1e-6)


def test_resume_drops_records_past_the_checkpoint_and_a_line_torn_by_a_crash(tmp_path):
    from gpt2_jax.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    assert drop_records_after(path, 3) == 2
    assert read_jsonl(path) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    assert path.read_text().endswith("}\n")  # the torn line is gone too: appends start on a fresh line


# ---------------------------------------------------------------- the CLI, in subprocesses

MICRO = ["--vocab_size=512", "--n_ctx=16", "--n_layer=2", "--d_model=32", "--n_head=4", "--d_ff=64",
         "--batch_size=8", "--eval_batch_size=1024", "--warmup_steps=5", "--lr=3e-3", "--quiet"]


def _cmd(run_dir, *flags):
    return [sys.executable, "-m", "gpt2_jax.train", f"--run_dir={run_dir}", *MICRO, *flags]


def _env(cli_env, devices):
    return dict(cli_env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _train(cli_env, run_dir, *flags, devices=1, expect_rc=0):
    p = subprocess.run(_cmd(run_dir, *flags), env=_env(cli_env, devices), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == expect_rc, p.stderr[-3000:]
    return p


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(pathlib.Path(run_dir) / rundir.METRICS_FILE)]


def _steps(run_dir):
    return ckpt.complete_steps(pathlib.Path(run_dir) / rundir.CHECKPOINT_DIR)


RESUME_FLAGS = ("--max_steps=150", "--ckpt_every=10", "--eval_every=50")


@pytest.fixture(scope="module")
def finished_run(cli_env, tmp_path_factory):
    """An uninterrupted micro run of 150 steps (checkpoints every 10, evaluations every 50)."""
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    p = _train(cli_env, run_dir, *RESUME_FLAGS)
    assert p.stderr.startswith("done: 150 steps") and p.stderr.count("\n") == 1, p.stderr
    return run_dir


@pytest.mark.slow
def test_uninterrupted_run_writes_every_step_evaluations_plot_and_keeps_newest_plus_best(finished_run):
    assert [s for s, _ in _losses(finished_run)] == list(range(1, 151))
    evals = read_jsonl(finished_run / rundir.EVALS_FILE)
    assert [(r["split"], r["step"]) for r in evals] == [("validation", 50), ("validation", 100),
                                                      ("validation", 150), ("test", 150)]
    val = [r["loss"] for r in evals if r["split"] == "validation"]
    assert val[0] > val[1] > val[2] and val[2] < math.log(512) - 0.5  # it learns
    best = 50 + 50 * int(np.argmin(val))
    assert _steps(finished_run) == sorted({130, 140, 150, best})  # --keep=3 newest + best
    assert (finished_run / rundir.PLOT_FILE).stat().st_size > 10_000
    assert pretrained.load_run(finished_run, "best").step == best


@pytest.mark.slow
def test_run_killed_with_sigkill_and_rerun_ends_bitwise_identical_to_the_uninterrupted_run(
        cli_env, finished_run, tmp_path):
    run_dir = tmp_path / "killed"
    kill_once_saved(_cmd(run_dir, *RESUME_FLAGS), _env(cli_env, 1), run_dir, 30)
    killed_at = max(s for s, _ in _losses(run_dir))
    assert killed_at < 150, "killed too late to test anything"
    _train(cli_env, run_dir, *RESUME_FLAGS)
    assert _losses(run_dir) == _losses(finished_run)  # every step once, bitwise equal losses
    a, b = pretrained.load_run(finished_run, 150), pretrained.load_run(run_dir, 150)
    chex.assert_trees_all_equal(jax.device_get(a.params), jax.device_get(b.params))
    assert read_jsonl(run_dir / rundir.EVALS_FILE) == read_jsonl(finished_run / rundir.EVALS_FILE)


@pytest.mark.slow
def test_unreadable_latest_checkpoint_is_reported_once_set_aside_and_the_run_redone_from_the_previous(
        cli_env, finished_run, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    for f in (run_dir / rundir.CHECKPOINT_DIR / "150" / "params" / "d").iterdir():
        os.truncate(f, os.path.getsize(f) // 2)
    p = _train(cli_env, run_dir, *RESUME_FLAGS)
    lines = p.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("done: 150 steps"), p.stderr  # one warning, nothing else
    assert lines[0].startswith("warning: checkpoint ") and "checkpoints/150 is unreadable" in lines[0], p.stderr
    assert [d.name.split("-")[0] for d in (run_dir / rundir.CORRUPT_DIR).iterdir()] == ["150"]  # kept, not deleted
    assert _losses(run_dir) == _losses(finished_run)
    chex.assert_trees_all_equal(jax.device_get(pretrained.load_run(run_dir).params),
                                jax.device_get(pretrained.load_run(finished_run).params))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_saves_a_checkpoint_at_the_current_step_and_exits_cleanly(cli_env, tmp_path, sig):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen(_cmd(run_dir, "--max_steps=100000", "--ckpt_every=100000", "--eval_every=100000"),
                            env=_env(cli_env, 1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not (run_dir / rundir.METRICS_FILE).exists() or not _losses(run_dir):  # training is under way
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    last = max(s for s, _ in _losses(run_dir))
    assert err.strip().splitlines() == [f"stopped by {sig.name} at step {last}: checkpoint saved in {run_dir}; "
                                        f"run the same command to resume"], err
    assert _steps(run_dir) == [last]  # the only save: --ckpt_every was never reached
    assert pretrained.load_run(run_dir).step == last


# A model whose step takes ~0.1-0.3 s on 2 CPU cores (the micro model's takes milliseconds).
SLOW_STEP = ("--n_ctx=128", "--n_layer=4", "--d_model=256", "--n_head=4", "--d_ff=1024", "--batch_size=16")


@pytest.mark.slow
def test_sigterm_is_acted_on_after_the_step_in_flight_not_after_a_queue_of_log_every_steps(cli_env, tmp_path):
    run_dir = tmp_path / "term"
    # Metrics are fetched every 1000 steps, and nothing else waits for the devices: a host that
    # dispatched ahead would have a queue of up to 1000 steps (minutes) to finish before saving.
    proc = subprocess.Popen(_cmd(run_dir, *SLOW_STEP, "--max_steps=100000", "--ckpt_every=100000",
                                 "--eval_every=100000", "--ckpt_minutes=0", "--log_every=1000", "--noquiet"),
                            env=_env(cli_env, 1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    err, deadline = b"", time.time() + 240
    while b"/step" not in err:  # tqdm's rate: steps are being done
        assert proc.poll() is None and time.time() < deadline, err.decode()[-2000:]
        err += proc.stderr.read() or b""
        time.sleep(0.05)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    proc.wait(timeout=240)
    waited = time.monotonic() - sent
    os.set_blocking(proc.stderr.fileno(), True)
    err = (err + proc.stderr.read()).decode()
    assert proc.returncode == 0, err[-2000:]
    last = max(s for s, _ in _losses(run_dir))
    assert f"stopped by SIGTERM at step {last}: checkpoint saved" in err and pretrained.load_run(run_dir).step == last
    seconds_per_step = 16 * 128 / np.median([r["tokens_per_s"] for r in read_jsonl(run_dir / rundir.METRICS_FILE)])
    # At most the step in flight and the one queued behind it, then the save and the exit.
    assert waited < 10 + 3 * seconds_per_step, (waited, seconds_per_step, last)


@pytest.mark.slow
def test_a_short_first_run_gets_a_warmup_that_fits_and_its_bar_shows_the_steps_it_will_do(cli_env, tmp_path):
    run_dir = tmp_path / "smoke"
    flags = [f for f in _cmd(run_dir, "--max_steps=20", "--noquiet") if not f.startswith("--warmup_steps")]
    p = subprocess.run(flags, env=_env(cli_env, 1), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((run_dir / rundir.RUN_FILE).read_text())
    assert record["warmup_steps"] == 2 and record["train"]["warmup_steps"] is None  # a tenth of 20 steps
    lrs = [r["lr"] for r in read_jsonl(run_dir / rundir.METRICS_FILE)]
    np.testing.assert_allclose(lrs[:3], [0.0, 1.5e-3, 3e-3], rtol=1e-6)  # 2 warmup steps to --lr=3e-3
    # 20 steps of a ~4,400-step epoch: one epoch, 20 steps, not "epoch 1/5 ... /4400".
    assert "epoch 1/1" in p.stderr and "/20 " in p.stderr and "epoch 1/5" not in p.stderr, p.stderr[-2000:]
    # An explicit warmup that does not fit is still refused.
    p = _train(cli_env, tmp_path / "long_warmup", "--max_steps=20", "--warmup_steps=20", expect_rc=2)
    assert p.stderr == ("error: --warmup_steps=20 must be smaller than the 20 training steps; lower it or raise "
                        "--max_steps/--epochs\n")


_EVAL_ON_TWO_DEVICES = """
import jax, numpy as np
from gpt2_jax import core, parallel
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
cfg = GPT2Config.preset("tiny")
assert jax.local_device_count() == 2
params = init_params(cfg, jax.random.PRNGKey(0))
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (120, 2, 1, 129)).astype(np.int32)
batches = ({"inputs": t[..., :-1], "targets": t[..., 1:], "mask": np.ones((2, 1, 128), np.float32)} for t in tokens)
nll, n = parallel.evaluate(jax.pmap(core.make_eval_step(cfg), axis_name=core.AXIS, in_axes=(None, 0)),
                          parallel.replicate(params), batches)
one = jax.jit(core.make_eval_step(cfg, axis_name=None))  # the same rows on one device
want = sum(float(one(params, {"inputs": t[..., :-1].reshape(2, 128), "targets": t[..., 1:].reshape(2, 128),
                              "mask": np.ones((2, 128), np.float32)})["nll_sum"]) for t in tokens)
print(n, nll, want)
"""


@pytest.mark.slow
def test_evaluation_on_two_cpu_devices_at_tiny_size_does_not_deadlock(cli_env):
    # Before, 100+ evaluation batches of the tiny preset dispatched ahead on 2 CPU devices aborted the
    # process after XLA's 40 s rendezvous timeout (measured on this 2-core machine, 2 of 2 tries).
    p = subprocess.run([sys.executable, "-c", _EVAL_ON_TWO_DEVICES], env=_env(cli_env, 2), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    n, nll, want = (float(x) for x in p.stdout.split())
    assert n == 120 * 2 * 128
    assert abs(nll / n - math.log(32000)) < 0.5  # a freshly initialised model is near uniform
    np.testing.assert_allclose(nll, want, rtol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_with_exit_2_one_line_and_keeps_the_last_good_checkpoint(cli_env, tmp_path):
    run_dir = tmp_path / "nan"
    # lr 0 at step 0 (warmup), then 1e30: the parameters overflow at step 2.
    p = _train(cli_env, run_dir, "--lr=1e30", "--warmup_steps=1", "--ckpt_every=1", "--max_steps=50",
               expect_rc=2)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: training diverged at step 2 ") and "step 1, is kept" in p.stderr, p.stderr
    assert _steps(run_dir) == [1]
    run = pretrained.load_run(run_dir)
    assert run.step == 1 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.params))


@pytest.mark.slow
def test_two_and_four_devices_match_one_device_and_a_two_device_run_resumes_on_one(cli_env, tmp_path):
    # Dropout on (the micro model's 0.1): each row's masks follow its global row index, not its device.
    # float32: the tolerances below are float32 summation order (bf16 rounds each device's partial sums)
    flags = ("--max_steps=6", "--ckpt_every=3", "--eval_every=1000", "--warmup_steps=2", "--dtype=float32")
    runs = {}
    for n in (1, 2, 4):
        runs[n] = tmp_path / f"dev{n}"
        _train(cli_env, runs[n], *flags, devices=n)
    ref_losses = np.array([loss for _, loss in _losses(runs[1])])
    ref = jax.device_get(pretrained.load_run(runs[1], 6).params)
    # Each device sums its rows and the sums are all-reduced, so only the float summation order
    # differs from one device. Measured on this CPU (without dropout, before dropout keys followed
    # the row): losses within 2.4e-7 relative, parameters after 6 Adam steps within 1.7e-6 absolute
    # (one update is ~lr = 3e-3); tolerances ~10x that. Dropout keys that follow the device instead
    # moved these losses by 8e-5 to 1e-3 relative.
    for n in (2, 4):
        np.testing.assert_allclose([loss for _, loss in _losses(runs[n])], ref_losses, rtol=2e-6)
        chex.assert_trees_all_close(jax.device_get(pretrained.load_run(runs[n], 6).params), ref, atol=2e-5, rtol=0)
        assert json.loads((runs[n] / rundir.RUN_FILE).read_text())["model"] == json.loads(
            (runs[1] / rundir.RUN_FILE).read_text())["model"]
    # Saved on 2 devices at step 3, resumed on 1: checkpoints hold no device axis.
    shutil.rmtree(runs[2] / rundir.CHECKPOINT_DIR / "6")
    _train(cli_env, runs[2], *flags, devices=1)
    np.testing.assert_allclose([loss for _, loss in _losses(runs[2])], ref_losses, rtol=2e-6)
    chex.assert_trees_all_close(jax.device_get(pretrained.load_run(runs[2], 6).params), ref, atol=2e-5, rtol=0)


@pytest.mark.slow
def test_batch_not_divisible_by_the_devices_is_exit_2_with_one_line_and_no_traceback(cli_env, tmp_path):
    p = _train(cli_env, tmp_path / "r", "--batch_size=9", devices=2, expect_rc=2)
    assert p.stderr == ("error: --batch_size=9 is not divisible by the 2 local devices; use a multiple of 2\n")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- bad input, in-process


def _main(*flags):
    return train.main(["gpt2_jax.train", *MICRO, *flags])


def test_unknown_size_is_a_user_error_naming_the_choices(tmp_path):
    with pytest.raises(UserError, match="size.*tiny") as e:
        _main("--size=huge", f"--run_dir={tmp_path}")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_run_json_written_before_later_config_fields_existed_still_resumes(finished_run, tmp_path):
    run_dir = tmp_path / "older"
    shutil.copytree(finished_run, run_dir)
    record = json.loads((run_dir / rundir.RUN_FILE).read_text())
    del record["model"]["int8_activations"]  # fields added later: absent means their default
    for key in ("time_budget_minutes", "schedule", "decay_fraction"):
        del record["train"][key]
    (run_dir / rundir.RUN_FILE).write_text(json.dumps(record))
    assert _main(f"--run_dir={run_dir}", *RESUME_FLAGS) == 0
    with pytest.raises(UserError, match=r"different config: train.lr"):  # a real difference still counts
        _main(f"--run_dir={run_dir}", *RESUME_FLAGS, "--lr=1e-3")


@pytest.mark.slow
def test_a_run_dir_of_another_config_is_refused_and_left_untouched(finished_run):
    def files():  # the lock file says who holds the run dir: the refused run held it for a moment
        return {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE}

    before = files()
    with pytest.raises(UserError, match=r"belongs to a different config: train.lr: 0.003 in the run dir, 0.001 now"):
        _main(f"--run_dir={finished_run}", *RESUME_FLAGS, "--lr=1e-3")
    assert files() == before


def test_missing_data_and_too_long_warmup_are_user_errors(tmp_path, wikitext_dir, monkeypatch):
    monkeypatch.delenv("GPT2_JAX_DATA_DIR", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="wiki.train.tokens"):
        _main(f"--run_dir={tmp_path / 'a'}", f"--data_dir={empty}", f"--cache_dir={tmp_path / 'cache'}")
    with pytest.raises(UserError, match="--warmup_steps=5 must be smaller than the 3 training steps"):
        _main(f"--run_dir={tmp_path / 'b'}", f"--data_dir={wikitext_dir}", "--max_steps=3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_damaged_run_json_stops_a_resume_with_one_line_and_touches_nothing(finished_run, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    (run_dir / rundir.RUN_FILE).write_bytes(b'{"model": "tiny", "train": null}')
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE}
    with pytest.raises(UserError, match=r"run.json is not a run record"):
        _main(f"--run_dir={run_dir}", *RESUME_FLAGS)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE} == before


# ---------------------------------------------------------------- a time budget, in subprocesses

# A 12-second budget on a clock where every step, evaluation and host copy takes 0.1 s (the test hook):
# the step count it fixes is the same in every run, and far below --max_steps.
BUDGET_FLAGS = ("--time_budget_minutes=0.2", "--max_steps=1000", "--ckpt_every=10", "--eval_every=50", "--schedule=wsd")
FAKE_CLOCK = {loop.FAKE_STEP_SECONDS_ENV: "0.1"}


@pytest.fixture(scope="module")
def budgeted_run(cli_env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "budgeted"
    p = _train(dict(cli_env, **FAKE_CLOCK), run_dir, *BUDGET_FLAGS)
    assert p.stderr.startswith("done: ") and p.stderr.count("\n") == 1, p.stderr
    return run_dir


def _step_metrics(run_dir):  # all but the throughput, which is timing
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(run_dir / rundir.METRICS_FILE)]


def _run_json(run_dir):
    return json.loads((pathlib.Path(run_dir) / rundir.RUN_FILE).read_text())


def test_a_time_budget_fixes_the_step_count_once_in_the_warmup_and_the_schedule_ends_at_it(budgeted_run):
    record = _run_json(budgeted_run)
    fixed = record["time_budget"]
    n = record["total_steps"]
    # Timed during the 5 warmup steps (the first 20 steps would be timed, but the warmup ends first).
    assert fixed["fixed_at_step"] == 5 and fixed["steps"] == n and fixed["upper_bound_steps"] == 1000
    assert [fixed[f"{k}_seconds"] for k in ("step", "evaluation", "save")] == pytest.approx([0.1] * 3)
    timings = budget.Timings(**{k: fixed[f"{k}_seconds"] for k in
                                ("elapsed", "step", "compile", "evaluation", "save", "final")})
    assert n == budget.steps_in_budget(12.0, timings, done=5, upper=1000, eval_every=50, ckpt_every=10,
                                       steps_per_epoch=record["steps_per_epoch"], ckpt_minutes=10.0)
    assert 50 < n < 1000  # the budget, not --max_steps, ends the run
    steps = read_jsonl(budgeted_run / rundir.METRICS_FILE)
    assert [r["step"] for r in steps] == list(range(1, n + 1))
    # Every step's learning rate is the wsd schedule of n steps, which ends at lr * final_lr_fraction.
    lr = core.make_schedule(core.TrainConfig(**{**record["train"], "warmup_steps": 5}), n)
    np.testing.assert_allclose([r["lr"] for r in steps], [lr(s) for s in range(n)], rtol=1e-6)
    assert float(lr(n)) == pytest.approx(3e-3 * 0.1, rel=1e-6)
    assert steps[-1]["lr"] < 3e-3 * 0.2 and max(r["lr"] for r in steps) == pytest.approx(3e-3)
    # The fix step evaluates and saves; nothing is evaluated or saved before it.
    evals = [(r["split"], r["step"]) for r in read_jsonl(budgeted_run / rundir.EVALS_FILE)]
    assert evals == [("validation", s) for s in (5, *range(50, n, 50), n)] + [("test", n)]
    assert min(_steps(budgeted_run)) >= 5 and max(_steps(budgeted_run)) == n


def test_a_budgeted_run_killed_after_its_step_count_is_fixed_resumes_to_the_same_step_bitwise(
        cli_env, budgeted_run, tmp_path):
    run_dir = tmp_path / "killed"
    kill_once_saved(_cmd(run_dir, *BUDGET_FLAGS), _env(dict(cli_env, **FAKE_CLOCK), 1), run_dir, 30)
    n = _run_json(budgeted_run)["total_steps"]
    assert max(s for s, _ in _losses(run_dir)) < n, "killed too late to test anything"
    # Resumed on the real clock: it must take the step count from run.json, not time the steps again.
    _train(cli_env, run_dir, *BUDGET_FLAGS)
    # And a run dir whose run.json has the fixed count but no checkpoint (killed before its first save)
    # starts again from step 0 on that schedule: the warmup steps it times are the same either way.
    fresh = tmp_path / "run_json_only"
    fresh.mkdir()
    for name in (rundir.RUN_FILE, rundir.TOKENIZER_FILE):
        shutil.copy(budgeted_run / name, fresh / name)
    _train(cli_env, fresh, *BUDGET_FLAGS)
    want = pretrained.load_run(budgeted_run, n)
    for other in (run_dir, fresh):
        assert _run_json(other)["time_budget"] == _run_json(budgeted_run)["time_budget"]
        assert _step_metrics(other) == _step_metrics(budgeted_run)  # every step once, bit-equal
        assert read_jsonl(other / rundir.EVALS_FILE) == read_jsonl(budgeted_run / rundir.EVALS_FILE)
        got = pretrained.load_run(other, n)
        chex.assert_trees_all_equal(jax.device_get(got.params), jax.device_get(want.params))


def test_a_budget_too_small_for_the_warmup_is_one_line_exit_2_and_nothing_is_saved(cli_env, tmp_path):
    run_dir = tmp_path / "tiny_budget"
    p = _train(cli_env, run_dir, "--time_budget_minutes=0.001", "--max_steps=1000", expect_rc=2)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    # The first step (compiling) takes longer than the 0.06 s budget.
    assert p.stderr.startswith("error: --time_budget_minutes=0.001 ends the run at step 1 (") and p.stderr.endswith(
        "within the 5 warmup steps; raise it (in a new --run_dir) or lower --warmup_steps\n"), p.stderr
    assert not (run_dir / rundir.CHECKPOINT_DIR).exists() or _steps(run_dir) == []
    assert "time_budget" not in _run_json(run_dir)


def test_a_budget_needs_a_warmup_to_time_its_first_steps_in_and_decay_fraction_needs_wsd(tmp_path):
    with pytest.raises(UserError, match=r"^--time_budget_minutes times the first steps inside the warmup .* "
                                        r"needs --warmup_steps >= 2; the warmup is 1$"):
        _main(f"--run_dir={tmp_path}", "--time_budget_minutes=30", "--warmup_steps=1")
    with pytest.raises(UserError, match=r"^--decay_fraction is the length of --schedule=wsd's final decay"):
        _main(f"--run_dir={tmp_path}", "--decay_fraction=0.3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_before_a_budget_fixes_its_step_count_saves_nothing_and_says_so(cli_env, tmp_path):
    run_dir = tmp_path / "term_early"
    # Slow steps and a long warmup: the first 20 steps after the compiling one are timed (seconds).
    proc = subprocess.Popen(_cmd(run_dir, *SLOW_STEP, "--time_budget_minutes=30", "--warmup_steps=50",
                                 "--max_steps=100000", "--noquiet"),
                            env=_env(cli_env, 1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    err, deadline = b"", time.time() + 240
    while b"epoch 1/" not in err:  # the bar is up: the first step is compiling
        assert proc.poll() is None and time.time() < deadline, err.decode()[-2000:]
        err += proc.stderr.read() or b""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=240)
    os.set_blocking(proc.stderr.fileno(), True)
    err = (err + proc.stderr.read()).decode()
    assert proc.returncode == 0, err[-2000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+), before a time-budgeted run saves \(from the step where "
                        r"its step count is fixed\): nothing saved in (\S+); run the same command to start again$",
                        err.rstrip())
    assert stopped and int(stopped[1]) < 21 and stopped[2] == str(run_dir), err[-2000:]
    assert _steps(run_dir) == [] and "time_budget" not in _run_json(run_dir)
    assert not (run_dir / rundir.EVALS_FILE).exists()


def test_a_recipe_sets_the_flags_not_given_and_is_recorded_in_run_json(tmp_path, monkeypatch):
    seen = {}

    def fake_open_run(fv, cfg, train_cfg, record, *args):
        seen.update(cfg=cfg, train_cfg=train_cfg, record=record)
        raise UserError("stop here")

    monkeypatch.setattr(train, "_open_run", fake_open_run)
    recipe = train.RECIPES["cpu30"]
    with pytest.raises(UserError, match="stop here"):
        train.main(["gpt2_jax.train", f"--run_dir={tmp_path / 'r'}", "--recipe=cpu30", "--seed=7"])
    tc, cfg = seen["train_cfg"], seen["cfg"]
    assert tc.time_budget_minutes == recipe["time_budget_minutes"] and tc.seed == 7
    for flag, value in recipe.items():
        where = {f.name: tc for f in dataclasses.fields(tc)} | {f.name: cfg for f in dataclasses.fields(cfg)}
        if flag in where:
            assert getattr(where[flag], flag) == value, flag
    assert seen["record"]["recipe"] == {"name": "cpu30", "values": recipe, "overridden": []}
    # A flag given wins over the recipe, and the record says which.
    with pytest.raises(UserError, match="stop here"):
        train.main(["gpt2_jax.train", f"--run_dir={tmp_path / 'r'}", "--recipe=cpu30", "--time_budget_minutes=5"])
    assert seen["train_cfg"].time_budget_minutes == 5.0
    assert seen["record"]["recipe"]["overridden"] == ["time_budget_minutes"]


def test_the_cpu30_recipe_is_what_experiments_cpu_recipe_chose():
    # The study refuses to train its final runs unless RECIPES["cpu30"] is its choice; this keeps the
    # two together afterwards (a recipe edited by hand must come with the study run again).
    results = json.loads((REPO / "experiments" / "results" / "cpu_recipe" / "metrics.json").read_text())
    assert train.RECIPES["cpu30"] == results["recipe_flags"]
    finals = [r for name, r in results["runs"].items() if name.startswith("final")]
    assert finals and all(r["flags"]["recipe"] == "cpu30" for r in finals)


@pytest.mark.slow
def test_bfloat16_training_tracks_float32_on_wikitext2(cli_env, tmp_path):
    # 300 steps of a 2-layer model on WikiText-2 (BPE 512, context 64, no dropout: the dtype is the only
    # difference). Measured on the 2-core Intel Xeon with AMX: validation loss 3.9815 (float32) against
    # 3.9821 (bfloat16); the stated tolerance is 0.01 nats, 15x that gap.
    flags = ["--n_ctx=64", "--d_model=64", "--d_ff=256", "--batch_size=16", "--warmup_steps=20",  # MICRO's, widened
             "--dropout=0", "--max_steps=300", "--eval_every=100"]
    val = {}
    for dtype in ("float32", "bfloat16"):
        run_dir = tmp_path / dtype
        _train(cli_env, run_dir, *flags, f"--dtype={dtype}")
        assert rundir.read_run_json(run_dir)["model"]["dtype"] == dtype
        val[dtype] = [r["loss"] for r in read_jsonl(run_dir / rundir.EVALS_FILE) if r["split"] == "validation"]
    assert val["float32"][-1] < math.log(512) - 2.0  # both really learn (6.24 at the start)
    assert abs(val["bfloat16"][-1] - val["float32"][-1]) < 0.01, val
    assert val["bfloat16"] != val["float32"]  # and bf16 really ran in lower precision
