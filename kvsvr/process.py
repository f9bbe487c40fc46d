"""The edge every KVSvr program shares with its operating system: the --log-level option, the
log format, and stopping cleanly on SIGTERM or SIGINT (node, queue server, agent, launchers).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)


def on_stop_signals(stop: Callable[[], None], log: logging.Logger | None = None) -> None:
    """Call `stop` on SIGTERM or SIGINT (it should only ask the main loop to finish)."""

    def handler(signum: int, _frame: Any) -> None:
        if log is not None:
            log.info("signal %s: finishing the current round and stopping",
                     signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


__all__ = ["LOG_FORMAT", "LOG_LEVELS", "add_log_level", "on_stop_signals", "setup_logging"]
