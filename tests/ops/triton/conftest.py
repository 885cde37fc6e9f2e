"""The kernel tests below tests/ops share tests/ops/interpreter_harness.py: make it importable from here."""

import sys
from pathlib import Path

_OPS_TESTS = str(Path(__file__).resolve().parents[1])
if _OPS_TESTS not in sys.path:
    sys.path.insert(0, _OPS_TESTS)
