"""A real multi-node Ray cluster on this machine (`ray start --head` + two worker nodes,
each with one `trainer` slot), driven the way users drive one:

- `ray-app submit` of a training run with relative run paths: placed under `--storage`,
  followed to its end, its training metrics on the head node's Prometheus endpoint while
  it trains, its exit status that of the job, and the same command again resumes it;
- `ray job submit` of the training entrypoint (the chaos run), its progress in the job logs;
- a Ray client session (`ray://`) that runs the data report, and trains through the
  Python API (the example notebook, executed headlessly), the finished runs then readable
  from the dashboard's Train API;
- `ray_app.submit`'s JobHandle (in the notebook): status, logs, wait, result;
- chaos: mid-run one worker node's raylet is killed (a spot node vanishing) and later a
  replacement node joins. The elastic job (1 to 2 workers) must still train the same
  samples in the same steps as the uninterrupted run, each once, lose at most one
  checkpoint interval, and end within 2% of its eval loss. The recovery time is printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from support import kill_trees, tiny_config

from ray_app.train.progress import RAY_METRICS
from ray_app.train.trace import committed_steps

pytestmark = pytest.mark.ray
RAY = str(Path(sys.executable).parent / "ray")
STEPS, CHECKPOINT_EVERY = 16, 2


class _Ports:
    """Hands out ports below the kernel's ephemeral range, each once.

    Random free ports (bind to 0) come from the ephemeral range, where Ray also binds its own
    'random' ports and outgoing connections land; a node's worker-port range picked there
    could overlap its object-manager port or another process's socket.
    """

    def __init__(self) -> None:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
        self.next = max(10_000, low - 12_000)
        self.end = low

    def take(self, n: int = 1) -> list[int]:
        """`n` consecutive ports that are free now."""
        while self.next + n <= self.end:
            ports = list(range(self.next, self.next + n))
            self.next += n
            if all(_bindable(p) for p in ports):
                return ports
        raise RuntimeError("no free ports left below the ephemeral range")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """`ray start` nodes on this machine, each its own process tree with its own ports."""

    def __init__(self, root: Path):
        self.root = root
        # Token authentication on, as on a real cluster: every CLI call carries the token.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "HOME": str(root / "home"),
                    "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                    # Every job's steps take at least 0.5 s, so that a run lasts long enough
                    # for its metrics to be scraped and for a node to be lost mid-run.
                    "RAY_APP_STEP_DELAY_S": "0.5",
                    # A lost node is declared dead after 5 failed GCS health checks, 3 s
                    # apart by default (~15 s); a killed raylet fails each check at once
                    # (connection refused), so checks 1 s apart find it in ~5 s. The
                    # timeout of a check that gets no answer stays Ray's (10 s): a raylet
                    # that is only slow on 2 busy cores is not declared dead any sooner.
                    "RAY_health_check_period_ms": "1000",
                    # Until then the lost node's resources still count, so Ray Train
                    # restarts the elastic run at its old size and waits for a placement
                    # group that cannot be placed: 60 s by default before it retries at
                    # the size that fits. The wait covers only the placement group (the
                    # workers' start is not in it), which takes well under a second here.
                    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
                    # The dashboard's Train page, as the Helm chart sets it on every pod.
                    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                    # The head starts one client server per Ray client session and waits 30 s
                    # for it by default; on 2 busy cores that start can take longer. Not much
                    # longer: a server that died as it started (`connect` retries that) is
                    # only found dead when this wait ends (180 s cost one run 3 minutes).
                    "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "90",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        (root / "home").mkdir(parents=True, exist_ok=True)
        # One temp dir per node, as separate machines have: nodes sharing one would share
        # runtime_resources/, and a node dropping a job's working_dir would delete it under
        # the job's driver on the head. Short: socket paths have a length limit.
        self.temps: dict[str, Path] = {}
        # One run storage for all jobs: the tokenized dataset is built once (Ray Data on
        # three 1-CPU nodes takes minutes) and reused from its cache by every later job.
        self.storage = root / "storage"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}  # each node's Prometheus endpoint
        self.ports = _Ports()
        self.gcs_port, self.dashboard_port, self.client_port = self.ports.take(3)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def start_head(self) -> None:
        self.start_node("head", "--head", f"--port={self.gcs_port}", "--num-cpus=1",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={self.client_port}")

    def start_node(self, name: str, *args: str) -> None:
        node, obj, agent, metrics = self.ports.take(4)
        workers = self.ports.take(200)
        self.temps[name] = self.root / f"ray-{name}"
        cmd = [RAY, "start", *args, "--block", f"--temp-dir={self.temps[name]}",
               "--object-store-memory=150000000", f"--node-manager-port={node}",
               f"--object-manager-port={obj}", f"--dashboard-agent-listen-port={agent}",
               f"--metrics-export-port={metrics}", f"--min-worker-port={workers[0]}",
               f"--max-worker-port={workers[-1]}"]
        if "--head" not in args:
            cmd += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.metrics_ports[name] = metrics
        alive = self.alive_nodes() if self.nodes else 0  # lost nodes no longer count
        self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        try:
            self.wait_for(lambda: self.alive_nodes() > alive, 180, f"node {name} up")
        except AssertionError as err:
            tails = "\n".join(f"--- {n}.log:\n" + (self.root / f"{n}.log").read_text()[-1500:]
                              for n in self.nodes)
            raise AssertionError(f"{err}; the node logs end:\n{tails}") from None

    def add_worker(self, name: str) -> None:
        self.start_node(name, "--num-cpus=1", '--resources={"trainer": 1}')

    def kill_raylet(self, name: str) -> None:
        """SIGKILL the node's raylet (what losing the machine looks like to the cluster)."""
        parent = psutil.Process(self.nodes[name].pid)
        raylets = [p for p in parent.children(recursive=True) if "raylet" in p.name()]
        assert raylets, f"no raylet under node {name}"
        for p in raylets:
            p.kill()

    def log_tails(self, pattern: str, chars: int = 1500) -> str:
        """The ends of this cluster's session logs matching `pattern`, for failure messages."""
        return "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-chars:]}"
                         for f in sorted(self.root.glob(f"ray-*/session_*/logs/{pattern}")))

    def metrics(self, node: str) -> str:
        """The node's Prometheus endpoint, as the dashboard's metrics view scrapes it."""
        url = f"http://127.0.0.1:{self.metrics_ports[node]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()
        except OSError:
            return ""

    def alive_nodes(self) -> int:
        out = self.ray("list", "nodes", "--format=json", "--filter", "state=ALIVE", check=False)
        try:
            return len(json.loads(out))
        except ValueError:
            return 0

    def ray(self, *args: str, check: bool = True) -> str:
        address = (["--address", self.dashboard] if args[0] in ("job", "list") else [])
        done = subprocess.run([RAY, *args[:1], *args[1:2], *address, *args[2:]], check=False,
                              env=self.env, capture_output=True, text=True, timeout=120)
        if check and done.returncode:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def job_status(self, job: str) -> str:
        """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) from the Jobs
        REST API that `ray job status` calls: polled every 0.5 s for minutes, a CLI process
        per poll cost ~1.5 CPU-seconds each on the suite's 2 cores."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/jobs/{job}",
            headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())["status"]
        except (OSError, ValueError, KeyError) as err:
            return f"unknown ({err})"

    @staticmethod
    def wait_for(condition, timeout_s: float, what: str) -> float:
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.5)
        return time.time()

    def stop(self) -> None:
        """Only this cluster's processes (`ray stop` would also stop the test session's)."""
        kill_trees([popen.pid for popen in self.nodes.values()])
        for temp in self.temps.values():
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = Path(f"/tmp/rc{os.getpid()}")
    root.mkdir(exist_ok=True)
    c = LocalCluster(root)
    try:
        c.start_head()
        c.add_worker("a")
        c.add_worker("b")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _config_file(cluster: LocalCluster, tmp: Path, data: Path, name: str) -> Path:
    cfg = tiny_config(data, tmp, train={"max_steps": STEPS, "batch_size_per_worker": 4,
                                        "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1},
                      scaling={"num_workers": 2, "min_workers": 1,
                               "resources_per_worker": {"CPU": 0.5, "trainer": 1}},
                      run={"name": name, "record_samples": True, "max_failures": 3,
                           "storage_path": str(cluster.storage)})
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def _submit(cluster: LocalCluster, tmp: Path, data: Path, name: str, **env: str) -> str:
    config = _config_file(cluster, tmp, data, name)
    # A shrunk run slows down until it has grown back: the replacement node's start (seconds
    # on a busy machine) must not race the run's end.
    runtime_env = {"env_vars": {"RAY_APP_SHRUNK_STEP_DELAY_S": "4",
                                "RAY_APP_ELASTIC_RESIZE_CHECK_S": "5", **env}}
    cluster.ray("job", "submit", "--submission-id", name, "--no-wait",
                "--runtime-env-json", json.dumps(runtime_env), "--",
                sys.executable, "-m", "ray_app", "train", str(config),
                "--address", "auto")
    return name


def _wait_job(cluster: LocalCluster, job: str, timeout_s: float) -> None:
    cluster.wait_for(lambda: any(s in cluster.job_status(job) for s in ("SUCCEEDED", "FAILED",
                                                                        "STOPPED")),
                     timeout_s, f"job {job}")
    logs = cluster.ray("job", "logs", job, check=False)
    assert "SUCCEEDED" in cluster.job_status(job), logs[-4000:]


def _summary(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "out" / "run_summary.json").read_text())


def _ray_app(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_app", *args], env=cluster.env, check=False,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(cluster, small_data, tokenized, tmp_path_factory):
    """The uninterrupted elastic run that the drill compares with, submitted the way users
    submit: `ray-app submit` with relative run paths, placed under `--storage` (the
    cluster's root, so its storage is the cluster's) and followed to its end. While it
    trains, the head's metrics endpoint is watched for its loss."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = yaml.safe_load(_config_file(cluster, tmp, small_data, "straight").read_text())
    cfg["run"].update(storage_path="storage", output_dir="outputs/straight")
    config = tmp / "straight.yaml"
    config.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "ray_app", "submit", str(config),
               "--address", cluster.dashboard, "--storage", str(cluster.root)]
    follow = subprocess.Popen(command, env=cluster.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    # Its metrics are on the head's endpoint (the driver's node, where the run's progress
    # actor lives), labelled with the run name.
    loss_metric = f"ray_{RAY_METRICS['loss']}{{"  # Ray's Prometheus prefix: ray_
    seen_loss = False
    # Bounded: a follower whose output pipe filled up would never end while polled here.
    deadline = time.monotonic() + 420
    while follow.poll() is None and not seen_loss and time.monotonic() < deadline:
        seen_loss = any(ln.startswith(loss_metric) and 'run="straight"' in ln
                        for ln in cluster.metrics("head").splitlines())
        time.sleep(0.5)
    stdout, stderr = follow.communicate(timeout=600)
    assert follow.returncode == 0, stdout[-4000:] + stderr[-2000:]
    output = cluster.root / "outputs" / "straight"
    return {"command": command, "stdout": stdout, "seen_loss": seen_loss, "output": output,
            "summary": json.loads((output / "run_summary.json").read_text()),
            "steps": committed_steps(cluster.storage / "straight" / "sample_trace")}


@pytest.mark.timeout(900)  # also starts the cluster and runs the straight run (fixtures)
def test_ray_app_submit_follows_the_job_and_exits_with_its_status(cluster, straight, small_data,
                                                                  tmp_path):
    out = straight["stdout"]
    assert "Submitted job" in out and f"{cluster.dashboard}/#/jobs/" in out
    assert "step 16/16" in out  # the job's own progress, followed live
    assert "SUCCEEDED" in out
    assert straight["seen_loss"], "no training loss on the head's metrics endpoint"

    config = _config_file(cluster, tmp_path, small_data, "broken")
    broken = yaml.safe_load(config.read_text())
    broken["data"]["train"] = [str(tmp_path / "no-such-folder")]
    config.write_text(yaml.safe_dump(broken))
    failed = _ray_app(cluster, "submit", str(config), "--command", "data",
                      "--address", cluster.dashboard)
    assert failed.returncode == 1 and "FAILED" in failed.stdout
    assert "matches no JSONL shard" in failed.stdout  # the job's own error, in its logs


def test_a_caller_without_the_token_is_refused_by_the_jobs_api_and_the_ray_client(
        cluster, tmp_path):
    """Token authentication is on (the Ray 2.60 default for `ray start`): the dashboard's
    HTTP API, `ray job` and a Ray client session all refuse a caller that has no token,
    and the same calls with the token go through."""
    import urllib.error

    outsider = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    outsider["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    url = f"{cluster.dashboard}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code in (401, 403)
    token = cluster.env["RAY_AUTH_TOKEN"]
    ok = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(ok, timeout=30) as response:
        assert response.status == 200

    jobs = subprocess.run([RAY, "job", "list", "--address", cluster.dashboard], env=outsider,
                          capture_output=True, text=True, timeout=120, check=False)
    assert jobs.returncode != 0, jobs.stdout
    assert cluster.ray("job", "list") is not None  # with the token (check=True)

    connect = (f"import ray; ray.init('ray://127.0.0.1:{cluster.client_port}'); "
               "print('CONNECTED', ray.cluster_resources())")
    client = subprocess.run(
        [sys.executable, "-c", connect],
        env=outsider, capture_output=True, text=True, timeout=300, check=False)
    assert client.returncode != 0 and "CONNECTED" not in client.stdout, client.stdout[-2000:]
    said = (client.stdout + client.stderr).lower()
    assert "token" in said or "unauthenticated" in said or "auth" in said, said[-2000:]


@pytest.mark.timeout(600)
def test_ray_app_submit_leaves_its_outputs_at_the_printed_place_and_resumes_from_them(
        cluster, straight):
    """Relative run paths are placed under --storage before the job starts, printed, and
    found again by the same command."""
    output = straight["output"]
    assert f"adapter {output}/final" in straight["stdout"]
    assert f"checkpoints {cluster.storage}/straight" in straight["stdout"]
    summary = straight["summary"]
    assert summary["status"] == "succeeded" and summary["train"]["steps"] == STEPS
    assert (output / "final" / "adapter_model.safetensors").is_file()
    assert list((cluster.storage / "straight").glob(f"step_{STEPS:07d}-*"))
    assert "working_dir_files" not in json.dumps(summary)

    again = subprocess.run(straight["command"], env=cluster.env, capture_output=True,
                           text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "Run 'straight' exists" in again.stdout and "resuming it" in again.stdout
    resumed = json.loads((output / "run_summary.json").read_text())
    assert resumed["train"]["resumed_from_step"] == STEPS and resumed["train"]["steps"] == STEPS


def test_a_ray_client_session_runs_the_data_report(cluster, small_data, tmp_path):
    config = _config_file(cluster, tmp_path, small_data, "client")
    address = f"ray://127.0.0.1:{cluster.client_port}"
    # (The head starts a fresh client server per session, which now and then dies as it
    # starts; `connect` retries that, as it would for a user.)
    done = _ray_app(cluster, "data", str(config), "--address", address)
    assert done.returncode == 0, (done.stdout + done.stderr
                                  + cluster.log_tails("ray_client_server*.err"))
    assert "Tokenized records:" in done.stdout and "total" in done.stdout


def _client_config(cluster: LocalCluster, tmp: Path, data: Path, name: str) -> Path:
    """A 2-step run on the two worker nodes, on the data the tests above tokenized."""
    cfg = tiny_config(data, tmp, train={"max_steps": 2, "checkpoint_every": 2},
                      scaling={"num_workers": 2,
                               "resources_per_worker": {"CPU": 0.5, "trainer": 1}},
                      run={"name": name, "storage_path": str(cluster.storage)})
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def _train_runs(cluster: LocalCluster) -> list[dict]:
    """The Train runs the dashboard's Train page shows (Ray Train V2's state API)."""
    request = urllib.request.Request(
        f"{cluster.dashboard}/api/train/v2/runs/v1",
        headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["train_runs"]


@pytest.mark.timeout(900)
def test_the_example_notebook_runs_against_the_cluster(cluster, small_data, tokenized,
                                                       tmp_path):
    """examples/quickstart.ipynb, executed headlessly as a user runs it: `ray_app.train`
    over a Ray client session (what `ray-app train --address ray://` calls), its RunResult
    and loss curve, evaluate, merge, and `ray_app.submit` followed to its result. A failing
    cell fails the test. Both runs are then on the dashboard's Train page."""
    config = _client_config(cluster, tmp_path, small_data, "notebook")
    notebook = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"
    executed = tmp_path / "executed.ipynb"
    # The executed notebook is written also when a cell fails: its outputs say why.
    run = ("import nbclient, nbformat, sys; nb = nbformat.read(sys.argv[1], 4)\n"
           "try:\n nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', "
           "resources={'metadata': {'path': sys.argv[3]}}).execute()\n"
           "finally:\n nbformat.write(nb, sys.argv[2])")
    env = {**cluster.env, "RAY_APP_ADDRESS": f"ray://127.0.0.1:{cluster.client_port}",
           "RAY_APP_DASHBOARD": cluster.dashboard, "RAY_APP_EXAMPLE_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-c", run, str(notebook), str(executed),
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=840, check=False)
    outputs = executed.read_text() if executed.exists() else ""
    assert done.returncode == 0, (done.stdout[-3000:] + done.stderr[-6000:] + outputs[-6000:]
                                  + cluster.log_tails("ray_client_server*.err"))
    outputs = json.dumps(json.loads(executed.read_text()))
    assert "Run notebook: succeeded" in outputs  # the RunResult's table
    assert "Merged into" in outputs and "SUCCEEDED" in outputs
    job = json.loads((tmp_path / "out-job" / "run_summary.json").read_text())
    assert job["status"] == "succeeded" and job["config"]["run"]["name"] == "notebook-job"
    runs = {run["name"]: run for run in _train_runs(cluster)}
    for name in ("notebook", "notebook-job"):
        assert runs.get(name, {}).get("status") == "FINISHED", (name, sorted(runs))


@pytest.fixture(scope="module")
def tokenized(cluster, small_data, tmp_path_factory):
    """The dataset cache in the cluster's storage, built once by a single-node `ray-app
    data` (Ray Data on three 1-CPU nodes of this 2-core machine takes minutes): the jobs
    then time training only."""
    if not list(cluster.storage.glob("datasets/*/report.json")):
        config = _config_file(cluster, tmp_path_factory.mktemp("tokenize"), small_data,
                              "tokenize")
        done = subprocess.run([sys.executable, "-m", "ray_app", "data", str(config),
                               "--num-cpus", "2"], capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.timeout(1500)
def test_losing_a_worker_node_costs_at_most_one_checkpoint_interval(
        cluster, small_data, straight, tmp_path_factory, capsys):
    expected = straight["steps"]
    assert straight["summary"]["train"]["restarts"] == 0 and len(expected) == STEPS

    tmp = tmp_path_factory.mktemp("chaos")
    trace = cluster.storage / "chaos" / "sample_trace"
    job = _submit(cluster, tmp, small_data, "chaos")
    cluster.wait_for(lambda: len(committed_steps(trace)) >= 5 if trace.exists() else False,
                     420, "step 5")
    step_at_loss = max(committed_steps(trace))
    cluster.kill_raylet("b")
    lost_at = time.time()
    cluster.wait_for(lambda: any(json.loads(ln)["attempt"] > 0 for f in trace.glob("*.jsonl")
                                 for ln in f.read_text().splitlines()), 300, "training again")
    recovered_at = time.time()
    cluster.add_worker("c")  # the replacement node; the elastic run grows back onto it
    _wait_job(cluster, job, 600)
    assert "step 16/16" in cluster.ray("job", "logs", job)  # progress in the job's logs

    summary = _summary(tmp, "chaos")
    train = summary["train"]
    steps = committed_steps(trace)
    # The same samples in the same steps (within a step, the order depends on the world size).
    assert train["steps"] == STEPS
    assert {k: sorted(v) for k, v in steps.items()} == {k: sorted(v) for k, v in expected.items()}
    trained = [i for ids in steps.values() for i in ids]
    assert len(trained) == len(set(trained))  # none repeated within the epoch
    first = train["restart_history"][0]
    assert step_at_loss - first["resumed_from_step"] <= CHECKPOINT_EVERY
    assert first["world_size"] == 1  # went on with the surviving node
    # ... and grew back onto the replacement node: restarted from a checkpoint with 2.
    grown = train["restart_history"][-1]
    assert grown["world_size"] == 2 and grown["cause"].startswith("elastic resize"), \
        train["restart_history"]
    # From the newest checkpoint Ray Train holds, never an older one: the surviving worker's
    # next checkpoint, or the first resume's own where the replacement node came first.
    assert grown["resumed_from_step"] >= first["resumed_from_step"]
    assert grown["steps_lost"] <= CHECKPOINT_EVERY
    assert summary["eval"]["loss_final"] == pytest.approx(
        straight["summary"]["eval"]["loss_final"], rel=0.02)
    with capsys.disabled():
        print(f"\n[chaos] node lost at step {step_at_loss}; resumed from step "
              f"{first['resumed_from_step']} on {first['world_size']} worker(s); recovery "
              f"(node lost -> training again) {recovered_at - lost_at:.1f} s; restarts: "
              f"{[(r['resumed_from_step'], r['world_size']) for r in train['restart_history']]}")
