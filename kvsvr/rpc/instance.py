"""Running an instance of a service from the cluster config, and `kvsvr-service`, the
program that does so:

    kvsvr-service --config cluster.toml --node echo-a kvsvr.rpc.examples:echo

The config's [[services]] entry of the service gives the instance's address (by `--node`),
FastReject's settings and the service's block of monitor ids, which the instance registers in
the machine's counters file so that its requests, failures, refusals, deadline drops, latency
and queuing time are counted with no code in the service.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
from pathlib import Path

from kvsvr import config as config_module
from kvsvr.config import ClusterConfig, ServiceConfig, ServiceInstanceConfig
from kvsvr.errors import ConfigError
from kvsvr.limits import MONITOR_FIRST_USER_ID
from kvsvr.monitor.counters import counters_for
from kvsvr.monitor.registry import IDS_MAX
from kvsvr.process import (
    add_config_argument,
    add_log_level,
    on_stop_signals,
    program_parser,
    setup_logging,
)
from kvsvr.rpc.admission import Admission
from kvsvr.rpc.limits import MONITOR_IDS_FIRST_DEFAULT, MONITOR_IDS_PER_SERVICE
from kvsvr.rpc.metrics import ServiceMetrics, registry_entries, registry_toml
from kvsvr.rpc.server import Server
from kvsvr.rpc.service import Service

log = logging.getLogger("kvsvr.rpc.instance")


def service_config(config: ClusterConfig, name: str) -> tuple[int, ServiceConfig]:
    for index, entry in enumerate(config.services):
        if entry.name == name:
            return index, entry
    known = ", ".join(entry.name for entry in config.services) or "none"
    raise ConfigError(f"services: no service {name!r} in the config (services: {known})")


def instance_config(entry: ServiceConfig, node: str) -> ServiceInstanceConfig:
    for instance in entry.instances:
        if instance.node == node:
            return instance
    known = ", ".join(instance.node for instance in entry.instances)
    raise ConfigError(f"node: {node!r} is not an instance of service {entry.name!r} "
                      f"(instances: {known})")


def monitor_ids_first(config: ClusterConfig, name: str) -> int:
    """The first monitor id of the block of service `name`; ConfigError if its block does
    not fit the id space or overlaps another service's."""
    blocks = [(entry.monitor_ids_first or MONITOR_IDS_FIRST_DEFAULT
               + index * MONITOR_IDS_PER_SERVICE, index) for index, entry in
              enumerate(config.services)]
    index, _ = service_config(config, name)
    first = blocks[index][0]
    field = f"services[{index}].monitor_ids_first"
    if first < MONITOR_FIRST_USER_ID or first + MONITOR_IDS_PER_SERVICE - 1 > IDS_MAX:
        raise ConfigError(f"{field}: the block {first}..{first + MONITOR_IDS_PER_SERVICE - 1}"
                          f" is outside the ids a program may use ({MONITOR_FIRST_USER_ID}.."
                          f"{IDS_MAX}); set monitor_ids_first explicitly")
    for other, other_index in blocks:
        if other_index != index and abs(other - first) < MONITOR_IDS_PER_SERVICE:
            raise ConfigError(f"{field}: the block of {MONITOR_IDS_PER_SERVICE} ids from "
                              f"{first} overlaps that of services[{other_index}] (from {other})")
    return first


def make_server(service: Service, config: ClusterConfig, node: str) -> Server:
    """The Server of `service`'s instance `node`, counting in the machine's counters file."""
    _, entry = service_config(config, service.name)
    instance = instance_config(entry, node)
    first = monitor_ids_first(config, service.name)
    counters = counters_for(config)
    register = getattr(counters, "register", None)
    if register is not None:
        for monitor_id in registry_entries(service, first):
            register(monitor_id.id, monitor_id.kind_code)
    return Server(service, instance.address,
                  admission=Admission(queuing_ms_max=entry.queuing_ms_max,
                                      enabled=entry.fast_reject, now=time.monotonic()),
                  metrics=ServiceMetrics(counters, first))


def load_service(text: str) -> Service:
    """The Service named by MODULE:ATTRIBUTE; ConfigError saying what is wrong if not."""
    module_name, colon, attribute = text.partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigError(f"service: {text!r}, expected MODULE:ATTRIBUTE "
                          "(e.g. kvsvr.rpc.examples:echo)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # `kvsvr-service greeter:greeter` run where greeter.py is, as `python -m` would
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"service: cannot import {module_name!r} ({e})") from None
    service = getattr(module, attribute, None)
    if not isinstance(service, Service):
        raise ConfigError(f"service: {text!r} is not a kvsvr.rpc.Service")
    return service


async def _serve(server: Server) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        loop.call_soon_threadsafe(server.stop)

    on_stop_signals(stop, log)
    task = loop.create_task(server.serve())
    await server.bound.wait()
    log.info("%s serving at %s", server.service.name, server.address)
    await task


def main(argv: list[str] | None = None) -> int:
    parser = program_parser("kvsvr-service", "Run one instance of an RPC service.")
    add_config_argument(parser, "cluster TOML with the service in [[services]]")
    parser.add_argument("--node", help="the instance to run (its node name in [[services]])")
    parser.add_argument("--print-registry", action="store_true",
                        help="print the monitor id registry of the service and exit (list "
                             "the file in [monitor] registry to name the ids on the page)")
    parser.add_argument("service", help="MODULE:ATTRIBUTE of the Service object")
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        service = load_service(args.service)
        config = config_module.load(Path(args.config) if args.config else None)
        if args.print_registry:
            print(registry_toml(service, monitor_ids_first(config, service.name)))
            return 0
        if not args.node:
            raise ConfigError("--node: expected the instance to run")
        server = make_server(service, config, args.node)
    except ConfigError as e:
        print(f"kvsvr-service: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(server))
    except OSError as e:
        print(f"kvsvr-service: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["load_service", "main", "make_server", "monitor_ids_first"]


if __name__ == "__main__":
    sys.exit(main())
