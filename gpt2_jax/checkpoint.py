"""Run directories and their Orbax checkpoints: everything needed to resume, sample or evaluate a run.

A run directory holds one training run::

    run.json          {"model": GPT2Config dict, "train": TrainConfig dict or null, ...}
    run.lock          held (flock) by the training process using the directory; says who it is
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

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from gpt2_jax import files
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.cli import folder_flag
from gpt2_jax.errors import UserError
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
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
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not even UTF-8
        raise UserError(f"cannot read {path} ({_describe(e)}); restore it from a copy or start a new --run_dir") \
            from None
    if not (isinstance(record, dict) and isinstance(record.get("model"), dict)
            and isinstance(record.get("train"), (dict, type(None)))):
        raise UserError(f"{path} is not a run record (a JSON object with a 'model' and a 'train' section); "
                        f"restore it from a copy or start a new --run_dir")
    return record


def write_run_json(run_dir: str | os.PathLike, record: dict) -> None:
    """Write ``run.json`` atomically (temp file + rename), so a crash never leaves half a file."""
    files.write_atomic(pathlib.Path(run_dir) / RUN_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def config_differences(saved: dict, current: dict) -> list[str]:
    """``["train.lr: 0.001 in the run dir, 0.0003 now", ...]`` for every field that differs."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} in the run dir, {b.get(key)!r} now")
    return diffs


def check_tokenizer(run_dir: str | os.PathLike, record: dict, tok) -> None:
    """A UserError unless ``tok`` is the tokenizer ``run.json`` recorded (runs older than the record pass)."""
    expected = record.get("tokenizer")
    if expected is not None and tokenizer_lib.tokenizer_fingerprint(tok) != expected:
        raise UserError(f"{pathlib.Path(run_dir) / TOKENIZER_FILE} is not the tokenizer this run was trained with "
                        f"(fingerprint {tokenizer_lib.tokenizer_fingerprint(tok)}, {RUN_FILE} says {expected}); "
                        f"put the run's own tokenizer.json back")


def run_config(run_dir: str | os.PathLike) -> GPT2Config:
    record = read_run_json(run_dir)
    try:
        return GPT2Config.from_dict(record["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{pathlib.Path(run_dir) / RUN_FILE} has no valid model config ({e})") from None


# ---------------------------------------------------------------- one training process per run dir


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike, *, warn: Warn = print_warning) -> Iterator[pathlib.Path]:
    """Hold ``run_dir`` exclusively while a training process uses it (created if missing).

    The lock is ``flock`` on ``run.lock``: the kernel drops it when its process ends, however it
    ends (SIGKILL, OOM, a lost node), so a dead run never leaves the directory locked; the file
    only tells the next process who holds it. A second process gets a one-line UserError. A
    directory this call created and that is still empty (apart from the lock) when the block
    ends, e.g. because the first check failed, is removed again.
    """
    import fcntl  # POSIX; imported here so the rest of this module also loads elsewhere

    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run_dir={run_dir} is a file, not a directory; choose another --run_dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run_dir={run_dir} ({e.strerror}); choose a folder you can write") from None
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in --run_dir={run_dir} ({e.strerror}); choose a folder you can "
                            f"write or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # the filesystem has no locks (some NFS/FUSE)
                warn(f"cannot lock {run_dir} ({e.strerror}); make sure no other training process uses it")
                fd = None
                break
            try:
                holder = json.loads(path.read_text())
                who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "its holder is still starting"
            raise UserError(f"--run_dir={run_dir} is in use by another training process ({who}); wait for it "
                            f"to end or stop it (a stopped run resumes), or choose another --run_dir") from None
        # The holder before us may have removed the file between our open and our lock: lock the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if fd is not None:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        yield run_dir
    finally:
        if created and [p.name for p in run_dir.iterdir()] in ([LOCK_FILE], []):
            path.unlink(missing_ok=True)  # while still locked: nobody can be using it
            run_dir.rmdir()
        if fd is not None:
            os.close(fd)  # releases the lock


# ---------------------------------------------------------------- the checkpoint manager


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


