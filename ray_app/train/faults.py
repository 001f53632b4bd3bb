"""Fault injection for recovery tests and drills (never set in normal runs)."""

from __future__ import annotations

import os

# The worker group raises once at this step, on a fresh (not resumed) attempt.
FAIL_AT_STEP_ENV = "RAY_APP_FAIL_AT_STEP"


def fail_at_step() -> int:
    return int(os.environ.get(FAIL_AT_STEP_ENV, "0") or 0)
