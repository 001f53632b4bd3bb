"""Checkpoint on a preemption notice instead of losing the steps since the last one.

Two notices are watched at every step boundary:
- Ray's drain signal for a node about to be reclaimed (`ray.train.get_preemption_info()`,
  fed by the cloud provider through the autoscaler/KubeRay): the workers write a
  checkpoint and keep training; when the node goes, Ray Train restarts the group from it.
- SIGTERM to a worker process (Kubernetes evicting the pod, a spot agent, `kill`): the
  process does not die at once; the workers write a checkpoint at the next step boundary
  and stop, and Ray Train restarts the group from it on the remaining or replacement
  nodes. If no step boundary comes within `run.preemption_grace_s`, the process exits
  anyway (the last periodic checkpoint then applies).

Ray Train runs the training function in a thread, and only a process's main thread may
set signal handlers, so the SIGTERM handler is installed through the torch backend's
start hook, which runs on the worker actor's main thread.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_SIGTERM_AT: list[float] = []  # when this process got SIGTERM (empty: not yet)
SIGTERM_SEEN = threading.Event()  # set by the handler (it runs on the main thread)


class PreemptedError(RuntimeError):
    """Raised by every worker after the preemption checkpoint, so Ray Train restarts."""


def install_sigterm_handler(grace_s: float) -> None:
    def on_sigterm(signum, frame) -> None:
        if not _SIGTERM_AT:
            _SIGTERM_AT.append(time.monotonic())
            SIGTERM_SEEN.set()
            timer = threading.Timer(grace_s, os._exit, args=(1,))  # no step boundary in time
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    # System calls that the signal interrupts (socket reads of a collective) are restarted
    # rather than failed with EINTR.
    signal.siginterrupt(signal.SIGTERM, False)


class _PreemptibleBackend(_TorchBackend):
    def on_training_start(self, worker_group, backend_config) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_sigterm_handler, backend_config.preemption_grace_s)


@dataclass
class PreemptibleTorchConfig(TorchConfig):
    """TorchConfig whose workers turn SIGTERM into a checkpoint at the next step."""

    preemption_grace_s: float = 60.0

    @property
    def backend_cls(self):
        return _PreemptibleBackend


class PreemptionWatch:
    """Asked once per optimizer step on every rank; all ranks get the same answer.

    `agree(values, "max")` is the engine's host-side agreement over the data-parallel ranks
    (`Engine.agree`), so that asking never waits for the device's queued work."""

    DRAIN, SIGTERM = 1, 2

    def __init__(self, check_every: int, agree: Callable[[list[int], str], list[int]]):
        self.check_every = check_every
        self.agree = agree
        self.drain_checkpointed = False

    def poll(self, step: int) -> int:
        """0, DRAIN (checkpoint, keep going) or SIGTERM (checkpoint, then stop)."""
        import ray.train

        flag = self.SIGTERM if _SIGTERM_AT else 0
        # A barrier: every rank must call it at the same steps, whatever its own flag.
        due = self.check_every and step % self.check_every == 0 and not self.drain_checkpointed
        if due and ray.train.get_preemption_info() is not None:
            flag = max(flag, self.DRAIN)
            self.drain_checkpointed = True  # the same on every rank: the info is shared
        return self.agree([flag], "max")[0]
