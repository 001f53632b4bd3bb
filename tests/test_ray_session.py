"""Connecting to a cluster: a Ray client server that dies while it starts is retried."""

from __future__ import annotations

import os
from types import SimpleNamespace
from unittest import mock

import pytest

from ray_app import ray_session
from ray_app.errors import UserError

ADDRESS = "ray://127.0.0.1:10001"
SERVER_DIED = ConnectionAbortedError(
    "Initialization failure from server:\nRuntimeError: Starting Ray client server failed. "
    "See ray_client_server_23001.err for detailed logs.")


def _connect_with(init_side_effect):
    init = (init_side_effect if isinstance(init_side_effect, mock.Mock)
            else mock.Mock(side_effect=init_side_effect))
    with mock.patch("ray.init", init), mock.patch("ray.is_initialized", return_value=False), \
            mock.patch.object(ray_session, "_check_reachable"), \
            mock.patch.object(ray_session.time, "sleep"):
        return init, ray_session.connect(ADDRESS)


# The other way the proxy reports it (seen in CI): the server is a zombie when it reads it.
SERVER_ZOMBIE = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n  File "
    '"ray/util/client/server/proxier.py", line 396, in start_specific_server\n    cmd = '
    "psutil_proc.cmdline()\npsutil.ZombieProcess: PID still exists but it's a zombie "
    "(pid=31127)\n")


def test_a_client_server_that_dies_at_start_is_retried_with_a_new_connection():
    context = SimpleNamespace(dashboard_url="127.0.0.1:8265")
    init, dashboard = _connect_with([SERVER_DIED, SERVER_ZOMBIE, context])
    assert init.call_count == 3 and dashboard == "127.0.0.1:8265"
    assert all(call.kwargs["address"] == ADDRESS for call in init.call_args_list)


def test_a_client_server_that_keeps_dying_is_reported_after_the_last_attempt():
    attempts = ray_session.CLIENT_CONNECT_ATTEMPTS
    init = mock.Mock(side_effect=[SERVER_DIED] * attempts)
    with pytest.raises(UserError, match="(?s)Cannot connect to the Ray cluster.*client server"):
        _connect_with(init)
    assert init.call_count == attempts


def test_other_connection_errors_are_not_retried():
    init = mock.Mock(side_effect=[ConnectionError("token rejected: unauthenticated")])
    with pytest.raises(UserError, match="Cannot connect") as err:
        _connect_with(init)
    assert "unauthenticated" in str(err.value) and init.call_count == 1


def test_a_local_cluster_names_its_own_dashboard_to_its_processes_only(monkeypatch):
    """The processes `ray.init` starts inherit RAY_API_SERVER_ADDRESS (their dashboard);
    this process keeps no such variable, which would send later Jobs SDK calls there."""
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}

    def init(**kwargs):
        seen.update(kwargs, env=os.environ.get("RAY_API_SERVER_ADDRESS"))
        return SimpleNamespace(dashboard_url="")

    with mock.patch("ray.init", init), mock.patch("ray.is_initialized", return_value=False):
        ray_session.connect(None, num_cpus=1)
    assert seen["env"] == f"http://127.0.0.1:{seen['dashboard_port']}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.5:8265")  # the user's own
    seen.clear()
    with mock.patch("ray.init", init), mock.patch("ray.is_initialized", return_value=False):
        ray_session.connect(None, num_cpus=1)
    assert "dashboard_port" not in seen and seen["env"] == "http://10.0.0.5:8265"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.5:8265"
