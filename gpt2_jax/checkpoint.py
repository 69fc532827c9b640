"""A run's Orbax checkpoints behind one small handle: open, save, restore, close.

Checkpoints hold the train state unreplicated (one copy, no device axis), so a run saved on N
devices resumes on M, in one process or several (every process saves and restores the same
folder; Orbax writes a replicated array once). A step is written to a temporary folder and
renamed when complete, every array carries a checksum verified on restore, and an unreadable
step is reported in one line and skipped (a writer moves it aside, never deletes it). Orbax's
own objects and its noise filters stay inside this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import traceback
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from gpt2_jax.config import GPT2Config
from gpt2_jax.rundir import CHECKPOINT_DIR, RUN_FILE, Warn, print_warning
from gpt2_jax.errors import UserError, describe
from gpt2_jax.model import init_params


@dataclasses.dataclass(frozen=True)
class Restored:
    """One checkpoint read back: the step, the state's pieces and the JSON ``meta`` saved with it."""

    step: int
    params: dict
    opt_state: Any  # None when the checkpoint has no optimizer state (an imported model)
    meta: dict


class Checkpoints:
    """The checkpoints of ``run_dir/checkpoints``; ``keep=None`` opens them read-only.

    A writer keeps the newest ``keep`` steps plus the best by validation loss; steps saved
    without one are kept only while among the newest. Unreadable steps are moved to
    ``quarantine`` when one is given (a resuming training run), so a new save can take their place.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int | None = None, asynchronous: bool = True,
                 warn: Warn = print_warning, quarantine: str | os.PathLike | None = None):
        self.directory = pathlib.Path(run_dir).absolute() / CHECKPOINT_DIR
        self.keep, self.warn, self.quarantine = keep, warn, quarantine
        self._manager = _make_manager(self.directory, keep, asynchronous, warn, quarantine)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def save(self, step: int, *, params, opt_state, meta: dict, val_loss: float | None = None) -> None:
        """Save unreplicated ``params``/``opt_state`` and JSON ``meta`` (asynchronously for a writer).

        ``meta`` gains the arrays' checksums; pass ``cfg.architecture()`` as ``meta["model"]`` so a
        restore can tell a run.json edited since. Waits for the previous save first.
        """
        trees = {"params": params} if opt_state is None else {"params": params, "opt_state": opt_state}
        meta = {**meta, "checksums": {name: checksums(tree) for name, tree in trees.items()}}
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_no_missing_metrics_warning)  # a step without val_loss is expected, not news
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)),
                                       metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - whatever failed, no new checkpoint was written
            _quiet_abandoned_io()
            raise write_failed(self.directory, e, f"a checkpoint in {self.directory}") from None
        finally:
            absl_logger.removeFilter(_no_missing_metrics_warning)
        assert saved, f"Orbax declined to save step {step}"

    def restore(self, params_like, opt_state_like=None, *, step: int | str | None = None,
                model: dict | None = None) -> Restored | None:
        """The checkpoint at ``step`` in the structure of the ``*_like`` trees (arrays or shapes).

        ``step`` None or "latest": the newest readable one (None when there is none; each
        unreadable newer one is warned about and skipped); "best": the lowest validation loss; an
        int: exactly that step. ``opt_state_like=None`` reads only params and meta. A checkpoint of
        another architecture than ``model`` is a UserError: the config is wrong, not the checkpoint.
        """
        if step is None or step == "latest":
            return self._restore_latest(params_like, opt_state_like, model)
        steps = self.steps()
        if step == "best":
            chosen = self.best_step()
            if chosen is None:
                raise UserError(f"{self.directory.parent} has no checkpoint with a validation loss; use step "
                                f"'latest' or one of {steps}")
        else:
            try:
                chosen = int(step)
            except ValueError:
                raise UserError(f"step {step!r} is not a number, 'latest' or 'best'") from None
            if chosen not in steps:
                raise UserError(f"{self.directory.parent} has no checkpoint at step {chosen}; available steps: "
                                f"{steps}")
        try:
            return self._restore_step(chosen, params_like, opt_state_like, model)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            _quiet_abandoned_io()
            raise UserError(f"checkpoint step {chosen} of {self.directory.parent} is unreadable ({describe(e)}); "
                            f"pick another step of {steps}") from None

    def _restore_latest(self, params_like, opt_state_like, model) -> Restored | None:
        for step in reversed(self.steps()):
            try:
                return self._restore_step(step, params_like, opt_state_like, model)
            except UserError:
                raise  # readable, but not this run's model: nothing to skip or set aside
            except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
                _quiet_abandoned_io()
                where, moved = self.directory / str(step), ""
                if self.quarantine is not None:
                    moved = f", moved to {_set_aside(self.directory, step, self.quarantine)}"
                    self._manager.reload()
                self.warn(f"checkpoint {where} is unreadable ({describe(e)}){moved}; using the previous one")
        return None

    def _restore_step(self, step: int, params_like, opt_state_like, model) -> Restored:
        # The small JSON first: it tells a checkpoint of another architecture before its arrays fail to fit.
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved = meta.get("model")
        if model is not None and saved is not None and saved != model:
            diffs = [f"{k}={model.get(k)!r} in {RUN_FILE}, {saved.get(k)!r} in the checkpoint"
                     for k in sorted(set(saved) | set(model)) if saved.get(k) != model.get(k)]
            raise UserError(f"{self.directory.parent / RUN_FILE} does not describe the model of checkpoint step "
                            f"{step} ({'; '.join(diffs)}); it was edited or the checkpoints come from another "
                            f"run: restore its model section")
        likes = {"params": params_like}
        if opt_state_like is not None:
            likes["opt_state"] = opt_state_like
        out = self._manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(_abstract(like)) for name, like in likes.items()}))
        sums = meta.get("checksums") or {}
        for name in likes:
            _verify_checksums(name, out[name], sums.get(name))
        return Restored(step=step, params=out["params"], opt_state=out.get("opt_state"), meta=meta)

    def prune(self) -> list[int]:
        """Apply the retention now (a kill between a save and Orbax's cleanup leaves extra steps).

        Returns the deleted steps.
        """
        steps, best = self.steps(), self.best_step()
        kept = set(steps[-self.keep:]) | ({best} if best is not None else set())
        gone = [s for s in steps if s not in kept]
        for step in gone:
            self._manager.delete(step)
        return gone

    def finish(self) -> None:
        """Wait for the asynchronous saves; a failed one is a one-line UserError naming the intact checkpoint."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever failed in the background, the step is not saved
            _quiet_abandoned_io()
            raise write_failed(self.directory, e, f"a checkpoint in {self.directory}") from None

    def close(self, *, report: bool = True) -> None:
        """Finish pending saves and close; with ``report=False`` (already failing) a failed save is not raised."""
        try:
            self.finish()
        except UserError:
            if report:
                raise
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - closing after a failed save re-raises that failure
                if report:
                    raise


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


def _make_manager(directory: pathlib.Path, keep: int | None, asynchronous: bool, warn: Warn,
                  quarantine) -> ocp.CheckpointManager:
    # Orbax reads every step's saved metrics when it opens the folder and fails on a damaged one:
    # a reader ignores them (no "best" step), a writer moves the step aside.
    damaged = _damaged_metrics(directory)
    if keep is None:
        for step, why in damaged:
            warn(f"the validation loss saved with checkpoint {directory / str(step)} is unreadable ({why}); "
                 f"validation losses are ignored, so step 'best' is unavailable")
        options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0, best_fn=_val_loss,
                                               best_mode="min", lightweight_initialize=bool(damaged))
        return ocp.CheckpointManager(directory, options=options)
    assert keep >= 1, keep
    if damaged and quarantine is None:
        raise UserError(f"the validation loss saved with checkpoint {directory / str(damaged[0][0])} is "
                        f"unreadable ({damaged[0][1]}); move that step folder out of {directory}")
    for step, why in damaged:
        where = _set_aside(directory, step, quarantine)
        warn(f"the validation loss saved with checkpoint {directory / str(step)} is unreadable ({why}), "
             f"moved to {where}")
    keep_policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        # BestN sorts ascending and keeps the tail: reverse=True puts the lowest loss last.
        checkpoint_managers.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=keep_policy, best_fn=_val_loss, best_mode="min",
        cleanup_tmp_directories=True,  # leftovers of a save killed midway: incomplete, never read
        enable_async_checkpointing=asynchronous)
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
                damaged.append((step, describe(e)))
    return damaged


