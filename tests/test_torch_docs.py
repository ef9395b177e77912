"""docs/torch.md's example runs and prints what the page says it prints."""

from __future__ import annotations

import os
import re

import pytest
import torch

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "torch.md")


def example() -> tuple[str, str]:
    """The python block of the page's section "Example: a 2-layer LSTM on a stream" (after the
    recipe, which tests/test_docs.py runs) and the indented block after the word 'prints'."""
    with open(DOC, encoding="utf-8") as fh:
        text = fh.read()
    text = text[text.index("## Example: a 2-layer LSTM on a stream") :]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    after = text[text.index("```", text.index("```python") + 3) :]
    printed = re.search(r"\nprints\n\n((?:    .*\n)+)", after).group(1)
    return code, "".join(line[4:] + "\n" for line in printed.splitlines())


@pytest.mark.cpu_sensitive
def test_docs_example_prints_what_the_page_says(tmp_path, monkeypatch, capsys) -> None:
    """The LSTM example on a stream of chunks, run as written: the same lines, and a saved file."""
    code, expected = example()
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, DOC, "exec"), {"__name__": "docs_example"})
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out == expected
    sd = torch.load(tmp_path / "lstm.pt", weights_only=True)
    assert sd["t"] == 400 and sd["updates"] == 80


@pytest.mark.parametrize(
    "name", ["TBPTT", "ElmanRNN", "Recurrent", "l2_loss", "cross_entropy_loss"]
)
def test_agreed_names_are_exported(name: str) -> None:
    """The names the CLI builds on import from tbptt.torch; tbptt itself does not import torch."""
    import tbptt.torch as tt

    assert name in tt.__all__ and hasattr(tt, name)


def test_import_tbptt_needs_no_torch() -> None:
    """`import tbptt` leaves torch unimported; only tbptt.torch imports it."""
    import subprocess
    import sys

    code = (
        "import sys, tbptt; assert 'torch' not in sys.modules; "
        "import tbptt.torch; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
