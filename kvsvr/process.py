"""The edge every KVSvr program shares with its user and its operating system: the parser
with --version and "did you mean" for a mistyped choice, the options read from the
environment (KVSVR_CONFIG, KVSVR_ADDRESS), the --log-level option, the log format, and
stopping cleanly on SIGTERM or SIGINT (node, queue server, agent, launchers, CLIs).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# The environment a program reads when its option is not given on the command line.
CONFIG_ENV = "KVSVR_CONFIG"      # --config: the cluster TOML
ADDRESS_ENV = "KVSVR_ADDRESS"    # --address: one node to talk to

_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def package_version() -> str:
    from kvsvr import __version__

    return __version__


class Parser(argparse.ArgumentParser):
    """argparse, with a suggestion when a command or choice is mistyped (`kvsvr gett`:
    "did you mean 'get'?"); subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        found = _INVALID_CHOICE.search(message)
        if found:
            given = found.group(1)
            choices = re.findall(r"'([^']*)'", found.group(2))
            close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6)
            prefixed = [c for c in choices if c.startswith(given)] if given else []
            guess = close[0] if close else (prefixed[0] if len(prefixed) == 1 else None)
            if guess is not None:
                message = f"{message}; did you mean {guess!r}?"
        super().error(message)


def program_parser(prog: str, description: str, **kwargs: Any) -> Parser:
    """The parser of a KVSvr program: --version prints "PROG VERSION" and exits 0."""
    parser = Parser(prog=prog, description=description, **kwargs)
    parser.add_argument("--version", action="version", version=f"{prog} {package_version()}")
    return parser


def add_config_argument(parser: argparse.ArgumentParser | Any, help_text: str, *,
                        required: bool = False) -> None:
    """--config, defaulting to $KVSVR_CONFIG (so a shell can point every program at one
    cluster); `required` programs accept either."""
    default = os.environ.get(CONFIG_ENV) or None
    parser.add_argument("--config", default=default, required=required and default is None,
                        help=f"{help_text} (default: ${CONFIG_ENV}"
                             + (")" if required else ", else the embedded config)"))


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


__all__ = ["ADDRESS_ENV", "CONFIG_ENV", "LOG_FORMAT", "LOG_LEVELS", "Parser",
           "add_config_argument", "add_log_level", "on_stop_signals", "package_version",
           "program_parser", "setup_logging"]
