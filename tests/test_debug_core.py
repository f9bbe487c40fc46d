"""Which build of the core the tests run on: tools/test runs the core's tests a second time on
a debug build, and this makes sure that second pass really imports it."""

from __future__ import annotations

import os

import pytest

from kvsvr import _core


def test_the_expected_build_of_the_core_is_loaded():
    expected = os.environ.get("KVSVR_EXPECT_DEBUG_CORE") == "1"
    assert _core.DEBUG_BUILD is expected, f"loaded {_core.__file__}"


@pytest.mark.skipif(not _core.DEBUG_BUILD, reason="bounds checks exist only in the debug build")
def test_debug_build_checks_bounds():
    with pytest.raises(_core.RecordError):
        _core.decode_record(b"")
