"""ID-Value monitoring (DESIGN §4): per-second counters in a per-machine shared-memory file,
an agent that ships them, and a monitor center with curves and alert rules.

What instrumented code needs is here: `open_counters` (then `counters.add(ID, delta)` and
`counters.set(ID, value)`) and the registry of ids. The agent, the center and its web page are
the modules `agent`, `center` and `web` (imported on their own: they pull in ZeroMQ and HTTP).
"""

from kvsvr.monitor.counters import (
    Counters,
    CountersError,
    CounterSink,
    NullCounters,
    cluster_counters_path,
    default_path,
    open_counters,
    open_reader,
)
from kvsvr.monitor.registry import MonitorId, Registry, load_registry, parse_registry

__all__ = [
    "CounterSink",
    "Counters",
    "CountersError",
    "MonitorId",
    "NullCounters",
    "Registry",
    "cluster_counters_path",
    "default_path",
    "load_registry",
    "open_counters",
    "open_reader",
    "parse_registry",
]
