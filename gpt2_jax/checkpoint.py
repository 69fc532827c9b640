"""Run directories and their Orbax checkpoints: everything needed to resume, sample or evaluate a run.

A run directory holds one training run::

    run.json          {"model": GPT2Config dict, "train": TrainConfig dict or null, ...}
    tokenizer.json    the run's tokenizer (the model's vocabulary is meaningless without it)
    checkpoints/<step>/   one Orbax checkpoint per saved step: items "params", "opt_state", "meta"
    metrics.jsonl     one line per training step; evals.jsonl one line per evaluation; loss.png

Checkpoints hold the train state UNREPLICATED (one copy, no device axis), so a run saved on N
devices resumes on M, in one process or several. With several processes (``jax.distributed``)
every process calls save and restore on the same run directory, which they must all see (a
shared filesystem): the saved arrays are global, replicated over all devices, and Orbax writes
them once (from the process holding replica 0) and commits the step from process 0; each process
restores the whole state onto its own first device. Orbax writes each step into a temporary directory and renames it when
complete, so a process killed mid-save leaves only a ``<step>.orbax-checkpoint-tmp-*`` folder that
is never listed as a step. A checkpoint that exists but cannot be read (files removed, truncated)
is reported in one warning line and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.cli import UserError
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params

RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"  # unreadable checkpoints are moved here, never deleted
METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.jsonl"
PLOT_FILE = "loss.png"

Warn = Callable[[str], None]


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run's model, ready to use: ``forward(run.params, run.cfg, tokens_BT)``."""

    cfg: GPT2Config
    params: dict  # float32, unreplicated
    tokenizer: Any  # tokenizers.Tokenizer
    step: int
    run_dir: pathlib.Path


@dataclasses.dataclass(frozen=True)
class Restored:
    """One checkpoint read back: the step, the state's pieces and the JSON ``meta`` saved with it."""

    step: int
    params: dict
    opt_state: Any  # None when the checkpoint has no optimizer state (an imported model)
    meta: dict


# ---------------------------------------------------------------- run.json


def read_run_json(run_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {RUN_FILE}); pass the --run_dir a training run wrote")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); restore it from a copy or start a new --run_dir") from None


