"""Fault injection for recovery tests and drills (never set in normal runs).

Both act once, on a fresh (not resumed) attempt, at the given optimizer step:
- RAY_APP_FAIL_AT_STEP: every worker raises, like a crashed worker group;
- RAY_APP_SIGTERM_AT_STEP: rank 0's process gets a real SIGTERM, like an evicted pod.
RAY_APP_STEP_DELAY_S slows every step down, so that a drill can act mid-run;
RAY_APP_SHRUNK_STEP_DELAY_S slows the steps of an elastic run that has fewer workers than
it asked for, so that a drill sees it grow back before it ends.
"""

from __future__ import annotations

import os
import signal
import time

FAIL_AT_STEP_ENV = "RAY_APP_FAIL_AT_STEP"
SIGTERM_AT_STEP_ENV = "RAY_APP_SIGTERM_AT_STEP"
STEP_DELAY_ENV = "RAY_APP_STEP_DELAY_S"
SHRUNK_STEP_DELAY_ENV = "RAY_APP_SHRUNK_STEP_DELAY_S"


def injected_faults() -> dict[str, float]:
    """Read on the driver, passed to the workers in the loop config."""
    return {"fail_at_step": int(os.environ.get(FAIL_AT_STEP_ENV) or 0),
            "sigterm_at_step": int(os.environ.get(SIGTERM_AT_STEP_ENV) or 0),
            "step_delay_s": float(os.environ.get(STEP_DELAY_ENV) or 0),
            "shrunk_step_delay_s": float(os.environ.get(SHRUNK_STEP_DELAY_ENV) or 0)}


def inject(faults: dict[str, float], step: int, rank: int, resumed: bool,
           shrunk: bool = False) -> None:
    """`shrunk`: the run has fewer workers than it asked for."""
    delay = faults.get("step_delay_s", 0) + (faults.get("shrunk_step_delay_s", 0) if shrunk else 0)
    if delay:
        time.sleep(delay)
    if resumed:
        return
    if step == faults.get("fail_at_step"):
        raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")
    if step == faults.get("sigterm_at_step") and rank == 0:
        from ray_app.train.preemption import SIGTERM_SEEN

        os.kill(os.getpid(), signal.SIGTERM)
        # The handler runs on the main thread, this loop on another: wait until it has run,
        # so the notice is seen at this step's boundary, as a real one would be at some step.
        if not SIGTERM_SEEN.wait(timeout=60):
            raise RuntimeError("the SIGTERM handler did not run within 60 s")
