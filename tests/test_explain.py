"""`tbptt explain`: the drawn rows, the per-loss table and the cost against Truncation.windows."""

from __future__ import annotations

import re

import pytest

import tbptt
from tbptt import Truncation
from tbptt.analysis.explain import render, summarize
from tbptt.app.cli import main

SCHEDULES = [
    (3, 6, "new", False, 12),
    (4, 4, "new", True, 10),
    (1, 5, "new", False, 9),
    (4, 8, "window", False, 30),
    (3, 7, "last", True, 20),
    (5, 3, "window", True, 17),
    (12, 12, "new", False, 12),
    (2, 9, "new", True, 40),
]


def expected_uses(tr: Truncation, T: int) -> dict[int, tuple[int, int, int]]:
    """Per loss step (updates, shortest, longest depth), counted from the windows directly."""
    depths: dict[int, list[int]] = {t: [] for t in range(1, T + 1)}
    for w in tr.windows(T):
        for t in range(w.i, w.u + 1):
            depths[t].append(t - w.s + 1)
    return {t: (len(d), min(d, default=0), max(d, default=0)) for t, d in depths.items()}


def table_rows(text: str) -> dict[int, tuple[int, int, int]]:
    """The per-loss table of the text: {t: (updates, shortest, longest)} ('-' is 0)."""
    body = text.split("loss of step", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    out = {}
    for line in body:
        t, n, lo, hi = line.split()
        out[int(t)] = (int(n), 0 if lo == "-" else int(lo), 0 if hi == "-" else int(hi))
    return out


def diagram_rows(text: str) -> list[tuple[int, int, str]]:
    """The rows of the diagram: (update number, update step, cells)."""
    rows = []
    for line in text.splitlines():
        m = re.match(r"^\s+(\d+)\s+(\d+)  (.*)$", line)
        if m and "|" in m.group(3):
            rows.append((int(m.group(1)), int(m.group(2)), m.group(3)))
    return rows


@pytest.mark.parametrize("k1,k2,inject,flush,T", SCHEDULES)
def test_table_counts_match_windows(k1, k2, inject, flush, T):
    """Each loss step's updates and shortest/longest depth equal those counted from the windows."""
    tr = Truncation(k1, k2, inject, flush)
    assert table_rows(render(tr, T)) == expected_uses(tr, T)


@pytest.mark.parametrize("k1,k2,inject,flush,T", SCHEDULES)
def test_diagram_rows_match_windows(k1, k2, inject, flush, T):
    """One row per window: its update step, cut, backpropagated steps and injected losses."""
    tr = Truncation(k1, k2, inject, flush)
    windows = tr.windows(T)
    rows = diagram_rows(render(tr, T))
    assert [(j, u) for j, u, _ in rows] == [(j, w.u) for j, w in enumerate(windows, 1)]
    wide = T <= 24
    for (_, _, cells), w in zip(rows, windows, strict=True):
        if wide:  # three characters per step: link, link, node
            nodes = cells[2::3]
            assert cells[3 * (w.s - 1) + 1] == "|"  # the cut just left of step s
        else:  # column 0 is h_0, then one character per step; the cut sits on h_{s-1}
            nodes = cells[1:]
            assert cells[w.s - 1] == "|"
        assert len(nodes) == w.u
        assert nodes.count("*") == w.u - w.i + 1  # injected losses I = [i, u]
        assert nodes.count("o") == w.i - w.s  # backpropagated, loss not injected
        assert set(nodes[w.s - 1 :]) <= {"*", "o"}
        assert all(ch in ".|" for ch in nodes[: w.s - 1])


@pytest.mark.parametrize("k1,k2,inject,flush,T", SCHEDULES)
def test_cost_line_matches_windows(k1, k2, inject, flush, T):
    """The cost is the sum over windows of u - s + 1 backward steps, per forward step."""
    tr = Truncation(k1, k2, inject, flush)
    backward = sum(w.u - w.s + 1 for w in tr.windows(T))
    text = " ".join(render(tr, T).split())
    assert f"{backward} backward steps for {T} forward steps = {backward / T:.2f} per step" in text
    assert f"k2/k1 = {k2 / k1:.2f}" in text
    assert f"{len(tr.windows(T))} update" in text.split("\n")[0]


def test_grouped_table_for_long_sequences():
    """Past 40 steps the table groups equal rows; the groups still account for every step."""
    tr, T = Truncation(5, 12, "window", False), 203
    want = expected_uses(tr, T)
    body = render(tr, T).split("which steps", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    total = 0
    for line in body:
        m = re.match(r"^\s+(\d+) x\s+(\d+)\s+(\S+)\s+(\S+)\s+(\d+)", line)
        size, n, lo, hi, first = (m.group(k) for k in range(1, 6))
        key = (int(n), 0 if lo == "-" else int(lo), 0 if hi == "-" else int(hi))
        assert want[int(first)] == key
        assert sum(1 for v in want.values() if v == key) == int(size)
        total += int(size)
    assert total == T
    assert "not drawn" in render(tr, T)


def test_notes_name_the_special_cases():
    """Exact BPTT, disjoint chunks (with every loss or the last), unused and repeated losses."""
    assert "exact BPTT" in render(Truncation(10, 10), 10)
    assert "disjoint chunks" in render(Truncation(4, 4), 12)
    assert "at the chunk's last step" in render(Truncation(4, 4, "last"), 12)
    assert "steps 11-12" in " ".join(render(Truncation(5, 5), 12).split())
    assert "more than once" in render(Truncation(2, 4, "window"), 8)
    s = summarize(Truncation(4, 8, "window"), 30)
    assert s.unused == [29, 30] and s.repeated == list(range(1, 25))


def test_cli_prints_the_rendering(capsys):
    """`tbptt explain` prints exactly render() of the same Truncation."""
    assert main(["explain", "--k1", "3", "--k2", "6", "--steps", "12"]) == 0
    assert capsys.readouterr().out == render(tbptt.Truncation(3, 6), 12)


@pytest.mark.parametrize(
    "k1,k2,inject,steps",
    [
        ("5", "3", "new", "10"),
        ("0", "3", "new", "10"),
        ("2.5", "4", "new", "8"),
        ("x", "4", "last", "8"),
    ],
)
def test_cli_invalid_schedule_is_the_library_error(capsys, k1, k2, inject, steps):
    """An invalid schedule exits 2 with the library's message on one line."""
    args = ["explain", "--k1", k1, "--k2", k2, "--steps", steps, "--inject", inject]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    convert = lambda s: int(s) if s.isdigit() else float(s) if s.replace(".", "").isdigit() else s  # noqa: E731
    with pytest.raises((ValueError, TypeError)) as exc:
        Truncation(convert(k1), convert(k2), inject)
    assert err == f"tbptt explain: error: {exc.value}"
    assert "\n" not in err


def test_cli_invalid_steps(capsys):
    """A sequence length below 1 is a one-line error."""
    assert main(["explain", "--k1", "2", "--k2", "2", "--steps", "0"]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_cli_writes_the_figure(tmp_path, capsys, suffix, magic):
    """--out writes the figure in the asked format and leaves no temporary file."""
    out = tmp_path / f"schedule{suffix}"
    assert main(["explain", "--k1", "2", "--k2", "5", "--steps", "9", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert f"Wrote {out}" in capsys.readouterr().out


def test_cli_rejects_unknown_figure_format(tmp_path, capsys):
    """An --out suffix other than .png/.svg/.pdf is a one-line error, nothing written."""
    out = tmp_path / "schedule.gif"
    assert main(["explain", "--k1", "2", "--k2", "5", "--steps", "9", "--out", str(out)]) == 2
    assert "out must end in .png, .svg or .pdf" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