def make_manager(run_dir: str | os.PathLike, *, keep: int | None = None, read_only: bool = False,
                 asynchronous: bool = True, warn: Warn = print_warning,
                 quarantine: str | os.PathLike | None = None) -> ocp.CheckpointManager:
    """Orbax manager for ``run_dir/checkpoints``: keeps the newest ``keep`` steps plus the best by validation loss.

    Steps saved with ``val_loss`` are ranked by it; steps without one (saved between evaluations)
    are kept only while among the newest ``keep``. Orbax reads every step's saved metrics when it
    opens the folder and fails on a damaged one, so those are dealt with first: a reader is
    warned and ignores the metrics (no "best" step); a writer moves the step to ``quarantine``.
    """
    directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
    damaged = _damaged_metrics(directory)
    if read_only:
        for step, why in damaged:
            warn(f"the validation loss saved with checkpoint {directory / str(step)} is unreadable ({why}); "
                 f"validation losses are ignored, so step 'best' is unavailable")
        options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0, best_fn=_val_loss, best_mode="min",
                                               lightweight_initialize=bool(damaged))
    else:
        assert keep is not None and keep >= 1, keep
        if damaged:
            if quarantine is None:
                raise UserError(f"the validation loss saved with checkpoint {directory / str(damaged[0][0])} is "
                                f"unreadable ({damaged[0][1]}); move that step folder out of {directory}")
            for step, why in damaged:
                where = _set_aside(directory, step, quarantine)
                warn(f"the validation loss saved with checkpoint {directory / str(step)} is unreadable ({why}), "
                     f"moved to {where}")
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
        _quiet_abandoned_io()  # a failed background write logs from its thread before the caller hears of it
    return ocp.CheckpointManager(directory, options=options)


def _damaged_metrics(directory: pathlib.Path) -> list[tuple[int, str]]:
    """(step, why) for every complete step whose saved metrics file is not JSON."""
    damaged = []
    for step in complete_steps(directory):
        path = directory / str(step) / "metrics" / "metrics"
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (OSError, ValueError) as e:
                damaged.append((step, _describe(e)))
    return damaged


def _set_aside(directory: pathlib.Path, step: int, quarantine: str | os.PathLike) -> pathlib.Path:
    """Move ``directory/step`` into ``quarantine`` (never delete it); every process returns once it is moved."""
    target = pathlib.Path(quarantine) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:  # several processes share the run dir: one moves, all see it
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(directory / str(step)), str(target))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gpt2_jax: checkpoint {step} set aside")
    return target


def prune(manager: ocp.CheckpointManager, keep: int) -> list[int]:
    """Apply ``make_manager``'s retention now: the newest ``keep`` steps and the best stay, the rest go.

    Orbax applies it after each save; a run killed between a save and that cleanup would
    otherwise keep the extra steps until its next save, which a finished run never makes.
    Returns the deleted steps.
    """
    steps = sorted(manager.all_steps())
    best = manager.best_step()
    kept = set(steps[-keep:]) | ({best} if best is not None else set())
    gone = [s for s in steps if s not in kept]
    for step in gone:
        manager.delete(step)
    return gone


