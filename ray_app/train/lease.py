"""One live run per name: a lease in `<storage>/<run>/lease.json`.

Two live runs of one name would build the same dataset cache and write the same
checkpoints. The first `train`/`tune` to start takes the lease (holder, host, pid, start,
heartbeat) and refreshes its heartbeat while it runs; a second start is refused with who
holds it and since when. A lease whose holder stopped heartbeating (a killed driver, a lost
head pod) is taken over with a warning: after `RAY_APP_LEASE_STALE_S` seconds (default 60),
or at once when the holder was a process on this host that no longer exists.

Taking the lease is atomic on a local or shared file system (a hard link that fails when
the file exists). Object stores have no such operation through pyarrow: there the lease is
written, and read back after a few seconds; of two starts at once, only the one whose
lease is still there goes on (S3 and GCS reads see the latest write).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from typing_extensions import Self

from ray_app.data import storage
from ray_app.errors import UserError
from ray_app.secrets import redact

FILE = "lease.json"
HEARTBEAT_S = float(os.environ.get("RAY_APP_LEASE_HEARTBEAT_S", "10"))
STALE_S = float(os.environ.get("RAY_APP_LEASE_STALE_S", "60"))
SETTLE_S = 3.0  # object storage: how long a lease must survive before it counts as taken


@dataclass(frozen=True)
class Holder:
    id: str
    command: str  # train, tune
    host: str
    pid: int
    pid_started: float  # process start time: tells a reused pid apart
    started: float
    heartbeat: float
    job_id: str = ""  # the Ray job, when the holder runs as one

    def describe(self, now: float) -> str:
        job = f", Ray job {self.job_id}" if self.job_id else ""
        return (f"ray-app {self.command}, pid {self.pid} on host {self.host}{job}, since "
                f"{_utc(self.started)}, last heartbeat {now - self.heartbeat:.0f} s ago")


def lease_uri(storage_root: str, run_name: str) -> str:
    return f"{storage_root.rstrip('/')}/{run_name}/{FILE}"


def live_holder(storage_root: str, run_name: str) -> Holder | None:
    """The holder of the run's lease while it is alive, else None."""
    holder = _parse(_load(lease_uri(storage_root, run_name)))
    return holder if holder is not None and _alive(holder, time.time()) else None


def refuse_if_running(storage_root: str, run_name: str) -> None:
    """A UserError when the run is live (for `ray-app submit`, before it uploads a job)."""
    holder = live_holder(storage_root, run_name)
    if holder is not None:
        raise _busy(storage_root, run_name, holder)


class RunLease:
    """`with RunLease(storage, name, "train"):` holds the run's lease for the block; a
    UserError when another live process holds it. `warning` says when a stale lease was
    taken over."""

    def __init__(self, storage_root: str, run_name: str, command: str):
        self.storage_root, self.run_name, self.command = storage_root, run_name, command
        self.uri = lease_uri(storage_root, run_name)
        self.warning: str | None = None
        now = time.time()
        self.mine = Holder(uuid.uuid4().hex, command, socket.gethostname(), os.getpid(),
                           _process_start(os.getpid()), now, now, _ray_job_id())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        for _ in range(5):  # a race lost to another starter is retried; it then shows as busy
            raw = _load(self.uri)
            if raw is not None:
                current, now = _parse(raw), time.time()
                if current is not None and _alive(current, now):
                    raise _busy(self.storage_root, self.run_name, current)
                self.warning = (
                    f"Took over the lease of run {self.run_name!r} from a holder that is gone "
                    f"({current.describe(now) if current else 'unreadable lease file'}).")
                _remove_stale(self.uri, raw)
            if _create(self.uri, self.mine):
                self._thread = threading.Thread(target=self._beat, daemon=True,
                                                name="ray-app-lease")
                self._thread.start()
                return self
        raise UserError(f"Could not take the lease {redact(self.uri)}: other starts of run "
                        f"{self.run_name!r} keep racing for it. Start one run at a time.")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = _parse(_load(self.uri))
        if current is not None and current.id == self.mine.id:
            _delete(self.uri)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = _parse(_load(self.uri))
            if current is not None and current.id != self.mine.id:
                return  # taken over while this process was stalled: stop claiming it
            try:
                storage.write_text(self.uri, _dump(
                    Holder(**{**asdict(self.mine), "heartbeat": time.time()})))
            except OSError:
                continue  # a storage hiccup; the next beat tries again


def _busy(storage_root: str, run_name: str, holder: Holder) -> UserError:
    stop = (f"`ray job stop {holder.job_id}`" if holder.job_id
            else "Ctrl-C in its terminal")
    return UserError(
        f"Run {run_name!r} is already running in {redact(storage_root)}: "
        f"{holder.describe(time.time())}. Two live runs of one name would write the same "
        f"checkpoints. Wait for it to finish, stop it ({stop}), or choose another run.name. "
        f"A lease whose holder stops heartbeating for {STALE_S:.0f} s is taken over by the "
        f"next start ({redact(lease_uri(storage_root, run_name))}).")


def _alive(holder: Holder, now: float) -> bool:
    if now - holder.heartbeat > STALE_S:
        return False
    if holder.host == socket.gethostname():
        return _process_start(holder.pid) == holder.pid_started
    return True


def _process_start(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return -1.0


def _ray_job_id() -> str:
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    try:
        return str(json.loads(raw).get("metadata", {}).get("job_submission_id", "") or "")
    except (ValueError, AttributeError):
        return ""


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dump(holder: Holder) -> str:
    return json.dumps(asdict(holder), indent=1)


def _load(uri: str) -> bytes | None:
    """The lease file's bytes, or None when there is none."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except FileNotFoundError:
        return None


def _parse(raw: bytes | None) -> Holder | None:
    """The holder in a lease file, or None when there is none or it is unreadable (writes
    are atomic, so an unreadable lease is a corrupted one)."""
    if raw is None:
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return None


def _delete(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def _remove_stale(uri: str, seen: bytes) -> None:
    """Removes the stale lease whose bytes were `seen`, unless it was replaced since."""
    if storage.is_uri(uri):
        if _load(uri) == seen:
            _delete(uri)
        return
    # Locally, a rename is atomic: of two processes taking over, one moves the file.
    aside = f"{uri}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(uri, aside)
    except FileNotFoundError:
        return
    if _load(aside) != seen:
        # A fresh lease was written in between: put it back (the link fails if one exists).
        try:
            os.link(aside, uri)
        except FileExistsError:
            pass
    os.remove(aside)


def _create(uri: str, holder: Holder) -> bool:
    """Writes the lease unless one exists; True when this holder has it."""
    if not storage.create_once(uri, _dump(holder).encode()):
        return False
    if not storage.is_uri(uri):
        return True  # exact on a file system: only one creator succeeds
    # Object stores have no conditional write here: of starters that wrote at once, the
    # one whose lease is still there after a while holds it.
    time.sleep(SETTLE_S)
    current = _parse(_load(uri))
    return current is not None and current.id == holder.id
