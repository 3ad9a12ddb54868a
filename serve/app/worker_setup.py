"""What every Ray worker of an instance that ``serve.app.launch`` starts runs first (Ray's
``worker_process_setup_hook``): Serve's listeners bind the addresses the service was asked for.

Serve 2.60 offers no switch for three of its listening sockets, so their addresses are set here, in the
workers that open them:

- HAProxy's stats page (``bind *:<stats port>``) and Prometheus page (``bind :<metrics port>``) listen on every
  interface; here they listen on the service's host, like its HTTP port.
- HAProxy's HTTP port opens as soon as HAProxy starts, before any Ingress replica exists, and a request there
  then waits on Serve's fallback proxy until one does. Here the port stays closed (the frontend is
  ``disabled``) until an Ingress replica is registered, and closes again when none is left: a client is
  refused at once rather than kept waiting, and from the first replica on the Ingress answers for itself
  (503 until the service is ready).
- Each replica's server for calls between deployments binds ``[::]:0`` (every interface); here it binds the
  node's address, which is the one the other replicas dial (127.0.0.1 on an instance served on loopback).
"""

from __future__ import annotations

from typing import Any

METRICS_BIND = "bind :{{ config.metrics_port }}"
STATS_BIND = "bind *:{{ config.stats_port }}"
HTTP_BIND = "    bind {{ config.frontend_host }}:{{ config.frontend_port }}\n"
# The frontend listens only while some application has a replica to take its requests.
HTTP_BIND_WHILE_SERVED = HTTP_BIND + (
    "{%- if not backends | selectattr('servers') | list %}\n    disabled\n{%- endif %}\n"
)
ALL_INTERFACES = "[::]:0"


def setup() -> None:
    """Patch Serve's HAProxy template and replica gRPC server in this worker, before any actor runs here."""
    from ray.serve._private import haproxy, replica

    haproxy.HAPROXY_CONFIG_TEMPLATE = bound_template(haproxy.HAPROXY_CONFIG_TEMPLATE)
    replica.add_port_to_grpc_server = _on_node_address(replica.add_port_to_grpc_server)


def bound_template(template: str) -> str:
    """Serve's HAProxy config template with the stats and metrics pages on the HTTP host, and the HTTP frontend
    disabled while no application has a replica (the same again if ``template`` is that already). Raises if Serve's
    template no longer has those lines."""
    if HTTP_BIND_WHILE_SERVED in template:
        return template
    for line in (METRICS_BIND, STATS_BIND, HTTP_BIND):
        if template.count(line) != 1:
            raise RuntimeError(f"Serve's HAProxy template changed: no single {line.strip()!r} to rebind")
    return (
        template.replace(METRICS_BIND, "bind {{ config.frontend_host }}:{{ config.metrics_port }}")
        .replace(STATS_BIND, "bind {{ config.frontend_host }}:{{ config.stats_port }}")
        .replace(HTTP_BIND, HTTP_BIND_WHILE_SERVED)
    )


def _on_node_address(add_port: Any) -> Any:
    """``add_port_to_grpc_server`` that puts a server asked for on every interface on this node's address."""

    def add_port_on_node(server: Any, address: str) -> int:
        if address == ALL_INTERFACES:
            import ray
            from ray._common.network_utils import build_address

            address = build_address(ray.util.get_node_ip_address(), 0)
        return add_port(server, address)

    return add_port_on_node
