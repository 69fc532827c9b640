"""The training loop of ``python -m gpt2_jax.train``, over a run directory ``train.main`` prepared.

Per-epoch progress bars, per-step metrics, evaluations, the loss plot, checkpoints and signals
around the pmapped steps of ``gpt2_jax.core``. At most two steps are in flight on the devices, so
a signal is acted on after the step in flight; every step's randomness comes from (seed, step,
global row), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from tqdm import tqdm

from gpt2_jax import budget, data, parallel, pretrained, rundir
from gpt2_jax import metrics as metrics_lib
from gpt2_jax.checkpoint import Checkpoints
from gpt2_jax.config import GPT2Config
from gpt2_jax.core import (AXIS, TrainConfig, TrainState, init_train_state, make_eval_step, make_optimizer,
                           make_schedule, make_train_step, warmup_steps)
from gpt2_jax.errors import UserError
from gpt2_jax.evaluate import EvalResult


class _StopRequest:
    """Signal handler that only records the signal; the loop saves and exits at the end of its step."""

    def __init__(self):
        self.signum = 0  # 0: none yet

    def __call__(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once, unsaved


class _Diverged(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains."""

    fv: flags.FlagValues
    cfg: GPT2Config
    train_cfg: TrainConfig
    corpus: data.Corpus
    run_dir: pathlib.Path
    spe: int  # steps per epoch
    num_steps: int  # a time budget's count once fixed; until then the most it may fix
    say: Callable[..., None]
    budget_record: dict | None = None  # run.json's time_budget, once a budget fixed the step count

    @property
    def primary(self) -> bool:  # process 0: writes metrics, evaluations and the plot
        return jax.process_index() == 0

    def layout(self) -> dict:
        return {"num_devices": jax.local_device_count(), "process_index": jax.process_index(),
                "process_count": jax.process_count()}


@dataclasses.dataclass
class Loop:
    """What the loop changes besides the devices' state: where it is and what it has not written yet."""

    state: Any  # the TrainState on every local device (``parallel.replicate``)
    step: int
    position: data.DataPosition  # of the data stream after this step's batch
    rng: jax.Array  # the run's dropout key
    step_records: list  # metrics.jsonl up to ``step``
    eval_records: list  # evals.jsonl up to ``step``
    pending: list = dataclasses.field(default_factory=list)  # (step, metrics) still on the devices
    clock: float = dataclasses.field(default_factory=time.perf_counter)  # start of the throughput window
    last_save: float = dataclasses.field(default_factory=time.monotonic)


def start(run_: Run, checkpoints: Checkpoints, optimizer, source) -> Loop:
    """The loop at the newest readable checkpoint, or at step 0 (random or --init_from weights)."""
    cfg, train_cfg = run_.cfg, run_.train_cfg
    params_key, dropout_key = jax.random.split(jax.random.PRNGKey(train_cfg.seed))
    init = functools.partial(init_train_state, cfg, optimizer)
    abstract = jax.eval_shape(init, params_key)
    restored = checkpoints.restore(abstract.params, abstract.opt_state, model=cfg.architecture())
    if jax.process_count() > 1:
        found = multihost_utils.process_allgather(np.int32(-1 if restored is None else restored.step))
        if len(set(found.tolist())) > 1:
            raise UserError(f"the processes found different checkpoints in {run_.run_dir} (steps "
                            f"{sorted(set(found.tolist()))}); --run_dir must be one folder all processes see")
    if restored is None:
        state = jax.jit(init)(params_key) if source is None else _pretrained_state(source, cfg, optimizer, run_.say)
        position, rng = data.DataPosition(), dropout_key
        if jax.process_count() > 1:  # every process starts from process 0's bits, whatever its float rounding
            state = state.replace(params=multihost_utils.broadcast_one_to_all(state.params))
    else:
        state = TrainState(params=restored.params, opt_state=restored.opt_state,
                           step=jnp.asarray(restored.step, jnp.int32))
        position = data.DataPosition.from_dict(restored.meta["data_position"])
        rng = jnp.asarray(restored.meta["rng"], jnp.uint32)
        assert position == data.DataPosition(*divmod(restored.step, run_.spe)), (position, restored.step)
        if run_.train_cfg.time_budget_minutes is not None and run_.budget_record is None:  # saved only once fixed
            raise UserError(f"{run_.run_dir / rundir.RUN_FILE} has no time_budget record, yet a checkpoint (step "
                            f"{restored.step}) exists; restore run.json from a copy")
        checkpoints.prune()  # what a kill stopped Orbax from removing
        run_.say(f"resuming {run_.run_dir} from step {restored.step} (epoch {restored.step / run_.spe:.2f})")
    step = int(state.step)
    paths = run_.run_dir / rundir.METRICS_FILE, run_.run_dir / rundir.EVALS_FILE
    if run_.primary:
        for path in paths:
            metrics_lib.drop_records_after(path, step)  # written after the checkpoint, recomputed identically
    # Every process reads the records: what is left to evaluate at the end is decided the same way everywhere.
    step_records, eval_records = ([r for r in metrics_lib.read_jsonl(p) if r["step"] <= step] for p in paths)
    return Loop(state=parallel.replicate(state, jax.local_devices()), step=step, position=position, rng=rng,
                 step_records=step_records, eval_records=eval_records)


