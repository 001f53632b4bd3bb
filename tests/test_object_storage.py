"""Object storage: a run whose data, dataset cache and checkpoints are all on S3 (a moto
server on 127.0.0.1), behind a proxy that fails every third write with 503 SlowDown.
The run must retry through those errors, lose a worker group mid-run, resume from the
checkpoint it wrote to S3, and finish."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from support import tiny_config

from ray_app.quickstart import build_assets
from ray_app.train.faults import FAIL_AT_STEP_ENV

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the S3 server, except that every third distinct write
    (PUT, POST, DELETE of a path) is answered 503 SlowDown once, a transient error: its
    retry goes through."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.writes, self.failed = upstream, 0, 0
        self.failed_once: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            data += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return data

    def _handle(self):
        body = self._body()
        server: FlakyProxy = self.server
        if self.command in ("PUT", "POST", "DELETE"):
            with server.lock:
                key = (self.command, self.path)
                fail = False
                if key not in server.failed_once:  # a retry of a failed write goes through
                    server.writes += 1
                    fail = server.writes % 3 == 0
                if fail:
                    server.failed_once.add(key)
                    server.failed += 1
            if fail:
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                self.wfile.write(SLOW_DOWN)
                return
        conn = http.client.HTTPConnection(*server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("transfer-encoding", "expect", "content-length")}
        conn.request(self.command, self.path, body, {**headers, "Content-Length": str(len(body))})
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        # A HEAD reply carries the object's size and no body.
        self.send_header("Content-Length", reply.getheader("Content-Length", "0")
                         if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FlakyProxy(server.get_host_and_port())
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    host, port = server.get_host_and_port()
    direct = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    direct.create_bucket(Bucket="bucket")
    rng = random.Random(5)
    for name, records in (("a.jsonl", build_assets.alpaca_records(rng, 120)),
                          ("m.jsonl", build_assets.chat_records(rng, 120))):
        direct.put_object(Bucket="bucket", Key=f"data/{name}",
                          Body="".join(json.dumps(r) + "\n" for r in records).encode())
    yield direct, proxy, {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.server_port}"}
    proxy.shutdown()
    server.stop()


def test_a_run_on_s3_retries_transient_errors_and_resumes_from_its_s3_checkpoint(s3, tmp_path):
    direct, proxy, env = s3
    cfg = tiny_config(["s3://bucket/data/"], tmp_path,
                      train={"max_steps": 6, "batch_size_per_worker": 4, "checkpoint_every": 2},
                      run={"name": "on-s3", "storage_path": "s3://bucket/runs",
                           "output_dir": str(tmp_path / "out"), "max_failures": 1})
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "ray_app", "train", str(config), "--num-cpus", "2"],
        env={**os.environ, **env, FAIL_AT_STEP_ENV: "5"}, capture_output=True, text=True,
        timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    train = summary["train"]
    assert (train["steps"], train["restarts"], train["resumed_from_step"]) == (6, 1, 4)
    assert summary["data"]["records_read"] == 240
    assert {f["path"] for f in summary["data"]["files"]} == {"s3://bucket/data/a.jsonl",
                                                             "s3://bucket/data/m.jsonl"}
    keys = [o["Key"] for page in direct.get_paginator("list_objects_v2").paginate(
        Bucket="bucket", Prefix="runs/") for o in page.get("Contents", [])]
    assert any(k.startswith("runs/datasets/") and k.endswith("report.json") for k in keys)
    for step in (4, 6):  # the checkpoint resumed from, and the final one, each whole
        files = {k.rsplit("/", 1)[-1] for k in keys if f"/step_{step:07d}-" in k}
        assert {"adapter_model.safetensors", "optimizer.pt"} <= files, sorted(files)
    assert proxy.failed >= 5, proxy.failed  # writes really failed and were retried
    assert Path(summary["adapter_path"], "adapter_model.safetensors").exists()
