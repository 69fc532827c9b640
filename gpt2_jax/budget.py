"""Training to a wall-clock budget (``train --time_budget_minutes=M``): time the first steps, fix the step count once.

How many steps fit in M minutes is known only after some have run, and the learning-rate
schedule must end at the last one. So a budgeted run times its first steps, all inside the
warmup (whose learning rates are the same whatever the total: only the decay depends on it),
then one validation evaluation and one copy of the train state to the host (what a checkpoint
costs the loop: Orbax writes the files in the background). ``steps_in_budget`` turns these into
the most steps whose time, with every evaluation and checkpoint the run will do, fits in the
budget; the training loop records that number in run.json and is step-based from then on, so a
resumed run follows the same schedule and ends at the same step. ``Meter`` does the timing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, TypeVar

# The measurement ends after this many timed steps (the first step, which compiles, is not one of
# them) or this many seconds of them, at the last warmup step, or once the budget is spent.
MEASURE_STEPS = 20
MEASURE_SECONDS = 60.0

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Timings:
    """What a budgeted run measured in its first steps, in seconds."""

    elapsed: float  # since the run started: compilation, the measured steps, the evaluation, the copy
    step: float  # one training step (the mean of the timed ones)
    compile: float  # the first step's extra time: the step compiles once more, for the total
    evaluation: float  # one validation evaluation, with its records and plot
    save: float  # one checkpoint: the train state copied to the host
    final: float  # the test evaluation after the last step

    def to_dict(self) -> dict:
        return {f"{k}_seconds": v for k, v in dataclasses.asdict(self).items()}


def steps_in_budget(budget_s: float, t: Timings, *, done: int, upper: int, eval_every: int, ckpt_every: int,
                    steps_per_epoch: int, ckpt_minutes: float) -> int:
    """The most steps ``n`` (``done < n <= upper``) whose time fits in ``budget_s``; ``done`` if none does.

    Counted after the ``t.elapsed`` seconds of the ``done`` steps already taken: the step compiling
    again, the checkpoint at step ``done`` (which evaluates before the count is fixed), each
    further step, the evaluations (every ``eval_every`` steps, each epoch end, the last step), the
    checkpoints (each evaluation, every ``ckpt_every`` steps, at most one per ``ckpt_minutes`` of
    training) and the test evaluation after the last step.
    """
    spent = t.elapsed + t.compile + t.save
    best = done
    for n in range(done + 1, upper + 1):
        last = t.step + t.evaluation + t.save + t.final  # step n as the last one: evaluated, saved, then the test
        minutes = 0.0 if ckpt_minutes <= 0 else (n - done) * t.step // (60 * ckpt_minutes) * t.save
        if spent + last + minutes > budget_s:
            break  # the cost only grows with n
        best = n
        evaluates = n % eval_every == 0 or n % steps_per_epoch == 0
        spent += t.step + evaluates * t.evaluation + (evaluates or n % ckpt_every == 0) * t.save
    return best


class Meter:
    """Times a budgeted run from step 0: ``tick()`` after each step, ``time(fn)`` the evaluation and the copy.

    ``fake_seconds`` (tests only: ``GPT2_JAX_FAKE_STEP_SECONDS``) makes every step, evaluation
    and copy take exactly that long and compilation nothing, so the step count is reproducible.
    """

    def __init__(self, budget_s: float, warmup: int, *, fake_seconds: float | None = None):
        self.budget_s, self.warmup, self._fake = budget_s, warmup, fake_seconds
        self._virtual = 0.0
        self._start = self._last = self._now()
        self._steps: list[float] = []  # each step's duration, the first (compiling) one included

    def _now(self) -> float:
        return self._virtual if self._fake is not None else time.perf_counter()

    def _advance(self) -> None:
        if self._fake is not None:
            self._virtual += self._fake

    def tick(self) -> bool:
        """One more step finished (the run's steps are timed from step 0); True when the measurement is over."""
        self._advance()
        now = self._now()
        self._steps.append(now - self._last)
        self._last = now
        timed = self._steps[1:]
        return (len(timed) >= MEASURE_STEPS or sum(timed) >= MEASURE_SECONDS or len(self._steps) >= self.warmup
                or now - self._start >= self.budget_s)

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        """``(fn(), its seconds)``."""
        start = self._now()
        out = fn()
        self._advance()
        self._last = self._now()
        return out, self._last - start

    def timings(self, *, evaluation: float, save: float, final: float) -> Timings:
        timed = self._steps[1:] or self._steps  # the budget ran out in the first step: all it has
        step = sum(timed) / len(timed)
        return Timings(elapsed=self._now() - self._start, step=step, compile=max(self._steps[0] - step, 0.0),
                       evaluation=evaluation, save=save, final=final)
