"""Running a command as a Ray job on a remote cluster (Jobs API) and following its logs.

A job runs in a temporary working_dir that Ray deletes when the job ends, so relative
`run.storage_path` / `run.output_dir` are placed, before the job is submitted, under a
persistent location: `--storage` (or RAY_APP_STORAGE), or this folder when the cluster is
on this machine. The job is told the resulting absolute paths, and they are printed before
it starts; the same command again resumes the run from them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shlex
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml
from rich.console import Console

from ray_app.errors import UserError
from ray_app.secrets import redact, refuse_credentials

if TYPE_CHECKING:
    from ray_app.config import Config

TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
# How long to keep re-attaching to a job whose dashboard stopped answering (a head restart).
RECONNECT_S = float(os.environ.get("RAY_APP_SUBMIT_RECONNECT_S", "600"))
# Every job's driver: the dashboard's Train page shows the run (Ray Train state tracking).
JOB_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}


def submit_job(cfg: Config, address: str, command: str = "train", *,
               quickstart_overrides: list[str] | None = None, storage: str | None = None,
               output: str | None = None, resume: bool = False,
               console: Console | None = None) -> JobHandle:
    """Submits `python -m ray_app COMMAND` (`--address auto`) as a Ray job and returns its
    handle; prints the job id, dashboard URL and where the outputs will be.

    The validated `cfg` travels as config.yaml in the job's working_dir, with its run paths
    made absolute. `quickstart_overrides` (a list, possibly empty) instead runs the built-in
    quickstart with those `--set`s, so that its bundled data is read from the cluster's own
    installation."""
    from ray_app.config import STORAGE_ENV
    from ray_app.train.lease import refuse_if_running

    console = console or Console()
    location = storage or os.environ.get(STORAGE_ENV) or (
        os.getcwd() if is_on_this_machine(address) else None)
    storage_path, output_dir = job_paths(
        cfg.run.storage_path, output or cfg.run.output_dir or f"outputs/{cfg.run.name}", location)
    if _reachable_here(storage_path):
        refuse_if_running(storage_path, cfg.run.name)
    paths = {"run.storage_path": storage_path, "run.output_dir": output_dir}
    workdir = Path(tempfile.mkdtemp(prefix="ray_app_job_"))
    entry = ["python", "-m", "ray_app", command]
    if quickstart_overrides is None:
        raw = cfg.model_dump(mode="json")
        raw["run"].update(storage_path=storage_path, output_dir=output_dir)
        refuse_credentials(raw, "the job's working_dir (uploaded to the cluster)")
        (workdir / "config.yaml").write_text(yaml.safe_dump(raw))
        entry.append("config.yaml")
    else:
        refuse_credentials({"--set": list(quickstart_overrides)}, "the job's entrypoint")
        entry += [a for o in quickstart_overrides for a in ("--set", o)]
        entry += [a for key, value in paths.items() for a in ("--set", f"{key}={value}")]
    if resume:
        entry.append("--resume")
    entry += ["--address", "auto"]
    client = _client(address)
    job_id = client.submit_job(entrypoint=shlex.join(entry),
                               runtime_env={"working_dir": str(workdir), "env_vars": JOB_ENV})
    job = JobHandle(job_id, address.rstrip("/"), output_dir, storage_path, cfg.run.name, client)
    console.print(f"Submitted job {job_id}; dashboard: {job.dashboard_url}")
    # One location per line, never wrapped: users copy these paths.
    console.print("Outputs, on the cluster's storage (the same command again resumes from them):")
    for name, where in (("adapter", f"{output_dir}/final"),
                        ("summary", f"{output_dir}/run_summary.json"),
                        ("checkpoints", f"{redact(storage_path)}/{cfg.run.name}")):
        console.print(f"  {name} {where}", highlight=False, soft_wrap=True)
    return job


class JobHandle:
    """A submitted Ray job: its status, logs and result, through Ray's Jobs SDK.

    >>> job = ray_app.submit("my.yaml", address="http://head:8265")
    >>> job.logs(follow=True)   # prints the logs until the job ends
    >>> job.wait(), job.result()["eval"]["loss_final"]
    """

    def __init__(self, job_id: str, address: str, output_dir: str, storage: str, run_name: str,
                 client=None):
        self.job_id, self.address = job_id, address
        self.output_dir, self.storage, self.run_name = output_dir, storage, run_name
        self._client = client

    @property
    def client(self):
        """The `ray.job_submission.JobSubmissionClient` of the job's dashboard."""
        if self._client is None:
            self._client = _client(self.address)
        return self._client

    @property
    def dashboard_url(self) -> str:
        return f"{self.address}/#/jobs/{self.job_id}"

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        return str(self.client.get_job_status(self.job_id)).split(".")[-1]

    def logs(self, follow: bool = False, console: Console | None = None) -> str:
        """The job's logs so far; with `follow=True`, prints them as they come until the job
        ends (re-attaching a dropped stream) and returns them whole."""
        if follow:
            run_coroutine(follow_logs(self.client, self.job_id, console or Console()))
        return self.client.get_job_logs(self.job_id)

    def wait(self, timeout: float | None = None, poll_s: float = 2.0) -> str:
        """Blocks until the job ends and returns its final status; TimeoutError after
        `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.status()) not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.job_id} still {status} after {timeout} s")
            time.sleep(poll_s)
        return status

    def stop(self) -> bool:
        """Asks Ray to stop the job; False when it had ended already."""
        return bool(self.client.stop_job(self.job_id))

    def result(self) -> dict[str, Any]:
        """The run's `run_summary.json` (a train job's), read from the output folder the
        job was given: a path this machine sees, or object storage."""
        from ray_app.data import storage

        path = f"{self.output_dir}/run_summary.json"
        try:
            return json.loads(storage.read_text(path))
        except (FileNotFoundError, OSError) as err:
            raise UserError(
                f"No run summary at {path} ({type(err).__name__}); job {self.job_id} is "
                f"{self.status()}. It is written when a train job ends, on the cluster's "
                "storage: mount it here or use object storage to read it from this "
                "machine.") from None

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r}, run={self.run_name!r}, {self.dashboard_url})"


def run_coroutine(coro):
    """asyncio.run, also from inside a running event loop (a Jupyter kernel has one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def job_paths(storage_path: str, output_dir: str, location: str | None) -> tuple[str, str]:
    """(storage, output) as the job will use them: absolute paths or URIs, relative ones
    placed under `location`; a UserError when a relative one has nowhere persistent to go."""
    from ray_app.config import STORAGE_ENV, resolve_run_path

    out = []
    for key, path in (("run.storage_path", storage_path), ("run.output_dir", output_dir)):
        relative = "://" not in path and not Path(path).expanduser().is_absolute()
        if relative and not location:
            raise UserError(
                f"{key} {path!r} is relative: on the cluster it would land in the job's "
                "temporary working_dir, which Ray deletes when the job ends (and on one node "
                "only). Give --storage with a path every node of the cluster mounts (the Helm "
                f"chart mounts its shared volume at /mnt/shared) or an s3:// URI, set "
                f"{STORAGE_ENV}, or make {key} absolute.")
        out.append(resolve_run_path(path, key, location))
    storage, output = out
    if "://" in output:
        raise UserError(f"run.output_dir would be {output!r}, an object-storage URI; the adapter "
                        "and run_summary.json are written to a file system. Set run.output_dir "
                        "to a path every node of the cluster mounts.")
    return storage, output


def is_on_this_machine(address: str) -> bool:
    """Whether the dashboard URL names this machine (then its file system is the cluster's)."""
    host = urlparse(address).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1", socket.gethostname(), socket.getfqdn())


def _reachable_here(storage: str) -> bool:
    return "://" in storage or Path(storage).exists()


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - connection errors come in many types
        raise UserError(
            f"Cannot reach the Ray dashboard at {address!r}: {str(err).splitlines()[0]}. "
            "Check the URL (default port 8265), that the cluster is up, and for token auth "
            "set RAY_AUTH_MODE=token with the cluster's token."
        ) from None


async def follow_logs(client, job_id: str, console: Console) -> str:
    """Prints the job's logs until it ends and returns its status. A dropped log stream
    (a network blip, a restarted head) is re-attached without printing a line twice."""
    printed = 0
    lost_since: float | None = None
    while True:
        seen, dropped = 0, False
        try:
            async for chunk in client.tail_job_logs(job_id):
                new = chunk[max(0, printed - seen):]  # the stream restarts at the first line
                seen += len(chunk)
                if new:
                    console.out(new, end="", highlight=False)
                    printed += len(new)
        except Exception:  # noqa: BLE001 - websocket and HTTP errors: checked below
            dropped = True
        try:
            status = str(client.get_job_status(job_id)).split(".")[-1]
            lost_since = None
        except Exception as err:  # noqa: BLE001
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > RECONNECT_S:
                raise UserError(
                    f"Lost contact with the Ray dashboard for {RECONNECT_S:.0f} s "
                    f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); job "
                    f"{job_id} may still be running: ray job status {job_id}.") from None
            status = ""
        if status in TERMINAL:
            return status
        if dropped:
            console.print(f"[dim]Log stream of job {job_id} dropped; re-attaching...[/dim]")
        await asyncio.sleep(2)
