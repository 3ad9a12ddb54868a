"""The launcher's pieces that need no Ray: the environment it sets up before Ray starts, the fitting of the
replicas' requests to a machine, and the rebinding of Serve's HAProxy template."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from serve.app.config import ServiceConfig
from serve.app.fitting import DoesNotFit, fit
from serve.app.launch import serve_environment
from serve.app.worker_setup import bound_template


def test_haproxy_mode_gets_files_and_ports_of_its_own(tmp_path):
    first, second = (serve_environment(ServiceConfig(), tmp_path / name) for name in ("a", "b"))
    assert first["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert first["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"  # each request's log line written at once
    files = ("CONFIG_FILE_LOC", "SOCKET_PATH", "METRICS_SOCKET_PATH", "SERVER_STATE_FILE")
    for key in (f"RAY_SERVE_HAPROXY_{name}" for name in files):
        assert Path(first[key]).parent == tmp_path / "a"  # two instances on one machine do not share HAProxy's files
    ports = ("HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT", "FALLBACK_PROXY_HTTP_PORT", "FALLBACK_PROXY_GRPC_PORT")
    chosen = [int(first[f"RAY_SERVE_{name}"]) for name in ports]
    assert all(chosen) and not {8404, 9101, 8500, 9500} & set(chosen)  # free ports, never Serve's fixed ones
    assert first["KOSMOS_INSTANCE_DIR"] == str(tmp_path / "a") != second["KOSMOS_INSTANCE_DIR"]
    assert first["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # served on loopback: Ray's node address is 127.0.0.1


def test_serve_mode_turns_both_off_and_clears_haproxy_settings(tmp_path):
    environment = serve_environment(ServiceConfig.model_validate({"http": {"proxy": "serve"}}), tmp_path)
    assert environment["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == environment["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert environment["RAY_SERVE_HAPROXY_STATS_PORT"] is None  # removed, should an earlier instance have set it


def test_a_host_on_every_interface_keeps_ray_on_the_network(tmp_path):
    environment = serve_environment(ServiceConfig.model_validate({"http": {"host": "0.0.0.0"}}), tmp_path)
    assert environment["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] is None


def test_the_default_config_is_scaled_to_two_cpus():
    fitted = fit(ServiceConfig(), {"CPU": 2.0})
    cpus = [getattr(fitted.config, name).num_cpus for name in ("ingress", "preprocessor", "generator")]
    assert cpus == [0.4, 0.8, 0.8] and sum(cpus) <= 2
    assert "2.5 CPUs" in fitted.note and "--config" in fitted.note
    assert fitted.config.limits == ServiceConfig().limits  # nothing else changes


def test_a_config_that_fits_is_left_alone():
    config = ServiceConfig()
    assert fit(config, {"CPU": 8.0}) == type(fit(config, {"CPU": 8.0}))(config, None)


def test_starting_replicas_count_in_the_request():
    config = ServiceConfig.model_validate(
        {"preprocessor": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 4}}}
    )
    fitted = fit(config, {"CPU": 2.0})  # 0.5 + 3 x 1 + 1 = 4.5
    assert (
        fitted.config.preprocessor.num_cpus * 3 + fitted.config.ingress.num_cpus + fitted.config.generator.num_cpus <= 2
    )


def test_a_gpu_the_machine_lacks_stops_the_start_naming_the_deployment_and_the_setting():
    config = ServiceConfig.model_validate({"cpu_fallback": False})
    with pytest.raises(
        DoesNotFit, match=r"Generator deployment asks for 1 GPU and Ray has 0.*generator\.ray_actor_options\.num_gpus"
    ):
        fit(config, {"CPU": 4.0})
    assert fit(ServiceConfig(), {"CPU": 4.0, "GPU": 1.0}).note is None


def test_a_custom_resource_the_machine_lacks_stops_the_start():
    config = ServiceConfig.model_validate({"preprocessor": {"ray_actor_options": {"resources": {"cpu_node": 1}}}})
    with pytest.raises(DoesNotFit, match=r"Preprocessor deployment asks for 1 cpu_node and Ray has 0"):
        fit(config, {"CPU": 4.0})


def haproxy_config(tmp_path: Path, servers: list) -> str:
    """The HAProxy config Serve writes for one application with ``servers`` (with its template as it is)."""
    from ray.serve._private import haproxy
    from ray.serve.config import HTTPOptions

    config = haproxy.HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=18000),
        stats_port=18404,
        metrics_port=19101,
        socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path),
        server_state_file=str(tmp_path / "server-state"),
        metrics_socket_path=str(tmp_path / "metrics.sock"),
    )
    api = haproxy.HAProxyApi(cfg=config, config_file_path=str(tmp_path / "haproxy.cfg"))
    api.set_backend_configs({"app": haproxy.BackendConfig(name="app", path_prefix="/", servers=servers)})
    api._generate_config_file_internal()
    check = subprocess.run([haproxy.get_haproxy_binary(), "-c", "-f", api.config_file_path], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()  # HAProxy accepts it
    return Path(api.config_file_path).read_text()


def test_haproxy_listens_only_on_the_host_and_opens_http_once_a_replica_is_there(tmp_path, monkeypatch):
    from ray.serve._private import haproxy

    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", bound_template(haproxy.HAPROXY_CONFIG_TEMPLATE))
    waiting = haproxy_config(tmp_path / "waiting", [])
    serving = haproxy_config(tmp_path / "serving", [haproxy.ServerConfig(name="replica", host="127.0.0.1", port=30000)])
    binds = {line.strip() for line in serving.splitlines() if line.strip().startswith("bind ")}
    assert binds == {"bind 127.0.0.1:19101", "bind 127.0.0.1:18000", "bind 127.0.0.1:18404"}  # stats, metrics too
    assert "    bind 127.0.0.1:18000\n    disabled\n" in waiting  # no replica yet: the port stays closed
    assert "disabled" not in serving
