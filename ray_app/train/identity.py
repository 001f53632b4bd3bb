"""A run name stands for one config: a rerun resumes it, a different config is refused.

Ray Train resumes whatever run it finds at `<storage>/<name>`, so a name reused by
mistake would silently continue an unrelated run. The first start writes the settings
that shape the training to `<storage>/<name>/ray_app_run.json`; a later start with the
same name must match them. Operational settings (worker counts, intervals, retries,
output folder) may change between attempts.
"""

from __future__ import annotations

import json
from typing import Any

from ray_app.config import Config, EvalSection, TrackingSection, TuneSection
from ray_app.data import storage
from ray_app.errors import UserError
from ray_app.secrets import redact

FILE = "ray_app_run.json"
MAY_CHANGE = {
    "data": {"tokenize_actors", "strict"},
    "train": {"log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "keep_best_by"},
    "scaling": {"num_workers", "min_workers", "resources_per_worker"},
    "run": {"output_dir", "max_failures", "max_preemptions", "preemption_grace_s",
            "preemption_check_every", "record_samples"},
    "tune": set(TuneSection.model_fields),  # searches over runs; never shapes one
    "eval": set(EvalSection.model_fields),  # read by `ray-app eval` only
    "tracking": set(TrackingSection.model_fields),  # where metrics go, not what is trained
}


def identity(cfg: Config) -> dict[str, Any]:
    """The settings a run may not change once started, flattened to dotted keys."""
    out: dict[str, Any] = {}
    # Masked: the file is in storage, and rotated credentials must not block a resume.
    for section, values in redact(cfg.model_dump(mode="json")).items():
        for key, value in values.items():
            if key not in MAY_CHANGE.get(section, set()):
                out[f"{section}.{key}"] = value
    return out


def check_run_identity(cfg: Config) -> bool:
    """Records the run's settings on its first start; returns True when the run already
    existed (this start resumes it). Raises UserError when the settings differ."""
    uri = f"{cfg.storage_uri().rstrip('/')}/{cfg.run.name}/{FILE}"
    mine = identity(cfg)
    if storage.create_once(uri, json.dumps(mine, indent=2, sort_keys=True).encode()):
        return False
    theirs = json.loads(storage.read_text(uri))
    changed = [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}"
               for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise UserError(
            f"run.name {cfg.run.name!r} already exists in {redact(cfg.storage_uri())} with other "
            f"settings ({shown}). Rerunning a name resumes that run, which needs the same "
            f"settings. Choose a new run.name, or delete {redact(uri.rsplit('/', 1)[0])} to start over."
        )
    return True
