"""The speed a run reports: steady-state tokens/s after the warm-up steps, the whole-run
average, time to first step and warm-up, from the worker's wall clock with evaluation and
checkpoints left out. Steps of known tokens and durations go through the worker's
`Reporter` on a fake clock; the expected figures are counted here, from the schedule."""

from __future__ import annotations

import pytest

from ray_app.summary import speed
from ray_app.train import checkpoint as ckpt
from ray_app.train import reporting
from ray_app.train.reporting import WARMUP_STEPS, Reporter
from ray_app.train.steps import StepResult

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reporter(clock: Clock, state: ckpt.LoopState) -> Reporter:
    """A Reporter without Ray Train around it: only what add_step and speed use."""
    reporter = Reporter.__new__(Reporter)
    reporter.state, reporter.worker_started = state, clock()
    reporter.clock, reporter.attempt_steps = None, 0
    reporter._reset_window()
    return reporter


def test_summary_speed_splits_warm_up_from_the_steady_state_and_leaves_pauses_out(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(reporting.time, "perf_counter", clock)
    state = ckpt.LoopState()
    reporter = _reporter(clock, state)
    clock.now += 30.0  # loading the model, the first eval
    # (tokens, seconds) per step: three slow warm-up steps (compilation), then steady ones;
    # an eval of 50 s after step 6 must not count.
    schedule = [(1000, 20.0), (1000, 5.0), (1000, 2.0)] + [(1000, 1.0)] * 3 + [(500, 0.5)] * 4
    for i, (tokens, seconds) in enumerate(schedule):
        queued_at = clock()
        clock.now += seconds
        reporter.add_step(StepResult(1.0, tokens, 0.5, {}), queued_at)
        state.tokens_seen += tokens
        if i == 5:
            clock.now += 50.0
            reporter.pause()
    figures = speed(reporter.speed())

    warm, steady = schedule[:WARMUP_STEPS], schedule[WARMUP_STEPS:]
    steady_rate = sum(t for t, _ in steady) / sum(s for _, s in steady)
    assert figures["tokens_per_s"] == pytest.approx(steady_rate) == pytest.approx(1000.0)
    assert figures["tokens_per_s_whole_run"] == pytest.approx(
        sum(t for t, _ in schedule) / sum(s for _, s in schedule))
    assert figures["train_seconds"] == pytest.approx(32.0)  # 27 + 3 + 2: no eval, no loading
    assert figures["time_to_first_step_s"] == pytest.approx(30.0 + 20.0)
    # The warm-up steps' 27 s against the 3 s their 3,000 tokens take at the steady rate.
    assert figures["warmup_s"] == pytest.approx(sum(s for _, s in warm) - 3000 / steady_rate)


def test_pipelined_steps_are_timed_between_the_reads_of_their_results(monkeypatch):
    """The loop reads step N after queuing step N+1: each step's time runs from the read of
    the one before (data hand-off and reports included), not from when it was queued."""
    clock = Clock()
    monkeypatch.setattr(reporting.time, "perf_counter", clock)
    state = ckpt.LoopState()
    reporter = _reporter(clock, state)
    reads = [100.0 + 4 * i for i in range(1, 8)]  # a result every 4 s
    for i, read_at in enumerate(reads):
        queued_at = read_at - 7.5  # queued long before: the device runs one step behind
        clock.now = read_at
        reporter.add_step(StepResult(1.0, 400, 0.5, {}), queued_at)
    assert state.train_seconds == pytest.approx(7.5 + 4 * (len(reads) - 1))
    assert state.steady_tokens / state.steady_seconds == pytest.approx(100.0)


def test_a_run_with_no_steps_after_warm_up_reports_the_whole_run_average():
    figures = speed({"train_seconds": 4.0, "tokens_seen": 800, "warmup_seconds": 4.0,
                     "warmup_tokens": 800, "steady_seconds": 0.0, "steady_tokens": 0,
                     "first_step_s": 9.0})
    assert figures["tokens_per_s"] == figures["tokens_per_s_whole_run"] == 200.0
    assert figures["warmup_s"] is None and figures["time_to_first_step_s"] == 9.0
