"""Training metrics reach the node's Prometheus endpoint as Ray metrics, which is what the
dashboard's metrics view and the Grafana dashboard in cluster/ read."""

from __future__ import annotations

import time
import urllib.request

import pytest

pytestmark = pytest.mark.ray


def test_reported_metrics_appear_on_the_metrics_endpoint(ray_cluster):
    import ray

    from ray_app.train.progress import RAY_METRICS, ProgressHub

    port = ray._private.worker.global_worker.node.metrics_export_port
    hub = ProgressHub.remote("metrics-test")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        ray.get(hub.update.remote({"step": 3, "loss": 1.25, "tokens_per_s": 1000.0,
                                   "restarts": 1}))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        # Earlier runs of the session export the same gauges under their own run label.
        if any(ln.startswith("ray_ray_app_train_loss{") and 'run="metrics-test"' in ln
               for ln in text.splitlines()):
            break
        time.sleep(1)
    lines = [ln for ln in text.splitlines() if 'run="metrics-test"' in ln]
    for key in ("loss", "tokens_per_s", "step", "restarts"):
        name = f"ray_{RAY_METRICS[key]}"  # Ray's Prometheus prefix
        assert any(ln.startswith(name + "{") for ln in lines), f"{name} not exported:\n{text[-2000:]}"
    loss = next(ln for ln in lines if ln.startswith("ray_ray_app_train_loss{"))
    assert float(loss.rsplit(" ", 1)[1]) == 1.25
