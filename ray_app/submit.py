"""Running a command as a Ray job on a remote cluster (Jobs API) and following its logs.

A job runs in a temporary working_dir that Ray deletes when the job ends, so relative
`run.storage_path` / `run.output_dir` are placed, before the job is submitted, under a
persistent location: `--storage` (or RAY_APP_STORAGE), or this folder when the cluster is
on this machine. The job is told the resulting absolute paths, and they are printed before
it starts; the same command again resumes the run from them.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml
from rich.console import Console

from ray_app.errors import UserError
from ray_app.secrets import redact, refuse_credentials

TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
# How long to keep re-attaching to a job whose dashboard stopped answering (a head restart).
RECONNECT_S = float(os.environ.get("RAY_APP_SUBMIT_RECONNECT_S", "600"))


def submit_and_follow(args, console: Console, command: str = "train") -> int:
    """Ships the resolved config with the job, runs `python -m ray_app COMMAND` on the
    cluster (`--address auto`), prints the job id, dashboard URL and where the outputs will
    be, follows the logs and returns the job's exit status."""
    from ray_app.config import STORAGE_ENV, load_config
    from ray_app.train.lease import refuse_if_running

    cfg = load_config(args.config, args.overrides)
    location = (getattr(args, "storage", None) or os.environ.get(STORAGE_ENV)
                or (os.getcwd() if is_on_this_machine(args.address) else None))
    storage, output = job_paths(cfg.run.storage_path,
                                args.output or cfg.run.output_dir or f"outputs/{cfg.run.name}",
                                location)
    if _reachable_here(storage):
        refuse_if_running(storage, cfg.run.name)
    paths = {"run.storage_path": storage, "run.output_dir": output}
    workdir = Path(tempfile.mkdtemp(prefix="ray_app_job_"))
    entry = ["python", "-m", "ray_app", command]
    if args.config:
        raw = cfg.model_dump(mode="json")
        raw["run"].update(storage_path=storage, output_dir=output)
        refuse_credentials(raw, "the job's working_dir (uploaded to the cluster)")
        (workdir / "config.yaml").write_text(yaml.safe_dump(raw))
        entry.append("config.yaml")
    else:
        refuse_credentials({"--set": list(args.overrides)}, "the job's entrypoint")
        entry += [a for o in args.overrides for a in ("--set", o)]
        entry += [a for key, value in paths.items() for a in ("--set", f"{key}={value}")]
    if getattr(args, "resume", False):
        entry.append("--resume")
    entry += ["--address", "auto"]
    client = _client(args.address)
    job_id = client.submit_job(entrypoint=shlex.join(entry),
                               runtime_env={"working_dir": str(workdir)})
    dashboard = args.address.rstrip("/")
    console.print(f"Submitted job {job_id}; dashboard: {dashboard}/#/jobs/{job_id}")
    # One location per line, never wrapped: users copy these paths.
    console.print("Outputs, on the cluster's storage (the same command again resumes from them):")
    for name, where in (("adapter", f"{output}/final"), ("summary", f"{output}/run_summary.json"),
                        ("checkpoints", f"{redact(storage)}/{cfg.run.name}")):
        console.print(f"  {name} {where}", highlight=False, soft_wrap=True)
    try:
        status = asyncio.run(follow(client, job_id, console))
    except KeyboardInterrupt:
        console.print(f"Stopped following job {job_id}; the job keeps running on the cluster. "
                      f"Follow it again: ray job logs {job_id} --follow --address {dashboard}. "
                      f"Stop it: ray job stop {job_id} --address {dashboard}.", highlight=False,
                      soft_wrap=True)
        return 130
    console.print(f"Job {job_id} finished: {status}")
    return TERMINAL.get(status, 1)


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


async def follow(client, job_id: str, console: Console) -> str:
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
