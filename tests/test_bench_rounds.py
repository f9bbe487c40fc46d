"""bench/load.py --rounds: the target is judged on the median of same-round ratios, and the
option is refused where it cannot compare anything. (The runs themselves need etcd, which
only `tools/bench` installs; these check the arithmetic and the argument checks.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import load


def _round(kvsvr_put: float, etcd_put: float, kvsvr_p99: float, etcd_p99: float) -> dict[str, Any]:
    def workload(ops: float, p99: float) -> dict[str, Any]:
        return {"mix": "put", "ops_per_s": ops, "p99_ms": p99}
    return {"workloads": [workload(kvsvr_put, kvsvr_p99)],
            "peer": {"workloads": [workload(etcd_put, etcd_p99)]}}


def test_the_verdict_is_on_the_medians_not_on_the_best_round(capsys: pytest.CaptureFixture):
    # One fast round (2.5x) among two slow ones: the median says not met.
    rounds = [_round(2500, 1000, 10, 20), _round(1500, 1000, 10, 20), _round(1800, 1000, 30, 20)]
    assert load.round_ratios(rounds[2]) == {"put": (1.8, 1.5)}
    load.report_rounds(rounds)
    out = capsys.readouterr().out
    assert "2.50x/0.50x  1.50x/0.50x  1.80x/1.50x  | median 1.80x, p99 0.50x" in out
    assert "durable writes 1.80x with p99 0.50x etcd's: not met" in out
    assert "the target (>= 2x etcd's throughput, p99 no worse), on the medians: " in out
    load.report_rounds([_round(2100, 1000, 10, 20), _round(1900, 1000, 10, 20),
                        _round(2300, 1000, 25, 20)])
    assert "durable writes 2.10x with p99 0.50x etcd's: met" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--rounds", "0"], "--rounds: 0; expected 1 or more"),
    (["--rounds", "3", "--replicas", "3"], "needs --peer"),
    (["--rounds", "3", "--replicas", "3", "--peer", "etcd", "--peer-only"], "needs --peer"),
    (["--rounds", "2", "--replicas", "3", "--peer", "etcd", "--kill-halfway", "n1"],
     "nor --kill-halfway"),
])
def test_rounds_that_cannot_compare_are_refused(argv: list[str], says: str,
                                                capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as stopped:
        load.main(argv)
    assert stopped.value.code == 2
    assert says in capsys.readouterr().err
