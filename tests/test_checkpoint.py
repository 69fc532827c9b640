"""Run directories: params survive a save/load bitwise, steps are chosen as asked, damage is survived."""

import asyncio
import gc
import glob
import json
import logging
import os
import pathlib
import shutil
import traceback

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import pretrained, rundir
from gpt2_jax import checkpoint as ckpt
from gpt2_jax.errors import UserError
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import train_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tok(wikitext_dir):
    lines = (wikitext_dir / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()[:400]
    return train_tokenizer(lines, vocab_size=300)


@pytest.fixture
def cfg(micro_cfg):
    return micro_cfg.replace(vocab_size=300)


def _shifted(params, k: float):
    return jax.tree.map(lambda p: p + k, params)


def _write_run(run_dir, cfg, tok, steps_and_losses, keep=10):
    """A run whose checkpoint at step s holds init params + s, saved with the given validation losses."""
    params = init_params(cfg, jax.random.key(0))
    pretrained.save_params_as_run(run_dir, cfg, params, tok, step=0)
    checkpoints = ckpt.Checkpoints(run_dir, keep=keep)
    for step, val_loss in steps_and_losses:
        checkpoints.save(step, params=_shifted(params, step), opt_state=None, meta={"step": step}, val_loss=val_loss)
    checkpoints.close()
    return params


def test_save_params_as_run_then_load_run_returns_identical_params_config_and_tokenizer(tmp_path, cfg, tok):
    params = init_params(cfg, jax.random.key(3))
    pretrained.save_params_as_run(tmp_path / "run", cfg, params, tok, step=7)
    run = pretrained.load_run(tmp_path / "run")
    assert run.cfg == cfg and run.step == 7 and run.run_dir == tmp_path / "run"
    assert tokenizer_fingerprint(run.tokenizer) == tokenizer_fingerprint(tok)
    chex.assert_trees_all_equal(jax.device_get(run.params), jax.device_get(params))  # bitwise
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(run.params))


def test_load_run_picks_latest_best_or_the_exact_step_asked(tmp_path, cfg, tok):
    params = _write_run(tmp_path, cfg, tok, [(10, 5.0), (20, 3.0), (30, None), (40, 4.0)])
    first_leaf = lambda run: np.asarray(jax.tree.leaves(run.params)[0])  # noqa: E731
    base = np.asarray(jax.tree.leaves(params)[0])
    for step, expect in [(None, 40), ("latest", 40), ("best", 20), (30, 30), ("10", 10)]:
        run = pretrained.load_run(tmp_path, step)
        assert run.step == expect, step
        np.testing.assert_array_equal(first_leaf(run), base + expect)


