"""Every code snippet in README.md and docs/*.md runs, and the output it shows is what it prints.

The rules, for whoever writes documentation:

- ```python blocks run in order, one namespace per file, in a fresh temporary working directory
  (so blocks may write files).
- ```sh blocks: every line is a `tbptt ...` command, run in-process (tbptt.app.cli.main); it must
  exit 0. A ```sh block with any other command (python examples/..., make, pip) must be marked.
- A ```text block that follows a python or sh block (with only blank lines, or the word "prints",
  between them) is that block's expected standard output, compared exactly (trailing spaces
  ignored).
- Markers, on the line right before the opening fence:
  `<!-- no-test -->` skips the block (say why nearby: it needs minutes, or several processes);
  `<!-- slow -->` marks the whole file's test slow (it still runs in the full suite);
  `<!-- tolerance: rel=R abs=A -->` compares the numbers of the expected output with that
  tolerance (|got - want| <= A + R |want|) and the rest of the text exactly. Use it where a
  number depends on floating-point rounding (a BLAS kernel, a CPU's instruction set, chaotic
  training); the page says in words what is compared. Without it, outputs are compared exactly,
  so a page shows only figures that hold on every machine.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tbptt.app.cli import main as tbptt_main

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NO_TEST, SLOW = "<!-- no-test -->", "<!-- slow -->"
TOLERANCE = re.compile(r"^<!-- tolerance: rel=(\S+) abs=(\S+) -->$")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
RUN = ("python", "sh")


def blocks(text: str) -> list[dict]:
    """Runnable blocks of a Markdown text: line, lang, marker, code, expected output (or None)."""
    fences = list(FENCE.finditer(text))
    out = []
    for j, m in enumerate(fences):
        lang = m.group(1)
        if lang not in RUN:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        expected = None
        if j + 1 < len(fences) and fences[j + 1].group(1) == "text":
            if text[m.end() : fences[j + 1].start()].strip() in ("", "prints"):
                expected = fences[j + 1].group(2)
        out.append(
            {
                "line": text.count("\n", 0, m.start()) + 1,
                "lang": lang,
                "marker": before if before in (NO_TEST, SLOW) or TOLERANCE.match(before) else "",
                "code": m.group(2),
                "expected": expected,
            }
        )
    return out


def documents() -> list:
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    params = []
    for p in paths:
        found = blocks(p.read_text(encoding="utf-8")) if p.exists() else []
        if found:
            slow = any(b["marker"] == SLOW for b in found)
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(p, marks=marks, id=str(p.relative_to(ROOT))))
    return params


def same_text(got: str, want: str, marker: str = "") -> bool:
    """Equal line by line (trailing spaces ignored); numbers within the marker's tolerance."""
    norm = lambda s: [line.rstrip() for line in s.strip("\n").splitlines()]  # noqa: E731
    tol = TOLERANCE.match(marker)
    if tol is None:
        return norm(got) == norm(want)
    rel, abs_ = float(tol.group(1)), float(tol.group(2))
    a, b = "\n".join(norm(got)), "\n".join(norm(want))
    if NUMBER.split(a) != NUMBER.split(b):  # the words around the numbers, exactly
        return False
    pairs = zip(map(float, NUMBER.findall(a)), map(float, NUMBER.findall(b)), strict=True)
    return all(abs(x - y) <= abs_ + rel * abs(y) for x, y in pairs)


def run_sh(code: str, where: str) -> str:
    out = io.StringIO()
    for line in code.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        argv = shlex.split(line, comments=True)
        if argv[0] != "tbptt":
            raise AssertionError(f"{where}: `{line}` is not a tbptt command; mark it {NO_TEST}")
        with contextlib.redirect_stdout(out):
            code_ = tbptt_main(argv[1:])
        assert code_ == 0, f"{where}: `{line}` exited with {code_}"
    return out.getvalue()


def test_parser_reads_markers_and_outputs():
    """The parser finds blocks, their line numbers, markers and expected outputs."""
    doc = (
        "x\n<!-- no-test -->\n```python\nraise SystemExit\n```\n<!-- slow -->\n```python\n"
        "print(1)\n```\n\n```text\n1\n```\n```sh\ntbptt --version\n```\n```toml\na = 1\n```\n"
    )
    got = [(b["line"], b["lang"], b["marker"], b["code"], b["expected"]) for b in blocks(doc)]
    assert got == [
        (3, "python", NO_TEST, "raise SystemExit\n", None),
        (7, "python", SLOW, "print(1)\n", "1\n"),
        (14, "sh", "", "tbptt --version\n", None),
    ]


def test_tolerance_marker_compares_numbers_within_it_and_words_exactly():
    """A tolerance marker lets numbers differ within it, never the words or the number count."""
    marker = "<!-- tolerance: rel=0.1 abs=0.01 -->"
    assert blocks(f"{marker}\n```python\nprint(1)\n```\n")[0]["marker"] == marker
    assert same_text("loss 0.48 -> 0.475\n", "loss 0.47 -> 0.47", marker)
    assert not same_text("loss 0.48 -> 0.60", "loss 0.47 -> 0.47", marker)
    assert not same_text("cost 0.48 -> 0.47", "loss 0.47 -> 0.47", marker)
    assert not same_text("loss 0.47 -> 0.47 0.1", "loss 0.47 -> 0.47", marker)
    assert not same_text("loss 0.48 -> 0.47", "loss 0.47 -> 0.47")  # no marker: exact


@pytest.mark.cpu_sensitive
@pytest.mark.parametrize("path", documents())
def test_snippets_run(path: Path, tmp_path, monkeypatch):
    """Each block of the file runs without error and prints the output the file shows."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__doc_snippet__"}
    for b in blocks(path.read_text(encoding="utf-8")):
        if b["marker"] == NO_TEST:
            continue
        where = f"{path.name}, block at line {b['line']}"
        out = io.StringIO()
        if b["lang"] == "python":
            with contextlib.redirect_stdout(out):
                exec(compile(b["code"], where, "exec"), namespace)
            got = out.getvalue()
        else:
            got = run_sh(b["code"], where)
        if b["expected"] is not None:
            assert same_text(got, b["expected"], b["marker"]), f"{where} printed:\n{got}"
