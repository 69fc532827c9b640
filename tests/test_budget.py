"""Training to a time budget: the step count that fits, and the timing of the first steps.

The training CLI's budgeted runs (killed and resumed, ending on the schedule's last step, a budget
too small) are in ``test_train.py``, beside the other CLI runs.
"""

import pytest

from gpt2_jax import budget


def _timings(**overrides):
    t = {"elapsed": 10.0, "step": 1.0, "compile": 5.0, "evaluation": 3.0, "save": 2.0, "final": 4.0}
    return budget.Timings(**{**t, **overrides})


def _steps(budget_s, timings, *, done=10, upper=1000, eval_every=10, ckpt_every=5, steps_per_epoch=10_000,
           ckpt_minutes=0.0):
    return budget.steps_in_budget(budget_s, timings, done=done, upper=upper, eval_every=eval_every,
                                  ckpt_every=ckpt_every, steps_per_epoch=steps_per_epoch, ckpt_minutes=ckpt_minutes)


def test_steps_in_budget_counts_compilation_every_step_evaluation_checkpoint_and_the_test_split():
    t = _timings()
    # Before step 11: 10 s spent, 5 s compiling again, 2 s for the checkpoint at step 10 = 17 s.
    # The last step n costs its step, its evaluation, its checkpoint and the test split: 1 + 3 + 2 + 4 = 10 s.
    assert _steps(27.0, t) == 11  # 17 + 10
    assert _steps(26.9, t) == 10  # not even one step more: the caller refuses the budget
    # Steps 11..19 before step 20: 9 s, plus the checkpoint at 15 (2 s): 17 + 11 + 10 = 38 s.
    assert _steps(38.0, t) == 20 and _steps(37.9, t) == 19
    # Step 20 itself, not the last: 1 s, an evaluation and its checkpoint (5 s): 38 - 10 + 6 + 10 = 44 s for 21.
    assert _steps(44.0, t) == 21 and _steps(43.9, t) == 20
    assert _steps(1e9, t, upper=50) == 50  # --max_steps / --epochs come first


def test_steps_in_budget_counts_epoch_end_evaluations_and_the_saves_of_ckpt_minutes():
    t = _timings(elapsed=0.0, compile=0.0, evaluation=0.0, save=1.0, final=0.0, step=30.0)
    # A save every 60 s of training, at most: n steps of 30 s cost 30 n + 1 (step 0's) + 1 (the last) + n // 2.
    assert [_steps(b, t, done=0, eval_every=10**6, ckpt_every=10**6, ckpt_minutes=1.0) for b in (93, 92.9)] == [3, 2]
    t = _timings(elapsed=0.0, compile=0.0, evaluation=100.0, save=0.0, final=0.0, step=1.0)
    # Epoch ends (every 5 steps) evaluate like --eval_every: 100 s each.
    assert _steps(4 + 100 + 0.5, t, done=0, eval_every=10**6, ckpt_every=10**6, steps_per_epoch=5) == 4
    assert _steps(6 + 200, t, done=0, eval_every=10**6, ckpt_every=10**6, steps_per_epoch=5) == 6


@pytest.mark.parametrize("fake,warmup,budget_s,ticks", [
    (0.5, 100, 1e9, 21),  # 20 timed steps after the first
    (4.0, 100, 1e9, 16),  # 60 s of timed steps: 15 of 4 s
    (0.5, 5, 1e9, 5),  # the last warmup step
    (0.5, 100, 1.0, 2),  # the budget is spent
])
def test_the_measurement_ends_at_20_timed_steps_60_seconds_the_warmup_end_or_the_budget(fake, warmup, budget_s, ticks):
    meter = budget.Meter(budget_s, warmup, fake_seconds=fake)
    assert [meter.tick() for _ in range(ticks)] == [False] * (ticks - 1) + [True]


def test_meter_takes_the_first_step_as_compilation_and_averages_the_timed_ones(monkeypatch):
    now = iter([100.0, 112.0, 113.0, 115.0, 118.0, 120.0, 120.0])  # start, 3 steps, an evaluation 118-120, now
    monkeypatch.setattr(budget.time, "perf_counter", lambda: next(now))
    meter = budget.Meter(1e9, 100)
    assert [meter.tick() for _ in range(3)] == [False] * 3
    assert meter.time(lambda: "evaluated") == ("evaluated", 2.0)
    t = meter.timings(evaluation=2.0, save=0.5, final=2.5)
    assert t == budget.Timings(elapsed=20.0, step=1.5, compile=10.5, evaluation=2.0, save=0.5, final=2.5)
    assert t.to_dict()["compile_seconds"] == 10.5


def test_fake_seconds_make_every_step_evaluation_and_copy_take_exactly_that():
    meter = budget.Meter(1e9, 100, fake_seconds=0.25)
    for _ in range(4):
        meter.tick()
    _, seconds = meter.time(lambda: None)
    assert seconds == 0.25
    assert meter.timings(evaluation=seconds, save=0.25, final=0.3) == budget.Timings(
        elapsed=1.25, step=0.25, compile=0.0, evaluation=0.25, save=0.25, final=0.3)
