"""Every code snippet in README.md and docs/*.md runs, and the output it shows is what it prints.

The rules, for whoever writes documentation:

- ```python blocks run in order, one namespace per file, in a fresh temporary working directory
  (so blocks may write files).
- ```sh blocks: every line is a `tbptt ...` command, run in-process (tbptt.cli.main); it must
  exit 0. A ```sh block with any other command (python examples/..., make, pip) must be marked.
- A ```text block that follows a python or sh block (with only blank lines, or the word "prints",
  between them) is that block's expected standard output, compared exactly (trailing spaces
  ignored).
- Markers, on the line right before the opening fence:
  `<!-- no-test -->` skips the block (say why nearby: it needs minutes, or several processes);
  `<!-- slow -->` marks the whole file's test slow (it still runs in the full suite).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tbptt.cli import main as tbptt_main

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NO_TEST, SLOW = "<!-- no-test -->", "<!-- slow -->"
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
                "marker": before if before in (NO_TEST, SLOW) else "",
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


def same_text(got: str, want: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.strip("\n").splitlines()]  # noqa: E731
    return norm(got) == norm(want)


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
            assert same_text(got, b["expected"]), f"{where} printed:\n{got}"
