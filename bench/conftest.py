"""pytest-benchmark support: after the run, print each benchmark's mean beside its group's
baseline (the benchmark named `baseline`), as a ratio measured in the same run."""

from __future__ import annotations

from typing import Any

import pytest

_results: dict[str, dict[str, float]] = {}


@pytest.fixture
def timed(benchmark: Any, request: pytest.FixtureRequest) -> Any:
    """`benchmark`, remembering the mean per (group, name) for the ratio table."""
    def run(function: Any, *args: Any, **kwargs: Any) -> Any:
        result = benchmark(function, *args, **kwargs)
        group = benchmark.group or "default"
        name = request.node.name.removeprefix("test_")
        if benchmark.stats is not None:
            _results.setdefault(group, {})[name] = benchmark.stats.stats.mean
        return result
    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _results:
        return
    terminalreporter.section("KVSvr: cost relative to the same run's baseline")
    for group, entries in sorted(_results.items()):
        baseline_name = next((n for n in entries if n.endswith("baseline")), None)
        base = entries.get(baseline_name) if baseline_name else None
        for name, mean in sorted(entries.items(), key=lambda item: item[1]):
            ratio = f"{mean / base:6.2f}x {baseline_name}" if base else ""
            terminalreporter.write_line(f"  {group:14s} {name:36s} {mean * 1e6:10.2f} us  {ratio}")
