"""Make ``import kernels`` mean the repository's package inside this test folder.

With a tests/conftest.py and pytest's default import mode, ``tests/`` lands on sys.path, and this
folder (tests/kernels, no __init__.py) would then be importable as a namespace package called
``kernels`` whenever the repository root itself is not on sys.path. Put the root first and drop a
namespace ``kernels`` picked up by an earlier import (the robust fix is ``pythonpath = ["."]`` in
the pytest configuration).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
_mod = sys.modules.get("kernels")
if _mod is not None and getattr(_mod, "__file__", None) is None:  # a namespace package: the wrong one
    for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
        del sys.modules[name]