def test_only_newest_keep_steps_and_the_best_by_validation_loss_are_kept(tmp_path, cfg, tok):
    _write_run(tmp_path, cfg, tok, [(10, 5.0), (20, 2.0), (30, None), (40, 4.0), (50, None), (60, 3.0)], keep=2)
    steps = sorted(int(p.name) for p in (tmp_path / rundir.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    assert steps == [20, 50, 60]  # 0, 10, 30, 40 were neither among the newest 2 nor the best (20)


def test_load_run_rejects_missing_dir_unknown_step_and_vocab_mismatch_with_one_line(tmp_path, cfg, tok):
    _write_run(tmp_path / "run", cfg, tok, [(10, None)])
    with pytest.raises(UserError, match="does not exist"):
        pretrained.load_run(tmp_path / "nope")
    with pytest.raises(UserError, match=r"no checkpoint at step 11; available steps: \[0, 10\]"):
        pretrained.load_run(tmp_path / "run", 11)
    with pytest.raises(UserError, match="no checkpoint with a validation loss"):
        pretrained.load_run(tmp_path / "run", "best")
    record = json.loads((tmp_path / "run" / rundir.RUN_FILE).read_text())
    record["model"]["vocab_size"] = 301
    rundir.write_run_json(tmp_path / "run", record)
    with pytest.raises(UserError, match="tokenizer has 300 tokens but the model expects 301") as e:
        pretrained.load_run(tmp_path / "run")
    assert "\n" not in str(e.value)


def test_a_run_dir_or_hf_dir_that_is_a_file_is_called_a_file_and_left_alone(tmp_path, cfg, tok):
    f = tmp_path / "notes.txt"
    f.write_text("not a run\n")
    with pytest.raises(UserError, match=rf"^--run_dir={f} is a file, not a run directory; pass the --run_dir of a "):
        pretrained.load_run(f)
    with pytest.raises(UserError, match=rf"^--hf_dir={f} is a file, not a Hugging Face GPT-2 folder; pass the folder"):
        pretrained.load_model(hf_dir=f)
    with pytest.raises(UserError, match=rf"^--run_dir={f} is a file, not a run directory; choose a new --run_dir$"):
        pretrained.save_params_as_run(f, cfg, init_params(cfg, jax.random.key(0)), tok)
    with pytest.raises(UserError, match=rf"^--hf_dir={tmp_path / 'nope'} does not exist; pass the folder holding"):
        pretrained.load_model(hf_dir=tmp_path / "nope")
    assert f.read_text() == "not a run\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_save_params_as_run_never_overwrites_an_existing_run(tmp_path, cfg, tok):
    params = init_params(cfg, jax.random.key(0))
    pretrained.save_params_as_run(tmp_path, cfg, params, tok)
    with pytest.raises(UserError, match="already holds a run"):
        pretrained.save_params_as_run(tmp_path, cfg, _shifted(params, 1.0), tok)
    np.testing.assert_array_equal(jax.tree.leaves(pretrained.load_run(tmp_path).params)[0], jax.tree.leaves(params)[0])


@pytest.mark.parametrize("damage", ["remove_data_files", "truncate_data_files", "flip_one_bit", "remove_meta"])
def test_unreadable_latest_checkpoint_is_reported_in_one_line_and_the_previous_used(tmp_path, cfg, tok, damage):
    _write_run(tmp_path, cfg, tok, [(10, None), (20, None)])
    step_dir = tmp_path / rundir.CHECKPOINT_DIR / "20"
    data_files = glob.glob(str(step_dir / "params" / "d" / "*"))
    assert data_files, "Orbax layout changed: no params/d/ files to damage"
    if damage == "remove_data_files":
        for f in data_files:
            os.remove(f)
    elif damage == "truncate_data_files":
        for f in data_files:
            os.truncate(f, os.path.getsize(f) // 2)
    elif damage == "flip_one_bit":  # same size, still parses: only the checksums can tell
        biggest = max(data_files, key=os.path.getsize)
        raw = bytearray(pathlib.Path(biggest).read_bytes())
        raw[len(raw) // 2] ^= 0x10
        pathlib.Path(biggest).write_bytes(bytes(raw))
    else:
        shutil.rmtree(step_dir / "meta")
    warnings = []
    run = pretrained.load_run(tmp_path, warn=warnings.append)
    assert run.step == 10
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(step_dir) in warnings[0], warnings
    with pytest.raises(UserError, match="step 20 .* is unreadable"):
        pretrained.load_run(tmp_path, 20)


def test_restore_latest_with_quarantine_moves_the_unreadable_step_aside_without_deleting_it(tmp_path, cfg, tok):
    params = _write_run(tmp_path, cfg, tok, [(10, None), (20, None)])
    for f in glob.glob(str(tmp_path / rundir.CHECKPOINT_DIR / "20" / "params" / "d" / "*")):
        os.remove(f)
    warnings = []
    checkpoints = ckpt.Checkpoints(tmp_path, keep=3, warn=warnings.append, quarantine=tmp_path / rundir.CORRUPT_DIR)
    restored = checkpoints.restore(params)
    assert restored.step == 10 and restored.meta["step"] == 10 and restored.opt_state is None
    assert checkpoints.steps() == [0, 10]
    moved = list((tmp_path / rundir.CORRUPT_DIR).iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["20"] and (moved[0] / "meta").is_dir()
    assert len(warnings) == 1 and "moved to" in warnings[0]
    # the step can be written again now
    checkpoints.save(20, params=params, opt_state=None, meta={"step": 20})
    checkpoints.finish()
    assert checkpoints.steps() == [0, 10, 20]


def test_a_save_killed_midway_leaves_a_tmp_folder_that_is_never_listed_or_loaded(tmp_path, cfg, tok):
    _write_run(tmp_path, cfg, tok, [(10, None)])
    checkpoints = tmp_path / rundir.CHECKPOINT_DIR
    # What a kill -9 during a save leaves behind: the step written under Orbax's temporary name.
    shutil.copytree(checkpoints / "10", checkpoints / "20.orbax-checkpoint-tmp-1700000000000000")
    assert ckpt.Checkpoints(tmp_path).steps() == [0, 10]
    assert pretrained.load_run(tmp_path).step == 10


@pytest.mark.slow
def test_state_with_optimizer_namedtuples_round_trips_bitwise(tmp_path, cfg):
    import optax

    params = init_params(cfg, jax.random.key(1))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=jax.tree.map(lambda _: True, params)))
    opt_state = opt.init(params)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    checkpoints = ckpt.Checkpoints(tmp_path, keep=1)
    checkpoints.save(1, params=params, opt_state=opt_state, meta={"rng": [1, 2]})
    checkpoints.finish()
    restored = checkpoints.restore(params, opt_state)
    chex.assert_trees_all_equal(restored.opt_state, opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)
    assert restored.meta["rng"] == [1, 2]


def test_config_differences_names_each_changed_field_with_both_values():
    saved = {"model": {"n_layer": 2, "d_model": 32}, "train": {"lr": 1e-3}}
    now = {"model": {"n_layer": 4, "d_model": 32}, "train": {"lr": 1e-3}}
    assert rundir.config_differences(saved, now) == ["model.n_layer: 2 in the run dir, 4 now"]
    assert rundir.config_differences(saved, saved) == []


def test_read_run_json_of_a_plain_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        rundir.read_run_json(tmp_path)
    assert pathlib.Path(tmp_path).is_dir()


# ---------------------------------------------------------------- damage no file format notices


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.bfloat16, jnp.uint8])
def test_checksum_changes_with_any_flipped_bit_or_swapped_pair_and_only_then(dtype):
    x = (jnp.arange(37 * 5).reshape(37, 5) % 251).astype(dtype)
    base = ckpt.checksums({"x": x})["['x']"]
    assert ckpt.checksums({"x": jnp.array(x)})["['x']"] == base
    bits = 8 * jnp.dtype(dtype).itemsize
    word = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    for index in [(0, 0), (17, 3), (36, 4)]:
        for bit in range(bits):
            flipped = word.at[index].set(word[index] ^ np.array(1 << bit, word.dtype))
            y = jax.lax.bitcast_convert_type(flipped, dtype)
            assert ckpt.checksums({"x": y})["['x']"] != base, (index, bit)
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert not np.array_equal(swapped, x) and ckpt.checksums({"x": swapped})["['x']"] != base


def test_checkpoint_of_another_architecture_than_run_json_is_a_one_line_error_and_nothing_moves(tmp_path, cfg, tok):
    run = tmp_path / "run"
    pretrained.save_params_as_run(run, cfg, init_params(cfg, jax.random.key(0)), tok)
    record = json.loads((run / rundir.RUN_FILE).read_text())
    record["model"]["d_model"], record["model"]["n_head"] = 64, 8  # "edited to another size"
    rundir.write_run_json(run, record)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(UserError) as e:
        pretrained.load_run(run)
    assert str(e.value) == (f"{run / rundir.RUN_FILE} does not describe the model of checkpoint step 0 (d_model=64 in "
                            f"run.json, 32 in the checkpoint; n_head=8 in run.json, 4 in the checkpoint); it was "
                            f"edited or the checkpoints come from another run: restore its model section")
    # A training resume would quarantine unreadable steps: not these.
    checkpoints = ckpt.Checkpoints(run, keep=3, quarantine=run / rundir.CORRUPT_DIR)
    with pytest.raises(UserError, match="does not describe the model"):
        checkpoints.restore(ckpt.abstract_params(cfg.replace(d_model=64, n_head=8)),
                            model=cfg.replace(d_model=64, n_head=8).architecture())
    checkpoints.close()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_tokenizer_json_swapped_for_another_of_the_same_size_is_refused(tmp_path, cfg, tok, wikitext_dir):
    run = tmp_path / "run"
    pretrained.save_params_as_run(run, cfg, init_params(cfg, jax.random.key(0)), tok)
    lines = (wikitext_dir / "wiki.test.tokens").read_text(encoding="utf-8").splitlines()[:400]
    other = train_tokenizer(lines, vocab_size=300)
    assert other.get_vocab_size() == tok.get_vocab_size() and tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
    (run / rundir.TOKENIZER_FILE).write_text(other.to_str())
    with pytest.raises(UserError, match=f"tokenizer.json is not the tokenizer this run was trained with "
                                        f"\\(fingerprint {tokenizer_fingerprint(other)}, run.json says "
                                        f"{tokenizer_fingerprint(tok)}\\)"):
        pretrained.load_run(run)


def test_prune_keeps_the_newest_and_the_best_like_the_save_time_policy(tmp_path, cfg, tok):
    _write_run(tmp_path, cfg, tok, [(10, 3.0), (20, None), (30, 2.5), (40, None), (50, None), (60, None)])
    checkpoints = ckpt.Checkpoints(tmp_path, keep=2)
    assert checkpoints.prune() == [0, 10, 20, 40]
    checkpoints.close()
    assert ckpt.complete_steps(tmp_path / rundir.CHECKPOINT_DIR) == [30, 50, 60]


def test_a_damaged_saved_validation_loss_is_one_warning_for_readers_and_set_aside_by_writers(tmp_path, cfg, tok):
    _write_run(tmp_path, cfg, tok, [(10, 3.0), (20, 2.0)])
    metrics_file = tmp_path / rundir.CHECKPOINT_DIR / "20" / "metrics" / "metrics"
    assert json.loads(metrics_file.read_text()) == {"val_loss": 2.0}  # where Orbax keeps it
    metrics_file.write_bytes(b"\x00garbage")
    warnings = []
    run = pretrained.load_run(tmp_path, warn=warnings.append)  # the arrays are fine (checksums verified)
    assert run.step == 20 and len(warnings) == 1 and "checkpoints/20 is unreadable" in warnings[0], warnings
    with pytest.raises(UserError, match="no checkpoint with a validation loss"):
        pretrained.load_run(tmp_path, "best", warn=warnings.append)
    with pytest.raises(UserError, match="move that step folder out"):
        ckpt.Checkpoints(tmp_path, keep=3)
    checkpoints = ckpt.Checkpoints(tmp_path, keep=3, warn=warnings.append, quarantine=tmp_path / rundir.CORRUPT_DIR)
    assert checkpoints.steps() == [0, 10] and checkpoints.best_step() == 10
    checkpoints.close()
    assert [p.name.split("-")[0] for p in (tmp_path / rundir.CORRUPT_DIR).iterdir()] == ["20"]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"", b'{"model": {"n_layer": 2', b"[1, 2]",
                                     b'{"model": "small", "train": null}', b'{"train": null}'],
                         ids=["not-utf8", "empty", "truncated", "a-list", "model-a-string", "no-model"])