def write_run_json(run_dir: str | os.PathLike, record: dict) -> None:
    """Write ``run.json`` atomically (temp file + rename), so a crash never leaves half a file."""
    path = pathlib.Path(run_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def config_differences(saved: dict, current: dict) -> list[str]:
    """``["train.lr: 0.001 in the run dir, 0.0003 now", ...]`` for every field that differs."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} in the run dir, {b.get(key)!r} now")
    return diffs


def run_config(run_dir: str | os.PathLike) -> GPT2Config:
    record = read_run_json(run_dir)
    try:
        return GPT2Config.from_dict(record["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{pathlib.Path(run_dir) / RUN_FILE} has no valid model config ({e})") from None


# ---------------------------------------------------------------- the checkpoint manager


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


def make_manager(run_dir: str | os.PathLike, *, keep: int | None = None, read_only: bool = False,
                 asynchronous: bool = True) -> ocp.CheckpointManager:
    """Orbax manager for ``run_dir/checkpoints``: keeps the newest ``keep`` steps plus the best by validation loss.

    Steps saved with ``val_loss`` are ranked by it; steps without one (saved between evaluations)
    are kept only while among the newest ``keep``.
    """
    directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
    if read_only:
        options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0, best_fn=_val_loss, best_mode="min")
    else:
        assert keep is not None and keep >= 1, keep
        keep_policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            # BestN sorts ascending and keeps the tail: reverse=True puts the lowest loss last.
            checkpoint_managers.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep_policy, best_fn=_val_loss, best_mode="min",
            cleanup_tmp_directories=True,  # leftovers of a save killed midway: incomplete, never read
            enable_async_checkpointing=asynchronous,
        )
    return ocp.CheckpointManager(directory, options=options)


def _no_missing_metrics_warning(record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


def save_checkpoint(manager: ocp.CheckpointManager, step: int, *, params, opt_state, meta: dict,
                    val_loss: float | None = None) -> None:
    """Save (asynchronously if the manager is) unreplicated ``params``/``opt_state`` and JSON ``meta`` at ``step``."""
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_no_missing_metrics_warning)  # a step without val_loss is expected, not news
    try:
        saved = manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    finally:
        absl_logger.removeFilter(_no_missing_metrics_warning)
    assert saved, f"Orbax declined to save step {step}"


def abstract_params(cfg: GPT2Config):
    """Shapes and dtypes of ``cfg``'s parameters, without computing them."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def _abstract(tree):
    """Shapes/dtypes of ``tree`` placed on the first local device (whatever devices wrote the checkpoint)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_step(manager: ocp.CheckpointManager, step: int, params_like, opt_state_like=None) -> Restored:
    """Read one step into the structure of ``params_like`` (arrays or shapes); ``opt_state_like=None`` reads
    only params and meta. Raises whatever Orbax raises."""
    items = {"params": ocp.args.StandardRestore(_abstract(params_like)), "meta": ocp.args.JsonRestore()}
    if opt_state_like is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
    out = manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step=step, params=out["params"], opt_state=out.get("opt_state"), meta=out["meta"])


def _silence_abandoned_reads() -> None:
    """After a failed restore, drop the noise of the reads Orbax abandoned (the warning said it all).

    When one array of a checkpoint fails to read, Orbax closes its event loop while TensorStore
    still completes the other reads; each completion then raises RuntimeError('Event loop is
    closed') into ``sys.unraisablehook``, and the failed reads may be logged by asyncio as "Task/Future
    exception was never retrieved": a traceback per array on stderr, seconds later. Only
    exactly those are dropped; everything else reaches the previous hook / the log. Installed once.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_gpt2_jax_filter", False):
        return
    logging.getLogger("asyncio").addFilter(lambda r: not (
        "exception was never retrieved" in r.getMessage()
        and ("async_deserialize" in r.getMessage() or "tensorstore_spec" in r.getMessage())))

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and unraisable.object is None):
            previous(unraisable)

    hook._gpt2_jax_filter = True
    sys.unraisablehook = hook


def _describe(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def restore_latest(manager: ocp.CheckpointManager, params_like, opt_state_like=None, *,
                   warn: Warn = print_warning, quarantine: str | os.PathLike | None = None) -> Restored | None:
    """The newest readable checkpoint, or None when there is none.

    An unreadable step is reported with one ``warn`` line and the previous step is tried. With
    ``quarantine`` (a training run about to write new checkpoints) the unreadable step folder is
    moved there, so a new save of that step can take its place; it is never deleted.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore_step(manager, step, params_like, opt_state_like)
        except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
            _silence_abandoned_reads()
            where = pathlib.Path(str(manager.directory)) / str(step)
            moved = ""
            if quarantine is not None:
                target = pathlib.Path(quarantine) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                if jax.process_index() == 0:  # several processes share the run dir: one moves, all see it
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(where), str(target))
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"gpt2_jax: checkpoint {step} set aside")
                manager.reload()
                moved = f", moved to {target}"
            warn(f"checkpoint {where} is unreadable ({_describe(e)}){moved}; using the previous one")
    return None


# ---------------------------------------------------------------- public: load a run, import a model


def _restore_for_load(manager, run_dir: pathlib.Path, step, target, warn: Warn) -> Restored:
    steps = list(manager.all_steps())
    if not steps:
        raise UserError(f"{run_dir} has no complete checkpoint yet; train longer or pick another --run_dir")

    if step is None or step == "latest":
        restored = restore_latest(manager, target, warn=warn)
        if restored is None:
            raise UserError(f"no checkpoint of {run_dir} is readable (steps {steps}); see the warnings above")
    else:
        if step == "best":
            chosen = manager.best_step()
            if chosen is None:
                raise UserError(f"{run_dir} has no checkpoint with a validation loss; use step 'latest' or one of {steps}")
        else:
            try:
                chosen = int(step)
            except ValueError:
                raise UserError(f"step {step!r} is not a number, 'latest' or 'best'") from None
            if chosen not in steps:
                raise UserError(f"{run_dir} has no checkpoint at step {chosen}; available steps: {steps}")
        try:
            restored = restore_step(manager, chosen, target)
        except Exception as e:  # noqa: BLE001
            _silence_abandoned_reads()
            raise UserError(f"checkpoint step {chosen} of {run_dir} is unreadable ({_describe(e)}); "
                            f"pick another step of {steps}") from None
    return restored


def load_run(run_dir: str | os.PathLike, step: int | str | None = None, *, warn: Warn = print_warning) -> LoadedRun:
    """A run's config, tokenizer and float32 params at ``step``.

    ``step``: None or "latest" = the newest readable checkpoint (an unreadable newer one is reported
    by ``warn`` and skipped); "best" = the lowest validation loss; an int = exactly that step.
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the --run_dir of a training run")
    cfg = run_config(run_dir)
    tok = tokenizer_lib.load_tokenizer(run_dir / TOKENIZER_FILE)
    tokenizer_lib.check_vocab_matches(tok, cfg)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise UserError(f"{run_dir} has no {CHECKPOINT_DIR}/ folder; the run saved no checkpoint yet")
    target = abstract_params(cfg)
    manager = make_manager(run_dir, read_only=True)
    try:
        restored = _restore_for_load(manager, run_dir, step, target, warn)
    finally:
        manager.close()
    return LoadedRun(cfg=cfg, params=restored.params, tokenizer=tok, step=restored.step, run_dir=run_dir)


def parse_step(text: str | None) -> int | str | None:
    """A ``--step`` flag's value: None, "latest", "best" or a step number (UserError otherwise)."""
    if text is None or text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    raise UserError(f"--step must be a step number, 'latest' or 'best', got {text!r}")


def define_model_flags(flag_values, verb: str) -> None:
    """--run_dir, --hf_dir and --step on a CLI's FlagValues: the flags ``load_model`` takes."""
    from absl import flags  # CLI-only

    flags.DEFINE_string("run_dir", None, f"Training run to {verb} (run.json, tokenizer.json, checkpoints/).",
                        flag_values=flag_values)
    flags.DEFINE_string("hf_dir", None, f"{verb.capitalize()} a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors, tokenizer) instead of a run directory.", flag_values=flag_values)
    flags.DEFINE_string("step", "latest", "Checkpoint to load: a step number, 'latest' (newest complete) "
                        "or 'best' (lowest validation loss).", flag_values=flag_values)


def load_model(run_dir: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None,
               step: int | str | None = None, *, warn: Warn = print_warning) -> LoadedRun:
    """A model for inference from a training run (at ``step``) or a Hugging Face GPT-2 folder.

    The one loader of the sampling and evaluation CLIs; an HF folder is reported as step 0.
    """
    if run_dir and hf_dir:
        raise UserError("give one of --run_dir=DIR or --hf_dir=DIR, not both")
    if hf_dir:
        from gpt2_jax import hf  # only for Hugging Face folders

        cfg, params, tok = hf.load_hf_with_tokenizer(hf_dir)
        tokenizer_lib.check_vocab_matches(tok, cfg)
        return LoadedRun(cfg=cfg, params=params, tokenizer=tok, step=0, run_dir=pathlib.Path(hf_dir))
    if not run_dir:
        raise UserError("--run_dir is required: the training run to load (e.g. --run_dir=runs/small), "
                        "or --hf_dir=DIR for a Hugging Face GPT-2 folder")
    return load_run(run_dir, parse_step(step) if isinstance(step, str) else step, warn=warn)


def save_params_as_run(run_dir: str | os.PathLike, cfg: GPT2Config, params, tokenizer, step: int = 0,
                       *, source: str | None = None) -> pathlib.Path:
    """Make ``run_dir`` a run holding ``params`` (e.g. imported weights) that ``load_run`` reads.

    Refuses to touch an existing run directory, so nothing already saved is lost.
    """
    run_dir = pathlib.Path(run_dir)
    if (run_dir / RUN_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise UserError(f"{run_dir} already holds a run; choose a new --run_dir (nothing was overwritten)")
    tokenizer_lib.check_vocab_matches(tokenizer, cfg)
    abstract = abstract_params(cfg)
    shapes = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype).name), abstract)
    given = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype).name), params)
    assert jax.tree.structure(shapes) == jax.tree.structure(given) and shapes == given, "params do not match cfg"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_lib.save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    write_run_json(run_dir, {"model": cfg.to_dict(), "train": None, "source": source})
    manager = make_manager(run_dir, keep=1, asynchronous=False)
    save_checkpoint(manager, step, params=params, opt_state=None, meta={"step": step, "source": source})
    manager.wait_until_finished()
    manager.close()
    return run_dir