def _pretrained_state(source: pretrained.Pretrained, cfg: GPT2Config, optimizer, say) -> TrainState:
    """Step 0 of a fine-tuning run: PATH's weights (at ``cfg``'s context) and a fresh optimizer."""
    params, from_step = pretrained.load_params(source)
    params = pretrained.fit_context(params, cfg.n_ctx)
    where = f"{source.path} (step {from_step})" if source.kind == "run" else str(source.path)
    shorter = f", its first {cfg.n_ctx} of {source.cfg.n_ctx} positions" if cfg.n_ctx < source.cfg.n_ctx else ""
    say(f"fine-tuning {where} at context {cfg.n_ctx}{shorter}")
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def _evaluate(run_: Run, loop: Loop, p_eval: Callable, split: str) -> dict:
    """Score ``split`` at the loop's step; record it (evals.jsonl, the plot) and say it."""
    step, spe, cfg = loop.step, run_.spe, run_.cfg
    tokens = run_.corpus.tokens[split]
    nll, count = parallel.evaluate(p_eval, loop.state.params, data.eval_batches(
        tokens, seq_len=cfg.n_ctx, batch_size=run_.fv.eval_batch_size or run_.train_cfg.batch_size,
        **run_.layout()))
    assert count == len(tokens) - 1, (count, len(tokens))  # each target once
    since = max([r["step"] for r in loop.eval_records if r["split"] == "validation" and r["step"] < step],
                default=0)
    recent = [r["loss"] for r in loop.step_records if since < r["step"] <= step]
    res = EvalResult(split=split, nll_sum=nll, tokens=int(count), words=run_.corpus.words[split],
                     bytes=run_.corpus.bytes[split], seq_len=cfg.n_ctx, stride=None)
    rec = {"step": step, "epoch": step / spe, "split": split, "loss": res.mean_nll, "ppl": res.token_ppl,
           "word_ppl": res.word_ppl, "bits_per_byte": res.bits_per_byte, "tokens": res.tokens,
           "train_loss": float(np.mean(recent)) if recent else None}
    loop.eval_records.append(rec)
    if run_.primary:
        metrics_lib.append_jsonl(run_.run_dir / rundir.EVALS_FILE, [rec])
        metrics_lib.plot_losses(loop.step_records, loop.eval_records, run_.run_dir / rundir.PLOT_FILE,
                                steps_per_epoch=spe, vocab_size=cfg.vocab_size,
                                title=f"{run_.run_dir.name}: {run_.fv.size}, batch {run_.train_cfg.batch_size}x"
                                      f"{cfg.n_ctx}, lr {run_.train_cfg.lr:g}")
    run_.say(f"step {step} (epoch {step / spe:.2f}): {split} loss {rec['loss']:.4f}, ppl {rec['ppl']:.2f}, "
             f"word ppl {rec['word_ppl']:.2f}")
    return rec


