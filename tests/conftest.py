"""Shared set-up for the test suite: the oracles in tests/reference.py import as `reference`."""

from __future__ import annotations

import os
import sys

# pytest's default import mode puts this folder on sys.path; make `import reference` work under
# --import-mode=importlib too.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
