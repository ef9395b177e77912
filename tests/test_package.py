"""The package's promises about itself: a numpy-only core, extras imported only where used."""

import subprocess
import sys

import tbptt


def test_import_tbptt_needs_numpy_only():
    """`import tbptt` (and its CLI parser) loads neither torch, matplotlib, tqdm nor numba."""
    code = (
        "import sys, tbptt, tbptt.cli; tbptt.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'matplotlib', 'tqdm', 'jax', 'numba') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_public_names_exist():
    """Everything in tbptt.__all__ is importable from the package."""
    assert all(hasattr(tbptt, name) for name in tbptt.__all__)
