"""Running a command as a Ray job on a remote cluster (Jobs API) and following its logs."""

from __future__ import annotations

import asyncio
import shlex
import tempfile
from pathlib import Path

import yaml
from rich.console import Console

from ray_app.errors import UserError
from ray_app.secrets import refuse_credentials

TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def submit_and_follow(args, console: Console, command: str = "train") -> int:
    """Ships the resolved config with the job, runs `python -m ray_app COMMAND` on the
    cluster (`--address auto`), prints the job id and dashboard URL, follows the logs and
    returns the job's exit status."""
    from ray.job_submission import JobSubmissionClient

    from ray_app.config import load_config

    workdir = Path(tempfile.mkdtemp(prefix="ray_app_job_"))
    entry = ["python", "-m", "ray_app", command]
    if args.config:
        cfg = load_config(args.config, args.overrides)
        raw = cfg.model_dump(mode="json")
        refuse_credentials(raw, "the job's working_dir (uploaded to the cluster)")
        (workdir / "config.yaml").write_text(yaml.safe_dump(raw))
        entry.append("config.yaml")
    else:
        refuse_credentials({"--set": list(args.overrides)}, "the job's entrypoint")
        entry += [a for o in args.overrides for a in ("--set", o)]
    if args.output:
        entry += ["--output", args.output]
    if getattr(args, "resume", False):
        entry.append("--resume")
    entry += ["--address", "auto"]
    try:
        client = JobSubmissionClient(args.address)
    except Exception as err:  # noqa: BLE001 - connection errors come in many types
        raise UserError(
            f"Cannot reach the Ray dashboard at {args.address!r}: {str(err).splitlines()[0]}. "
            "Check the URL (default port 8265), that the cluster is up, and for token auth "
            "set RAY_AUTH_MODE=token with the cluster's token."
        ) from None
    job_id = client.submit_job(entrypoint=shlex.join(entry),
                               runtime_env={"working_dir": str(workdir)})
    console.print(f"Submitted job {job_id}; dashboard: {args.address.rstrip('/')}/#/jobs/{job_id}")
    asyncio.run(_follow(client, job_id, console))
    status = str(client.get_job_status(job_id)).split(".")[-1]
    console.print(f"Job {job_id} finished: {status}")
    return TERMINAL.get(status, 1)


async def _follow(client, job_id: str, console: Console) -> None:
    async for chunk in client.tail_job_logs(job_id):
        console.out(chunk, end="", highlight=False)