def _fetch_metrics(run_: Run, loop: Loop, bar, keep_last: bool) -> None:
    """Write the pending steps' metrics (all, or all but the newest, so the device queue never drains)."""
    take = loop.pending[:-1] if keep_last else loop.pending[:]
    if not take:
        return
    del loop.pending[:len(take)]
    host = jax.device_get([m for _, m in take])
    now = time.perf_counter()
    tps = sum(float(m["tokens"][0]) for m in host) / max(now - loop.clock, 1e-9)
    loop.clock = now
    recs = [{"step": s, "epoch": s / run_.spe, **{k: float(v[0]) for k, v in m.items() if k != "tokens"},
             "tokens_per_s": tps} for (s, _), m in zip(take, host)]
    loop.step_records.extend(recs)
    if run_.primary:
        metrics_lib.append_jsonl(run_.run_dir / rundir.METRICS_FILE, recs)
    # The metrics are all-reduced: every process sees the same values and stops at the same step.
    bad = [r for r in recs if not all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "param_norm"))]
    if bad:
        raise _Diverged(bad[0])
    bar.set_postfix(loss=f"{recs[-1]['loss']:.3f}", lr=f"{recs[-1]['lr']:.2e}", tok_s=f"{tps:,.0f}")


def _save(run_: Run, loop: Loop, checkpoints: Checkpoints, val_loss: float | None) -> None:
    loop.last_save = time.monotonic()
    checkpoints.save(loop.step, params=parallel.unreplicate_global(loop.state.params),
                     opt_state=parallel.unreplicate_global(loop.state.opt_state),
                     meta={"step": loop.step, "model": run_.cfg.architecture(),
                           "data_position": loop.position.to_dict(), "rng": np.asarray(loop.rng).tolist(),
                           "num_devices": jax.device_count(), "num_processes": jax.process_count()},
                     val_loss=val_loss)


def train(run_: Run, checkpoints: Checkpoints, source: pretrained.Pretrained | None) -> int:
    """Resume (or start) the run and train it to its last step, or to a signal; 0 when done."""
    fv, cfg, train_cfg, spe = run_.fv, run_.cfg, run_.train_cfg, run_.spe
    loop = start(run_, checkpoints, make_optimizer(train_cfg, run_.num_steps), source)
    p_train = _pmapped_step(cfg, train_cfg, run_.num_steps)
    p_eval = jax.pmap(make_eval_step(cfg), axis_name=AXIS, in_axes=(None, 0), devices=jax.devices())
    batches = parallel.prefetch_to_devices(data.train_batches(
        run_.corpus.tokens["train"], seq_len=cfg.n_ctx, global_batch=train_cfg.batch_size, seed=train_cfg.seed,
        start=loop.position, **run_.layout()), parallel.device_sharding(jax.local_devices()))
    # A time budget: until its step count is fixed (at fix_step) the first steps are timed, and nothing is
    # evaluated or saved before fix_step, so every checkpoint belongs to the fixed schedule.
    budgeted = train_cfg.time_budget_minutes is not None
    fix_step = None if run_.budget_record is None else run_.budget_record["fixed_at_step"]
    meter = (budget.Meter(60 * train_cfg.time_budget_minutes, warmup_steps(train_cfg, run_.num_steps),
                          fake_seconds=fake_step_seconds()) if budgeted and fix_step is None else None)
    if fv.init_from is not None and loop.step == 0 and not any(r["step"] == 0 for r in loop.eval_records):
        _evaluate(run_, loop, p_eval, "validation")  # a fine-tuning run's start: PATH's own validation loss
    stop, bar, check_in = _StopRequest(), None, parallel.CheckIns(loop.step)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while loop.step < run_.num_steps:
            if bar is None:
                bar = _progress_bar(run_, loop.step)
                loop.clock = time.perf_counter()
            loop.position, batch = next(batches)  # the position after this batch: saved with its state
            loop.state, m = p_train(loop.state, batch, loop.rng)
            loop.step += 1
            loop.pending.append((loop.step, m))
            if len(loop.pending) > 1:  # at most two steps on the devices: a signal waits for one step only
                jax.block_until_ready(loop.pending[-2][1])
            bar.update(1)
            evaluated = None
            if meter is not None:
                jax.block_until_ready(m)  # timed alone
                if _agree(meter.tick()):  # the measurement is over: fix the step count at this step
                    fix_step = loop.step
                    run_, evaluated = _fix_steps(run_, loop, meter, p_eval, bar)
                    p_train, meter = _pmapped_step(cfg, train_cfg, run_.num_steps), None  # compiles again
                    bar.close()
                    bar = _progress_bar(run_, loop.step)
            early = budgeted and (fix_step is None or loop.step < fix_step)
            signum = _after_step(run_, loop, checkpoints, p_eval, bar, check_in, stop.signum, early=early,
                                 evaluated=evaluated, fix_step=fix_step)
            if signum:
                bar.close()
                checkpoints.finish()
                if run_.primary:
                    print(_stopped(run_, loop.step, signum, saved=not early), file=sys.stderr)
                return 0
            if loop.step % spe == 0 or loop.step == run_.num_steps:
                bar.close()
                bar = None
    except _Diverged as e:
        if bar is not None:
            bar.close()
        checkpoints.finish()
        raise _diverged(run_, checkpoints, e.args[0]) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    _finish(run_, loop, p_eval, checkpoints)
    return 0


