"""Fixtures: real nodes as real processes, each on its own free port and data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvsvr.client import Client
from kvsvr.launcher import LocalCluster, write_single_node_config


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A running one-node cluster; logs in tmp_path/logs (shown if a test fails)."""
    local = LocalCluster(write_single_node_config(tmp_path), log_dir=tmp_path / "logs")
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with cluster.client(timeout=10.0, attempt_timeout=0.5) as c:
        yield c
