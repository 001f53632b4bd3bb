"""What one trial asks of the cluster, and how many trials run at once.

A trial is a driver (the Tune trial function, which builds and fits the TorchTrainer)
plus its training workers. The driver mostly waits, so it reserves memory and no CPU:
a CPU reserved for it would be one fewer for the workers and for Ray Data's read tasks
(which need a whole CPU each). Pinning drivers to on-demand nodes is a custom resource
in tune.driver_resources that only those nodes offer.
"""

from __future__ import annotations

from ray_app.config import Config
from ray_app.errors import UserError

DRIVER_MEMORY = 256 * 2**20  # bytes; Ray's logical "memory" resource
# Ray Data's read and split tasks of every trial need a whole CPU each.
CPUS_KEPT_FOR_DATA = 1.0


def driver_resources(cfg: Config) -> dict[str, float]:
    return {"memory": DRIVER_MEMORY, **cfg.tune.driver_resources}


def trial_demand(cfg: Config) -> dict[str, float]:
    """Driver plus workers, per trial (workers at tune.workers_per_trial)."""
    workers = cfg.tune.workers_per_trial or cfg.scaling.num_workers
    demand = dict(driver_resources(cfg))
    for name, amount in cfg.scaling.worker_resources().items():
        demand[name] = demand.get(name, 0.0) + amount * workers
    return demand


def concurrent_trials(cfg: Config, cluster: dict[str, float]) -> tuple[int, str]:
    """(trials at once, why): tune.max_concurrent_trials, or what the cluster holds now."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials, "tune.max_concurrent_trials"
    demand = {name: amount for name, amount in trial_demand(cfg).items() if amount > 0}
    missing = [name for name in demand if cluster.get(name, 0.0) <= 0]
    unknown = [name for name in missing if name in cfg.tune.driver_resources]
    if unknown:
        raise UserError(
            f"tune.driver_resources asks for {', '.join(map(repr, unknown))}, which no node of "
            f"the cluster offers (it has {', '.join(sorted(cluster))}). Give the on-demand "
            "nodes that resource (KubeRay: rayStartParams.resources), or leave "
            "tune.driver_resources empty to run drivers anywhere."
        )
    if missing:  # e.g. GPU nodes that an autoscaler has not started yet
        return 1, (f"the cluster has no {', '.join(missing)} yet (autoscaling?); set "
                   "tune.max_concurrent_trials to run more at once")
    fits = {}
    for name, amount in demand.items():
        kept = CPUS_KEPT_FOR_DATA if name == "CPU" else 0.0
        fits[name] = int((cluster[name] - kept) / amount + 1e-9)
    limit = min(fits, key=fits.__getitem__)
    why = f"{limit}: {cluster[limit]:g} in the cluster, {demand[limit]:g} per trial"
    if limit == "CPU":
        why += f", {CPUS_KEPT_FOR_DATA:g} kept for Ray Data"
    return max(1, fits[limit]), why