def test_a_damaged_run_json_is_one_line_saying_which_file(tmp_path, cfg, tok, content):
    pretrained.save_params_as_run(tmp_path, cfg, init_params(cfg, jax.random.key(0)), tok)
    (tmp_path / rundir.RUN_FILE).write_bytes(content)
    with pytest.raises(UserError, match=f"{tmp_path / rundir.RUN_FILE} .*restore it from a copy") as e:
        pretrained.load_run(tmp_path)
    assert "\n" not in str(e.value)


def _abandon_failed_future(filename: str) -> None:
    """A future whose exception was raised by a function defined in ``filename``, dropped unretrieved."""
    namespace = {}
    exec(compile("def write():\n    raise OSError(27, 'File too large')\n", filename, "exec"), namespace)
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        try:
            namespace["write"]()
        except OSError as e:
            future.set_exception(e)
        del future
        gc.collect()  # the exception's traceback holds this frame: a cycle
    finally:
        loop.close()


def test_an_abandoned_future_of_orbax_leaves_no_log_and_any_other_is_still_logged(caplog):
    # A failed write of Orbax's async path after the run had already failed (the metrics log hit a full
    # disk) reached stderr as "Future exception was never retrieved": nothing in its message names Orbax,
    # only its traceback does.
    ckpt._quiet_abandoned_io()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _abandon_failed_future(os.path.join(os.sep, "venv", "orbax", "checkpoint", "_src", "path", "async_path.py"))
        _abandon_failed_future(os.path.join(os.sep, "venv", "otherlib", "io.py"))
    logged = [r for r in caplog.records if "exception was never retrieved" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert traceback.extract_tb(logged[0].exc_info[1].__traceback__)[-1].filename.endswith("otherlib/io.py")
