"""The Serve mode the launcher sets up before Ray starts."""

from __future__ import annotations

from serve.app.config import ServiceConfig
from serve.app.launch import serve_environment


def test_haproxy_mode_gets_files_and_port_of_its_own():
    first, second = (serve_environment(ServiceConfig()) for _ in range(2))
    assert first["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert first["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"  # each request's log line written at once
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH"):
        assert first[key] != second[key]  # two instances on one machine do not share HAProxy's files
    for key in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT"):  # ports of its own, not 8404
        assert int(first[key]) > 0


def test_serve_mode_turns_both_off():
    config = ServiceConfig.model_validate({"http": {"proxy": "serve"}})
    assert serve_environment(config) == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
