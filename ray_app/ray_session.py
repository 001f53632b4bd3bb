"""Connecting to Ray: a fresh local cluster, or an existing one given by `--address`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from urllib.parse import urlparse

from rich.console import Console

from ray_app.errors import UserError

# Ray's per-report health check defaults to 2 s, which dominates short steps.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train V2 writes its own status lines; keep them in the log files, not on the console.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# The dashboard's Train page (runs, workers, their logs) needs Ray Train's state actor. Read
# by the process that builds the trainer: this driver, or the task of a Ray client session.
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")


def is_dashboard_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def connect(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> str:
    """Starts or joins a Ray cluster; returns the dashboard URL (may be empty)."""
    import ray

    if address and address.startswith("ray://"):
        _check_reachable(address)
    if ray.is_initialized():
        return ""
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(quiet)
    local = not address and not os.environ.get("RAY_ADDRESS")
    try:
        with _own_dashboard() if local else contextlib.nullcontext({}) as dashboard:
            context = _init_with_retries(
                address=address, num_cpus=num_cpus if not address else None,
                logging_level=quiet, log_to_driver=verbose, configure_logging=True,
                runtime_env={"env_vars": _propagated_env()} if address else None,
                **dashboard,
            )
    except ConnectionError as err:
        raise UserError(
            f"Cannot connect to the Ray cluster at {address!r}: {err}. Start one with "
            "`ray start --head`, pass `--address ray://HOST:10001` for a remote cluster "
            "(with RAY_AUTH_MODE=token and the cluster's token when token auth is on), or "
            "leave --address out to start a local cluster."
        ) from None
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        _quiet_console_handlers("ray.data")
    return getattr(context, "dashboard_url", "") or ""


_API_SERVER_VAR = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def _own_dashboard():
    """A new local cluster's dashboard port, named to the cluster's processes.

    Ray's processes reach their cluster's state API through a Ray instance they look for
    on this machine unless something names it. With two local clusters on one machine (two
    runs at once, or parallel test workers) that lookup fails, and Ray Train's
    placement-group cleaner dies with it: a Tune trial that ASHA stops then keeps its
    workers' CPUs reserved until the driver exits, and later trials wait for them. The
    variable is set only while `ray.init` starts the cluster's processes (they inherit
    it): in this process it would redirect every later Jobs SDK call to this dashboard."""
    if os.environ.get(_API_SERVER_VAR):  # the user's own setting
        yield {}
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ[_API_SERVER_VAR] = f"http://127.0.0.1:{port}"
    try:
        yield {"dashboard_port": port}
    finally:
        del os.environ[_API_SERVER_VAR]


# A Ray client server dies now and then while its proxy forks it (a gRPC poller race,
# ray-project/ray#63202); a new connection gets a new server, so the error is retried. The
# proxy reports that death in two ways: its wait for the server's channel times out, or
# reading the dead server's command line finds a zombie.
_CLIENT_SERVER_DIED = ("Starting Ray client server failed", "ZombieProcess")
CLIENT_CONNECT_ATTEMPTS = 3


def _init_with_retries(**init_kwargs):
    import ray

    for attempt in range(1, CLIENT_CONNECT_ATTEMPTS + 1):
        try:
            return ray.init(**init_kwargs)
        except ConnectionError as err:
            died = any(marker in str(err) for marker in _CLIENT_SERVER_DIED)
            if not died or attempt == CLIENT_CONNECT_ATTEMPTS:
                raise
            logging.getLogger("ray_app").warning(
                "The Ray client server failed to start (attempt %d of %d); connecting again.",
                attempt, CLIENT_CONNECT_ATTEMPTS)
            time.sleep(attempt)
    raise AssertionError("unreachable")


def on_cluster(fn, *args):
    """fn(*args) here, or, from a Ray client session, in a task on the cluster: Ray Data
    and Ray Train need a driver with a full Ray worker, which a client session lacks.
    `fn`'s result travels back; the task's console output stays in the cluster's logs
    (`ray-app submit` / `ray_app.submit` follow long runs live)."""
    import ray

    if not ray.util.client.ray.is_connected():
        return fn(*args)
    # A Console holds locks and cannot travel: the task makes a plain one of its own.
    args = tuple(_ConsoleInTask() if isinstance(a, Console) else a for a in args)
    return ray.get(ray.remote(num_cpus=0)(_in_task).remote(fn, *args))


class _ConsoleInTask:
    """Stands for the caller's Console in the arguments of an `on_cluster` task."""


def _in_task(fn, *args):
    return fn(*(Console(width=120) if isinstance(a, _ConsoleInTask) else a for a in args))


def _quiet_console_handlers(logger_name: str) -> None:
    """Keeps INFO lines in Ray's log files but off the console."""
    for handler in logging.getLogger(logger_name).handlers:
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)


def _propagated_env() -> dict[str, str]:
    """The settings this driver passes to the cluster's workers (Ray Train's controller
    reads them there). Inside a Ray job, a variable the job's own runtime env sets is left
    out: Ray refuses a driver whose runtime env repeats a key of the job's."""
    keys = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PRINT_PATCH",
            "RAY_TRAIN_ENABLE_STATE_TRACKING")
    return {k: os.environ[k] for k in keys if k in os.environ and k not in _job_env_vars()}


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (`ray job submit --runtime-env-json`,
    `ray-app submit`); empty outside a job."""
    # The job manager hands its driver the job's config in this variable.
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    parsed = urlparse(address)
    host, port = parsed.hostname or "", parsed.port or 10001
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(
            f"Cannot reach the Ray client server at {address!r} ({err}). Check the host and "
            "port (default 10001), that the cluster is up, and on Kubernetes that "
            "`kubectl port-forward svc/<cluster>-head-svc 10001:10001` is running."
        ) from None
