"""Every figure the `tbptt` command draws, in one place: matplotlib is imported here only.

    loss_curve(rows, cfg, unit, path)         tbptt train's loss.png: training and validation loss
    schedule_figure(truncation, T, path)      tbptt explain --out: the windows and per-loss depths
    bias_figure(rows, path, estimate, title)  tbptt bias: relative error and cosine against k2
    lags_figure(profile, path, title)         tbptt bias: the per-lag gradient and its fitted decay
    methods_figure(rows, title)               tbptt bias --method: bias, noise and cost per method

Each function renders its figure in memory and returns the file's bytes in the format `fmt`
("png", "svg" or "pdf"); the command writes them with tbptt.files.atomic_write once everything it
writes is ready, so a failure leaves no partial output.
"""

from __future__ import annotations

import importlib.util
import io
import os

import numpy as np

from ..analysis.bias import TINY, BiasRow, LagProfile
from ..analysis.explain import summarize
from ..errors import InputError
from ..schedule import Truncation

FORMATS = (".png", ".svg", ".pdf")
PLOT_STEPS = 120  # the schedule figure draws at most this many steps


def available() -> bool:
    """Whether matplotlib (the `plot` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def require(what: str) -> None:
    """InputError in one line, before any work, when `what` needs matplotlib and it is missing."""
    if not available():
        raise InputError(f"{what} needs matplotlib: pip install 'tbptt[plot]'")


def _pyplot():
    require("drawing a figure")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_of(path: str | os.PathLike) -> str:
    """The figure format a file name asks for; InputError unless .png, .svg or .pdf."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise InputError(f"out must end in .png, .svg or .pdf, got {os.fspath(path)!r}")
    return suffix[1:]