def _set_aside(directory: pathlib.Path, step: int, quarantine: str | os.PathLike) -> pathlib.Path:
    """Move ``directory/step`` into ``quarantine``; every process returns once it is moved."""
    target = pathlib.Path(quarantine) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:  # several processes share the run dir: one moves, all see it
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(directory / str(step)), str(target))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gpt2_jax: checkpoint {step} set aside")
    return target


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


def abstract_params(cfg: GPT2Config):
    """Shapes and dtypes of ``cfg``'s parameters, without computing them."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def _abstract(tree):
    """Shapes/dtypes of ``tree`` placed on the first local device (whatever devices wrote the checkpoint)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _quiet_abandoned_io() -> None:
    """Drop the noise Orbax leaves after a read or write failed; the caller reports the failure itself.

    A failed array closes Orbax's event loop while TensorStore completes the others: each then
    raises "Event loop is closed" into ``sys.unraisablehook``, asyncio logs "Task exception was
    never retrieved" and unstarted coroutines warn at exit. Exactly those are dropped. Installed once.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_gpt2_jax_filter", False):
        return
    orbax_io = ("async_deserialize", "tensorstore_spec", "write_fragment", "async_serialize", "orbax", "OCDBT")
    # Named in the message (a task's coroutine), or only in the traceback (a bare future's exception:
    # "Future exception was never retrieved", raised by a write of Orbax's async path).
    logging.getLogger("asyncio").addFilter(lambda r: not (
        "exception was never retrieved" in r.getMessage()
        and (any(w in r.getMessage() for w in orbax_io) or _raised_in_orbax(r))))
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


def _raised_in_orbax(record: logging.LogRecord) -> bool:
    """Whether the exception ``record`` logs passed through Orbax's code on its way up."""
    e = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(e.__traceback__) if e is not None else []
    return any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


def _io_reason(e: Exception) -> str:
    """What went wrong in a failed write, in the system's words ("No space left on device")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))  # TensorStore's errors carry the errno
    return os.strerror(int(code.group(1))) if code else describe(e)


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