def _no_missing_metrics_warning(record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


@jax.jit
def _leaf_checksums(leaves: list) -> jax.Array:
    """One uint32 per array: the sum of its 32-bit words weighted by odd numbers, mod 2**32.

    Any single flipped bit changes it (2**k times an odd number is never 0 mod 2**32), and so does
    moving values around; it is a check against damaged files, not a cryptographic hash. Computed
    where the arrays are (no host copy), exactly, so saving and restoring agree bit for bit.
    """
    sums = []
    for x in leaves:
        x = jnp.ravel(jnp.asarray(x))
        if x.dtype == jnp.bool_ or x.dtype.itemsize < 4:
            words = x.astype(jnp.uint32) if x.dtype == jnp.bool_ else lax.bitcast_convert_type(
                x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        else:
            words = jnp.ravel(lax.bitcast_convert_type(x, jnp.uint32))
        weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        sums.append(jnp.sum(words * weights, dtype=jnp.uint32))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def checksums(tree) -> dict[str, int]:
    """``{"['h_0']['attn']...": checksum}`` for every array of ``tree`` (see ``_leaf_checksums``)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = np.asarray(_leaf_checksums([leaf for _, leaf in paths_leaves]))
    return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(paths_leaves, sums)}


def _verify_checksums(name: str, tree, expected: dict[str, int] | None) -> None:
    if expected is None:
        return  # saved before checksums existed
    got = checksums(tree)
    bad = [k for k in expected if got.get(k) != expected[k]]
    if bad or set(got) != set(expected):
        raise ValueError(f"{name}{bad[0] if bad else ''} does not match the checksum saved with it: "
                         f"the files were damaged after they were written")


def save_checkpoint(manager: ocp.CheckpointManager, step: int, *, params, opt_state, meta: dict,
                    val_loss: float | None = None) -> None:
    """Save (asynchronously if the manager is) unreplicated ``params``/``opt_state`` and JSON ``meta`` at ``step``.

    ``meta`` gains the arrays' checksums, which every restore verifies; pass the model's
    ``cfg.architecture()`` as ``meta["model"]`` so a restore can tell a run.json edited since.
    """
    trees = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
    meta = {**meta, "checksums": {name: checksums(tree) for name, tree in trees.items()}}
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()} | {"meta": ocp.args.JsonSave(meta)}
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_no_missing_metrics_warning)  # a step without val_loss is expected, not news
    try:
        # Waits for the previous save first, so its failure (disk full, say) surfaces here too.
        saved = manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:  # noqa: BLE001 - whatever failed, no new checkpoint was written
        _quiet_abandoned_io()
        raise _write_failed(manager, e) from None
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


def restore_step(manager: ocp.CheckpointManager, step: int, params_like, opt_state_like=None, *,
                 model: dict | None = None) -> Restored:
    """Read one step into the structure of ``params_like`` (arrays or shapes); ``opt_state_like=None`` reads
    only params and meta. With ``model`` (``cfg.architecture()``) a checkpoint saved by another
    architecture is a UserError. Raises whatever Orbax raises, and ValueError for damaged arrays."""
    # The small JSON first: it tells a checkpoint of another architecture before its arrays fail to fit.
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("model")
    if model is not None and saved is not None and saved != model:
        run_file = pathlib.Path(str(manager.directory)).parent / RUN_FILE
        diffs = [f"{k}={model.get(k)!r} in {RUN_FILE}, {saved.get(k)!r} in the checkpoint"
                 for k in sorted(set(saved) | set(model)) if saved.get(k) != model.get(k)]
        raise UserError(f"{run_file} does not describe the model of checkpoint step {step} ({'; '.join(diffs)}); "
                        f"it was edited or the checkpoints come from another run: restore its model section")
    likes = {"params": params_like} if opt_state_like is None else {"params": params_like, "opt_state": opt_state_like}
    out = manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(_abstract(like)) for name, like in likes.items()}))
    sums = meta.get("checksums") or {}
    for name in likes:
        _verify_checksums(name, out[name], sums.get(name))
    return Restored(step=step, params=out["params"], opt_state=out.get("opt_state"), meta=meta)


def _quiet_abandoned_io() -> None:
    """Drop the noise Orbax leaves after a read or write failed (the one-line report says it all).

    When one array of a checkpoint fails to read or write, Orbax logs the exception (with its
    traceback) from its threads and closes its event loop while TensorStore still completes the
    other operations; each completion raises RuntimeError('Event loop is closed') into
    ``sys.unraisablehook``, the failed operations are logged by asyncio as "Task exception was
    never retrieved", and those never started warn "coroutine ... was never awaited" at exit: a
    traceback per array on stderr. Exactly those are dropped; the exception itself still reaches
    the caller (``save_checkpoint``, ``finish_saves``, ``restore_*``), which reports it. Installed once.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_gpt2_jax_filter", False):
        return
    orbax_io = ("async_deserialize", "tensorstore_spec", "write_fragment", "async_serialize", "orbax", "OCDBT")
    logging.getLogger("asyncio").addFilter(lambda r: not (
        "exception was never retrieved" in r.getMessage() and any(w in r.getMessage() for w in orbax_io)))
    # Reads and writes never started because another failed: garbage-collected unawaited at exit.
    warnings.filterwarnings(
        "ignore", r"coroutine '.*(serialize|write_fragment|read_fragment|array_metadatas).*' was never awaited",
        RuntimeWarning)
    # Orbax logs each failure of its threads (and re-raises it to the caller): the caller reports it.
    logging.getLogger("absl").addFilter(lambda r: not (
        r.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in r.pathname and r.exc_info is not None))

    def hook(unraisable):
        e, obj = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and obj is None
        dying_write = "write_fragment" in getattr(obj, "__qualname__", "") and sys.is_finalizing()
        if not (closed_loop or dying_write):
            previous(unraisable)

    hook._gpt2_jax_filter = True
    sys.unraisablehook = hook


def _describe(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def _io_reason(e: Exception) -> str:
    """What went wrong in a failed write, in the system's words ("No space left on device")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))  # TensorStore's errors carry the errno
    return os.strerror(int(code.group(1))) if code else _describe(e)


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved completely in a checkpoint folder (Orbax renames a step's folder to its number
    only once every file is written)."""
    directory = pathlib.Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def write_failed(checkpoints: str | os.PathLike, e: Exception, what: str) -> UserError:
    """The one-line report of a failed write (``what``: "a checkpoint in DIR", "to FILE")."""
    steps = complete_steps(checkpoints)
    kept = f"the newest complete checkpoint, step {steps[-1]}, is intact" if steps else "no checkpoint was complete yet"
    return UserError(f"cannot write {what} ({_io_reason(e)}); {kept}; free disk space or make the folder "
                     f"writable, then run the same command to resume")


def _write_failed(manager: ocp.CheckpointManager, e: Exception) -> UserError:
    directory = pathlib.Path(str(manager.directory))
    return write_failed(directory, e, f"a checkpoint in {directory}")


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Wait for the asynchronous saves; a failed one is a one-line UserError naming the intact checkpoint."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever failed in the background, the step is not saved
        _quiet_abandoned_io()
        raise _write_failed(manager, e) from None


def close_manager(manager: ocp.CheckpointManager, *, report: bool = True) -> None:
    """Finish pending saves and close; with ``report=False`` (already failing) a failed save is not raised."""
    try:
        finish_saves(manager)
    except UserError:
        if report:
            raise
    finally:
        try:
            manager.close()
        except Exception:  # noqa: BLE001 - closing after a failed save re-raises that failure
            if report:
                raise


def restore_latest(manager: ocp.CheckpointManager, params_like, opt_state_like=None, *, model: dict | None = None,
                   warn: Warn = print_warning, quarantine: str | os.PathLike | None = None) -> Restored | None:
    """The newest readable checkpoint, or None when there is none.

    An unreadable step is reported with one ``warn`` line and the previous step is tried. With
    ``quarantine`` (a training run about to write new checkpoints) the unreadable step folder is
    moved there, so a new save of that step can take its place; it is never deleted. A damaged
    array (checksum mismatch) counts as unreadable; a checkpoint of another architecture than
    ``model`` is a UserError (the config is wrong, not the checkpoint).
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore_step(manager, step, params_like, opt_state_like, model=model)
        except UserError:
            raise  # readable, but not this run's model: nothing to skip or set aside
        except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
            _quiet_abandoned_io()
            where = pathlib.Path(str(manager.directory)) / str(step)
            moved = ""
            if quarantine is not None:
                target = _set_aside(where.parent, step, quarantine)
                manager.reload()
                moved = f", moved to {target}"
            warn(f"checkpoint {where} is unreadable ({_describe(e)}){moved}; using the previous one")
    return None


# ---------------------------------------------------------------- public: load a run, import a model


def _restore_for_load(manager, run_dir: pathlib.Path, step, target, model: dict, warn: Warn) -> Restored:
    steps = list(manager.all_steps())
    if not steps:
        raise UserError(f"{run_dir} has no complete checkpoint yet; train longer or pick another --run_dir")

    if step is None or step == "latest":
        restored = restore_latest(manager, target, model=model, warn=warn)
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
            restored = restore_step(manager, chosen, target, model=model)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            _quiet_abandoned_io()
            raise UserError(f"checkpoint step {chosen} of {run_dir} is unreadable ({_describe(e)}); "
                            f"pick another step of {steps}") from None
    return restored


def load_run(run_dir: str | os.PathLike, step: int | str | None = None, *, warn: Warn = print_warning) -> LoadedRun:
    """A run's config, tokenizer and float32 params at ``step``.

    ``step``: None or "latest" = the newest readable checkpoint (an unreadable newer one is reported
    by ``warn`` and skipped); "best" = the lowest validation loss; an int = exactly that step.
    """
    run_dir = folder_flag(run_dir, "run_dir", "a run directory", "pass the --run_dir of a training run")
    cfg = run_config(run_dir)
    tok = tokenizer_lib.load_tokenizer(run_dir / TOKENIZER_FILE)
    tokenizer_lib.check_vocab_matches(tok, cfg)
    check_tokenizer(run_dir, read_run_json(run_dir), tok)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise UserError(f"{run_dir} has no {CHECKPOINT_DIR}/ folder; the run saved no checkpoint yet")
    target = abstract_params(cfg)
    manager = make_manager(run_dir, read_only=True, warn=warn)
    try:
        restored = _restore_for_load(manager, run_dir, step, target, cfg.architecture(), warn)
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

        folder_flag(hf_dir, "hf_dir", "a Hugging Face GPT-2 folder",
                    "pass the folder holding config.json, model.safetensors and the tokenizer")
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
    run_dir = folder_flag(run_dir, "run_dir", "a run directory", "choose a new --run_dir", may_be_new=True)
    if (run_dir / RUN_FILE).exists() or (run_dir / CHECKPOINT_DIR).exists():
        raise UserError(f"{run_dir} already holds a run; choose a new --run_dir (nothing was overwritten)")
    tokenizer_lib.check_vocab_matches(tokenizer, cfg)
    abstract = abstract_params(cfg)
    shapes = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype).name), abstract)
    given = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype).name), params)
    assert jax.tree.structure(shapes) == jax.tree.structure(given) and shapes == given, "params do not match cfg"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_lib.save_tokenizer(tokenizer, run_dir / TOKENIZER_FILE)
    write_run_json(run_dir, {"model": cfg.to_dict(), "train": None, "source": source,
                             "tokenizer": tokenizer_lib.tokenizer_fingerprint(tokenizer)})
    manager = make_manager(run_dir, keep=1, asynchronous=False)
    save_checkpoint(manager, step, params=params, opt_state=None,
                    meta={"step": step, "source": source, "model": cfg.architecture()})
    close_manager(manager)
    return run_dir
