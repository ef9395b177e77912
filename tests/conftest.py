"""Shared set-up for the test suite: the oracles in tests/reference.py import as `reference`."""

from __future__ import annotations

import os
import sys

# pytest's default import mode puts this folder on sys.path; make `import reference` work under
# --import-mode=importlib too.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# One thread per BLAS and per torch: the suite runs on 2 shared cores, where two spinning BLAS
# threads per process slow small products by 10x. torch reads OMP_NUM_THREADS when it is first
# imported (after this file), and subprocesses (CLI tests, torchrun) inherit it.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