def _after_step(run_: Run, loop: Loop, checkpoints: Checkpoints, p_eval: Callable, bar,
                check_in: parallel.CheckIns, signum: int, *, early: bool = False, evaluated: dict | None = None,
                fix_step: int | None = None) -> int:
    """Metrics, evaluation and a checkpoint where due after ``loop.step``; the signal to stop on, or 0.

    A time budget's run: ``early`` (before ``fix_step``, where its step count is fixed) evaluates and
    saves nothing; ``fix_step`` evaluates and saves, ``evaluated`` its validation record if made already.
    """
    fv, step = run_.fv, loop.step
    do_eval = not early and evaluated is None and (
        step % fv.eval_every == 0 or step % run_.spe == 0 or step == run_.num_steps or step == fix_step)
    # Signals and the save clock are per process; several processes act on them together at
    # check-ins (scheduled saves, and a few seconds apart), one process at every step.
    agreed, overdue = 0, False
    if jax.process_count() == 1 or do_eval or step % fv.ckpt_every == 0 or step >= check_in.next_step:
        due = fv.ckpt_minutes > 0 and time.monotonic() - loop.last_save >= 60 * fv.ckpt_minutes
        agreed, overdue = check_in(step, signum, due, fv.log_every)
    do_save = not early and (do_eval or evaluated is not None or step % fv.ckpt_every == 0 or overdue or agreed != 0)
    if do_eval or do_save or len(loop.pending) > fv.log_every:
        # All of them before an evaluation or a save: a checkpoint is only written once its losses are finite.
        _fetch_metrics(run_, loop, bar, keep_last=not (do_eval or do_save))
    if do_eval:
        evaluated = _evaluate(run_, loop, p_eval, "validation")
    val_loss = None if evaluated is None else evaluated["loss"]
    if do_save:
        _save(run_, loop, checkpoints, val_loss)
    if do_eval or evaluated is not None:
        loop.clock = time.perf_counter()  # evaluation and saving are not training throughput
    return agreed


def _pmapped_step(cfg: GPT2Config, train_cfg: TrainConfig, num_steps: int) -> Callable:
    """The train step of a ``num_steps`` run under pmap over every device: the state (donated) in and out
    without a device axis (``parallel.replicate``), the batch and the metrics with one."""
    step = make_train_step(cfg, make_optimizer(train_cfg, num_steps), make_schedule(train_cfg, num_steps))
    return jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, None), out_axes=(None, 0), donate_argnums=(0,),
                    devices=jax.devices())


def _progress_bar(run_: Run, step: int):
    epoch, spe, n = step // run_.spe, run_.spe, run_.num_steps
    return tqdm(total=min(spe, n - epoch * spe), initial=step - epoch * spe, desc=f"epoch {epoch + 1}/{-(-n // spe)}",
                unit="step", disable=run_.fv.quiet or not run_.primary, dynamic_ncols=True, file=sys.stderr)


# Test hook: every step, evaluation and host copy of a time-budgeted run then "takes" this many seconds
# (budget.Meter), so the step count it fixes is the same in every run of a test.
FAKE_STEP_SECONDS_ENV = "GPT2_JAX_FAKE_STEP_SECONDS"


def fake_step_seconds() -> float | None:
    text = os.environ.get(FAKE_STEP_SECONDS_ENV)
    try:
        seconds = None if text is None else float(text)
    except ValueError:
        seconds = math.nan
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"${FAKE_STEP_SECONDS_ENV}={text} must be a number of seconds > 0 (a test hook; unset it)")
    return seconds