def _render(fig, fmt: str) -> bytes:
    """The figure's file in format fmt; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def loss_curve(rows: list[dict], title: str, xlabel: str, unit: str, fmt: str = "png") -> bytes:
    """loss.png: training and validation loss against the characters (steps x streams) seen."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for key, label in (("train_loss", "training"), ("valid_loss", "validation")):
        pts = [(float(r["chars"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            marker = "o" if key == "valid_loss" else None
            ax.plot(*zip(*pts, strict=True), marker=marker, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first record
        ax.legend()
    return _render(fig, fmt)


def schedule_figure(truncation: Truncation, T: int, fmt: str = "png") -> bytes:
    """`tbptt explain --out`: the schedule and the per-loss table as a figure."""
    s = summarize(truncation, T)
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    full_T = T
    T = min(T, PLOT_STEPS)  # draw the first PLOT_STEPS steps; the pattern repeats every k1
    windows = [w for w in s.windows if w.u <= T]
    uses = s.uses[:T]
    rows = len(windows)
    height = min(1.2 + 0.3 * rows, 10.0) + 2.4
    fig, (ax, ax2) = plt.subplots(
        2,
        1,
        figsize=(min(3 + 0.32 * T, 16), height),
        gridspec_kw={"height_ratios": [max(rows, 2), 4]},
        sharex=True,
    )
    segments, fwd, inj, thru, cuts = [], [], [], [], []
    for j, w in enumerate(windows):
        y = -j
        segments.append([(w.s - 0.5, y), (w.u, y)])
        cuts.append([(w.s - 0.5, y - 0.35), (w.s - 0.5, y + 0.35)])
        fwd += [(t, y) for t in range(1, w.s)]
        thru += [(t, y) for t in range(w.s, w.i)]
        inj += [(t, y) for t in range(w.i, w.u + 1)]
    ax.add_collection(LineCollection(segments, colors="tab:blue", linewidths=1.5, zorder=1))
    ax.add_collection(LineCollection(cuts, colors="black", linewidths=2, zorder=2))
    size = max(8, min(40, 1200 / max(T, 1)))
    for pts, kw in (
        (fwd, dict(marker=".", color="0.7", s=size / 3, label="forward only")),
        (
            thru,
            dict(
                marker="o",
                facecolors="white",
                edgecolors="tab:blue",
                s=size,
                label="backpropagated, loss not injected",
            ),
        ),
        (inj, dict(marker="o", color="tab:red", s=size, label="loss injected")),
    ):
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, zorder=3, **kw)
    ax.plot([], [], color="black", lw=2, label="cut: $h_{s-1}$ held constant")
    ax.set_ylim(-rows + 0.4, 0.8)
    ax.set_yticks([-j for j in range(rows)] if rows <= 30 else [])
    if rows <= 30:
        ax.set_yticklabels([f"u={w.u}" for w in windows])
    ax.set_ylabel("update")
    ax.set_title(
        f"{truncation.describe()}, T = {full_T}"
        + (f" (first {T} steps drawn)" if full_T > T else "")
        + f": {s.backward_steps} backward steps, {s.cost:.2f} per forward step "
        f"(k2/k1 = {s.steady_cost:.2f})",
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    # lower panel: each loss step's depth range, and how many updates inject it
    top = max([hi for _, _, hi in uses] + [1])
    for t, (n, lo, hi) in enumerate(uses, 1):
        if n == 0:
            ax2.text(t, 0.3, "0", ha="center", va="bottom", fontsize=7, color="0.4")
            continue
        ax2.plot([t, t], [lo, hi], color="tab:red", lw=3, solid_capstyle="butt")
        ax2.plot([t, t], [lo, hi], ls="", marker="o", ms=3, color="tab:red")
        if T <= 80:
            ax2.text(t, hi + 0.25, str(n), ha="center", va="bottom", fontsize=7, color="0.3")
    ax2.set_ylim(0, top + 1.2)
    ax2.set_ylabel("depth (steps)")
    ax2.set_xlabel("loss of step t")
    ax2.set_xlim(0.3, T + 0.7)
    ax2.set_title(
        "each loss: shortest to longest depth (steps its gradient travels back); "
        "the number is how many updates inject it",
        fontsize=8,
    )
    fig.tight_layout()
    return _render(fig, fmt)


def bias_figure(
    rows: list[BiasRow],
    estimate: dict[int, float] | None = None,
    title: str = "",
    fmt: str = "png",
) -> bytes:
    """Relative error and cosine against k2, one line per inject mode (and k1), and the relative
    error per parameter for the first mode."""
    plt = _pyplot()
    groups: dict[tuple[str, int | None], list[BiasRow]] = {}
    for r in rows:
        groups.setdefault((r.truncation.inject, r.truncation.k1), []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (inject, k1), rs in groups.items():
        k2 = [r.truncation.k2 for r in rs]
        label = f"inject={inject}, k1={k1}"
        axes[0].plot(k2, [max(r.rel_error, 1e-17) for r in rs], marker="o", label=label)
        axes[1].plot(k2, [r.cosine for r in rs], marker="o", label=label)
    if estimate:
        ks = sorted(estimate)
        axes[0].plot(
            ks,
            [estimate[k] for k in ks],
            ls="--",
            color="black",
            label="Aicher et al. bound (estimated)",
        )
    first = next(iter(groups.values()))
    exact_names = []
    for name in first[0].per_param:
        errs = [r.per_param[name][1] for r in first]
        if max(errs) < 1e-12:  # e.g. C and c with inject=new: each loss used once, exactly
            exact_names.append(name)
            continue
        axes[2].plot([r.truncation.k2 for r in first], errs, marker=".", label=name)
    if exact_names:
        axes[2].plot([], [], ls="", label=f"exact: {', '.join(exact_names)}")
    for ax, ylabel in zip(
        axes, ("relative error", "cosine similarity", "relative error"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k2 (steps backpropagated)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    if len(exact_names) < len(first[0].per_param):  # a log scale needs something to draw
        axes[2].set_yscale("log")
    axes[0].set_title("||g_trunc - g_exact|| / ||g_exact||", fontsize=9)
    axes[1].set_title("cos(g_trunc, g_exact)", fontsize=9)
    inj = first[0].truncation
    axes[2].set_title(f"per parameter (inject={inj.inject}, k1={inj.k1})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _render(fig, fmt)


def lags_figure(profile: LagProfile, title: str = "", fmt: str = "png") -> bytes:
    """phi_tau on a log scale with the fitted geometric decay."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    keep = profile.norms > TINY
    ax.semilogy(
        profile.lags[keep], profile.norms[keep], marker=".", label="mean ||dl_t/dh_(t-tau)||"
    )
    if np.isfinite(profile.rate) and profile.rate > 0:
        ax.semilogy(
            profile.lags,
            profile.fitted(),
            ls="--",
            color="black",
            label=f"fit: beta = {profile.rate:.3f} (from lag {profile.fit_from})",
        )
    ax.set_xlabel("lag tau (steps)")
    ax.set_ylabel("norm")
    ax.set_title(title or "Per-lag gradient (Pascanu et al. 2013, eq. 4)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _render(fig, fmt)


def methods_figure(rows: list, title: str = "", fmt: str = "png") -> bytes:
    """tbptt bias --method: each method's bias beside the noise of its draws, its error per
    estimate, and its time per step (rows of tbptt.analysis.estimators.compare)."""
    plt = _pyplot()
    names = [r.method for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(rows) + 2), sharey=True)
    floor = 1e-17  # log axes: an exact method's zero is drawn at the floor
    axes[0].barh(y - 0.2, [max(r.bias, floor) for r in rows], 0.4, label="bias ||E g - g*||")
    axes[0].barh(y + 0.2, [max(r.noise, floor) for r in rows], 0.4, label="noise sqrt(V / N)")
    axes[1].barh(y, [max(r.error, floor) for r in rows], 0.6, color="tab:purple")
    axes[2].barh(y, [1e6 * r.seconds_per_step for r in rows], 0.6, color="tab:gray")
    labels = ("relative to ||g*||", "one estimate's error, relative", "microseconds per step")
    for ax, xlabel in zip(axes, labels, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _render(fig, fmt)