def _agree(value: int) -> int:
    """Process 0's ``value`` in every process: what one decides from its own clock, all must do alike."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _diverged(run_: Run, checkpoints: Checkpoints, r: dict) -> UserError:
    good = (checkpoints.steps() or [None])[-1]
    kept = f"the last good checkpoint, step {good}, is kept" if good is not None else "no checkpoint was saved"
    return UserError(f"training diverged at step {r['step']} (loss {r['loss']}, grad norm {r['grad_norm']}, "
                     f"param norm {r['param_norm']}); stopped, {kept} in {run_.run_dir}; "
                     f"lower --lr (now {run_.train_cfg.lr:g}) or raise --warmup_steps")


def _stopped(run_: Run, step: int, signum: int, *, saved: bool) -> str:
    name = signal.Signals(signum).name
    if saved:
        return f"stopped by {name} at step {step}: checkpoint saved in {run_.run_dir}; run the same command to resume"
    return (f"stopped by {name} at step {step}, before a time-budgeted run saves (from the step where its step count "
            f"is fixed): nothing saved in {run_.run_dir}; run the same command to start again")


def _fix_steps(run_: Run, loop: Loop, meter: budget.Meter, p_eval: Callable, bar) -> tuple[Run, dict]:
    """Fix the time budget's step count at ``loop.step`` from the timings so far (one validation
    evaluation, timed, and one host copy of the state among them); record it in run.json.

    -> (the run with that step count, the evaluation's record).
    """
    fv, train_cfg, corpus = run_.fv, run_.train_cfg, run_.corpus
    _fetch_metrics(run_, loop, bar, keep_last=False)
    evaluated, eval_s = meter.time(lambda: _evaluate(run_, loop, p_eval, "validation"))
    state_0 = jax.tree.map(lambda x: x.addressable_shards[0].data, loop.state)
    _, save_s = meter.time(lambda: jax.device_get(state_0))  # what a checkpoint holds the loop up for
    timings = meter.timings(evaluation=eval_s, save=save_s,
                            final=eval_s * len(corpus.tokens["test"]) / len(corpus.tokens["validation"]))
    n = _agree(budget.steps_in_budget(60 * train_cfg.time_budget_minutes, timings, done=loop.step,
                                      upper=run_.num_steps, eval_every=fv.eval_every, ckpt_every=fv.ckpt_every,
                                      steps_per_epoch=run_.spe, ckpt_minutes=fv.ckpt_minutes))
    warmup = warmup_steps(train_cfg, run_.num_steps)
    measured = (f"{timings.step:.3g} s a step, {eval_s:.3g} s an evaluation, {timings.elapsed:.0f} s spent in "
                f"the first {loop.step} steps")
    if n <= warmup:
        bar.close()
        raise UserError(f"--time_budget_minutes={train_cfg.time_budget_minutes:g} ends the run at step {n} "
                        f"({measured}), within the {warmup} warmup steps; raise it (in a new --run_dir) or lower "
                        f"--warmup_steps")
    if run_.primary:
        record = {"minutes": train_cfg.time_budget_minutes, "fixed_at_step": loop.step, "steps": n,
                  "upper_bound_steps": run_.num_steps, **timings.to_dict()}
        if fake_step_seconds() is not None:
            record["fake_step_seconds"] = fake_step_seconds()
        rundir.write_run_json(run_.run_dir, {**rundir.read_run_json(run_.run_dir), "total_steps": n,
                                             "time_budget": record})
    run_.say(f"time budget {train_cfg.time_budget_minutes:g} min: {n} steps ({measured})")
    return dataclasses.replace(run_, num_steps=n), evaluated


def _finish(run_: Run, loop: Loop, p_eval: Callable, checkpoints: Checkpoints) -> None:
    """The last step's validation (done in the loop unless resumed right here), the test split, a summary."""
    done = {(r["split"], r["step"]) for r in loop.eval_records}
    val, test = (next(r for r in reversed(loop.eval_records) if r["split"] == split) if (split, loop.step) in done
                 else _evaluate(run_, loop, p_eval, split) for split in ("validation", "test"))
    checkpoints.finish()
    tps = float(np.median([r["tokens_per_s"] for r in loop.step_records])) if loop.step_records else float("nan")
    if run_.primary:
        print(f"done: {loop.step} steps ({loop.step / run_.spe:.2f} epochs); validation loss {val['loss']:.4f} "
              f"(ppl {val['ppl']:.2f}), test loss {test['loss']:.4f} (ppl {test['ppl']:.2f}, "
              f"word ppl {test['word_ppl']:.2f}); median {tps:,.0f} tokens/s; plot {run_.run_dir / rundir.PLOT_FILE}",
              file=sys.stderr)
