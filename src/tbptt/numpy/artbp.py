"""ARTBP (Tallec and Ollivier 2017, "Unbiasing Truncated Backpropagation Through Time") in the
numpy engine: the frozen estimate, and the online rule the trainer shell holds (an update at every
cut).

SEMANTICS.md 8. Possible boundaries lie after steps b, 2b, 3b, ...; at the boundary after step tau
the cut falls with probability c_L, L = tau - (the previous cut, or 0) the steps since it, drawn
once for all streams (one uniform number per possible boundary, in order). The end of the sequence
is a cut. Each window (s, u) between two cuts backpropagates its own losses back to its start:

    (8.11) delta_t = C^T e_t + w_t A^T (f'(a_{t+1}) * delta_{t+1}),   s <= t <= u,  delta_{u+1} = 0
           w_t = 1 / (1 - c_L) at a possible boundary after step t that was not cut, else 1
    (8.12) g_A = sum_t (delta_t * f'(a_t)) h_{t-1}^T, likewise B and b; C and c as (2.4)

A contribution that crosses the uncut boundaries tau_1, ..., tau_k survives with probability
prod (1 - c_L) and is weighted by prod 1 / (1 - c_L), so E[estimate] = exact BPTT. c = 0 is exact
BPTT; c = 1 with b = 1 is TBPTT(1, 1).

How it is computed. With Pi_t = prod_{t <= tau < u} w_tau (the weights between t and the window's
end), delta'_t = delta_t / Pi_t obeys the plain recursion (3.1) with injections C^T e_t / Pi_t, so
each window is one call of elman.backprop, as a window of TBPTT is, and r_t = Pi_t r'_t; the
sums (8.12) are one product each over the stacked steps of all windows, as for TBPTT.
Pi_t is the inverse of the probability that the window reached back past t, so it stays moderate
except in windows too improbable to occur; when it would overflow the dtype the window is split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..checks import check_int, check_real, is_real
from ..errors import InputError
from ..generators import as_generator, rng_state, set_rng_state
from .elman import ElmanRNN, Trajectory, backprop, parameter_gradients, project, run
from .functions import activation
from .history import History, KeepsSteps
from .optim import SGD, Adam
from .rule import Shell, as_saved, check_saved_setting, damaged
from .trainer import TBPTT, check_model

Array = np.ndarray
Probability = float | Callable[[int], float]

LOG_RANGE = {np.dtype(np.float64): 600.0, np.dtype(np.float32): 60.0}  # |log Pi| kept below


def check_c(c: object) -> Probability:
    """c: a probability in [0, 1], or a callable of L (the steps since the last cut)."""
    if callable(c):
        return c  # type: ignore[return-value]  (its values are checked where used: probability)
    if not is_real(c):
        raise InputError(f"c must be a probability in [0, 1] or a callable of L, got {c!r}")
    return check_real("c", c, low=0, high=1, expected="a probability in [0, 1]")


def probability(c: Probability, L: int) -> float:
    """c_L, checked: InputError if a callable c returns anything but a number in [0, 1]."""
    if not callable(c):
        return c
    v = c(L)
    if not is_real(v):
        raise InputError(f"c({L}) returned {v!r}; expected a probability in [0, 1]")
    if not 0 <= v <= 1:
        raise InputError(f"c({L}) returned {v!r}; expected a probability in [0, 1]")
    return float(v)


def check_max_length(value: object, b: int) -> int | None:
    if value is None:
        return None
    v = check_int("biased_max_length", value)
    if v < b:
        raise InputError(f"biased_max_length must be at least b = {b}, got {v}")
    return v


class Cuts:
    """The random cut decisions at the possible boundaries after steps b, 2b, ... (8.11).

    decide(t0, t1) draws the boundaries after steps t0+1..t1 in order, one uniform number each,
    so that the same generator gives the same cuts however the stream is divided. `last` is the
    last cut (0 at the start).
    """

    def __init__(self, c: Probability, b: int, rng: np.random.Generator, max_length: int | None):
        self.c, self.b, self.rng, self.max_length = c, b, rng, max_length
        self.last = 0
        self.warned = False  # c reached 1 (said once)

    @classmethod
    def checked(
        cls, c: object, b: object, rng: np.random.Generator, biased_max_length: object
    ) -> Cuts:
        """The cuts of ARTBP's options as a user gives them, each checked (InputError naming it);
        a callable c is tried on the first 16 lengths, so a bad one is told now, not after hours
        of training. Both engines' rules hold one."""
        c = check_c(c)
        b = check_int("b", b)
        max_length = check_max_length(biased_max_length, b)
        if callable(c):
            for L in range(b, 17 * b, b):
                probability(c, L)
        return cls(c, b, rng, max_length)

    def decide(self, t0: int, t1: int) -> tuple[list[int], dict[int, float]]:
        """Cuts among the boundaries after steps t0+1..t1, and the weight 1 / (1 - c_L) of
        every possible boundary there that was not cut: (cut steps, {step: weight})."""
        b = self.b
        taus = np.arange((t0 // b + 1) * b, t1 + 1, b)  # boundaries after these steps
        u = self.rng.random(len(taus))
        if not callable(self.c) and self.max_length is None:  # L does not matter: vectorized
            if self.c >= 1 and len(taus):
                self._forced(b)
            cut = u < self.c
            cuts = taus[cut].tolist()
            if cuts:
                self.last = cuts[-1]
            w = 1.0 / (1.0 - self.c) if self.c < 1 else 1.0
            return cuts, dict.fromkeys(taus[~cut].tolist(), w)
        cuts, weights = [], {}
        for tau, draw in zip(taus.tolist(), u.tolist(), strict=True):
            L = tau - self.last
            c = probability(self.c, L)
            forced = self.max_length is not None and L + b > self.max_length
            if c >= 1:
                self._forced(L)
            if forced or draw < c:
                cuts.append(tau)
                self.last = tau
            else:
                weights[tau] = 1.0 / (1.0 - c)  # c < 1 here: a boundary with c_L = 1 is cut
        return cuts, weights

    def _forced(self, L: int) -> None:
        """SEMANTICS.md 8: a c that reaches 1 forces a cut, a truncation; say so once."""
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"ARTBP's cut probability reached 1 (c_L = 1 at L = {L} steps since the last "
                "cut): such a boundary is always cut, a truncation, and the gradient estimate is "
                "biased (unbiased needs c_L < 1 at every possible boundary before the end)",
                stacklevel=3,
            )


def window_gradients(
    model: ElmanRNN,
    traj: Trajectory,
    e: Array,
    t0: int,
    cuts: list[int],
    weights: dict[int, float],
) -> dict[str, Array]:
    """(8.11)-(8.12) for the steps t0+1..t0+L of a trajectory cut after the steps in `cuts` (the
    last step is a cut): the summed parameter gradients of every window."""
    L, batch, n = traj.h.shape
    dtype = traj.h.dtype
    logw = np.zeros(L)  # log w_t, t = t0+1..t0+L
    if weights:
        taus = np.fromiter(weights.keys(), np.int64, len(weights))
        w = np.fromiter(weights.values(), float, len(weights))
        inside = (taus > t0) & (taus < t0 + L)
        logw[taus[inside] - t0 - 1] = np.log(w[inside])
    ends = sorted({tau - t0 for tau in cuts if t0 < tau <= t0 + L} | {L})  # window ends, 1..L
    ccs = np.concatenate([[0.0], np.cumsum(logw)])  # ccs[k] = sum_{t <= k} log w_t
    end_of = np.searchsorted(ends, np.arange(1, L + 1))  # the window of each step
    logpi = ccs[np.asarray(ends)[end_of] - 1] - ccs[np.arange(L)]  # log Pi_t
    limit = LOG_RANGE[np.dtype(dtype)]
    R = project(e, model.C)  # (L, batch, n): C^T e_t, overwritten window by window by r_t
    safe = logpi.max() <= limit
    if safe:
        pi = np.exp(logpi).astype(dtype)[:, None, None]  # (L, 1, 1) Pi_t
        R /= pi  # C^T e_t / Pi_t
    lo = 0
    for u in ends:  # one call of the recursion per window: a cut stops it
        sl = slice(lo, u)
        cut = None if traj.reset is None else traj.reset[sl]
        if safe:
            backprop(traj.fprime[sl], model.A, R[sl], cut=cut, out=R[sl])  # r'_t
        else:  # a window too improbable to scale at once (see the module docstring)
            cut = np.zeros((u - lo, batch), bool) if cut is None else cut
            R[sl] = _blocks(model.A, traj.fprime[sl], R[sl], logw[sl], cut, limit / 2)
        lo = u
    if safe:
        R *= pi  # r_t = Pi_t r'_t
    return parameter_gradients(
        R, traj.h_prev, traj.x, e, traj.h, model.b is not None, model.c is not None
    )


def _blocks(A, fprime, dh, logw, cut, limit) -> Array:
    """(8.11) block by block from the end, each block short enough that its own Pi stays below
    e^limit; the gradient leaving a block is carried into the one before, times that boundary's
    weight. One window (no cut inside). Returns R (L, batch, n)."""
    L = len(fprime)
    R = np.empty_like(fprime)
    carry, hi = None, L
    while hi > 0:
        lo, acc = hi - 1, 0.0
        while lo > 0 and acc + logw[lo - 1] <= limit:
            acc += logw[lo - 1]
            lo -= 1
        logpi = np.concatenate([np.cumsum(logw[lo : hi - 1][::-1])[::-1], [0.0]])  # in block
        pi = np.exp(logpi).astype(fprime.dtype)[:, None, None]
        block = dh[lo:hi] / pi
        _, back = backprop(fprime[lo:hi], A, block, carry, cut[lo:hi], out=block)
        R[lo:hi] = block * pi
        carry = None if lo == 0 else back * (pi[0, 0, 0] * np.exp(logw[lo - 1]))
        hi = lo
    return R


def artbp_gradients(
    model: ElmanRNN,
    x: Array,
    y: Array,
    h0: Array | None = None,
    loss: str = "l2",
    *,
    c: Probability,
    b: int = 1,
    rng: int | np.random.Generator | None,
    mask: Array | None = None,
    reset: Array | None = None,
    biased_max_length: int | None = None,
) -> dict[str, Array]:
    """One ARTBP estimate of the gradient of L = sum_t l_t, parameters fixed over the sequence.

    The arguments are those of tbptt.gradients, and: c, the cut probability, a number in [0, 1] or
    a callable of L (the steps since the last cut); b, cuts may fall after steps b, 2b, ...; rng, a
    seed, a numpy Generator or None (fresh entropy). E[estimate] = exact BPTT while c_L < 1 at
    every possible boundary; where c reaches 1 the cut is forced, a truncation, and the estimate
    biased (a warning says so).
    biased_max_length: also cut wherever a window would grow longer than this; the estimate is
    then biased (dependencies across such a cut are lost), as the name says.
    Returns {"A", "B", "C"[, "b", "c"]}.
    """
    check_model(model)
    c = check_c(c)
    b = check_int("b", b)
    max_length = check_max_length(biased_max_length, b)
    rng = as_generator(rng)
    r = run(model, x, y, h0, loss, mask, reset)
    cuts, weights = Cuts(c, b, rng, max_length).decide(0, len(r.traj.h) - 1)  # the end is a cut
    return window_gradients(model, r.traj, r.e, 0, cuts, weights)


# -- online: an update at every cut (the rule the trainer shell holds) ---------------------------
#
#   (8.14) theta <- optimizer(theta, g^W),   W = (previous cut, u],   at every cut u and at the end
#
# The cuts are drawn as the steps arrive (one uniform number per possible boundary, the same draws
# as artbp_gradients with the same generator). Every step of a window ran with the same parameters
# (updates happen only at cuts), so the update is the exact derivative of the window's compensated
# losses through the computation that produced them: section 5's canonical rule. The window's steps
# are kept (history.py), so memory grows with the window: its length is random and unbounded unless
# biased_max_length forces a cut, which makes the estimate biased.
FORMAT = "tbptt.ARTBP/1"


def ARTBP(
    model: ElmanRNN,
    optimizer: SGD | Adam,
    *,
    c: Probability,
    b: int = 1,
    rng: int | np.random.Generator | None = None,
    biased_max_length: int | None = None,
    loss: str = "l2",
    clip: float | None = None,
    h0: Array | None = None,
    reduction: str = "sum",
) -> TBPTT:
    """Train an ElmanRNN online with ARTBP (Tallec and Ollivier 2017), updating at every cut: a
    tbptt.TBPTT trainer holding ARTBP's rule.

    Args:
        model: the ElmanRNN, trained in place (after each update model.A ... are the new values).
        optimizer: tbptt.SGD or tbptt.Adam.
        c: the probability of a cut at a possible boundary, a number in [0, 1] or a callable of L,
            the steps since the last cut (c = 1, b = 1: TBPTT(1, 1); c = 0: one update at the end).
            Unbiased only while c_L < 1: where c reaches 1 the cut is forced, a truncation (a
            warning says so once).
        b: cuts may fall after steps b, 2b, ... of the stream.
        rng: a seed, a numpy Generator or None (fresh entropy) for the cuts; saved with the
            trainer, so a resumed run draws the same cuts.
        biased_max_length: also cut where a window would grow longer than this many steps, to
            bound memory; the gradient estimate is then biased.
        loss, clip, h0, reduction: as tbptt.TBPTT (reduction="mean" divides each update by the
            number of the window's unmasked losses).
    """
    rule = ARTBPRule(c=c, b=b, rng=rng, biased_max_length=biased_max_length)
    return TBPTT(model, rule, optimizer, loss=loss, clip=clip, h0=h0, reduction=reduction)


class ARTBPRule(KeepsSteps):
    """ARTBP's rule: updates at the random cuts (drawn chunk by chunk, before its steps run) and
    at the end, each the compensated window (8.11)-(8.12) since the previous cut."""

    name = "ARTBP"
    format = FORMAT
    dense_inputs = True
    saved_floats: tuple[str, ...] = ("window.",)

    def __init__(
        self,
        *,
        c: Probability,
        b: int = 1,
        rng: int | np.random.Generator | None = None,
        biased_max_length: int | None = None,
    ) -> None:
        self.rng = as_generator(rng)
        self.cuts = Cuts.checked(c, b, self.rng, biased_max_length)
        self.b, self.max_length = self.cuts.b, self.cuts.max_length
        self.weights: dict[int, float] = {}  # 1 / (1 - c_L) at the window's uncut boundaries
        self.history: History | None = None  # x_t, h_t, e_t of the window's steps
        self.resets: list[Array] = []  # (L_piece, batch) per piece of the window
        self.counts: list[float] = []  # the unmasked losses per piece

    @property
    def c(self) -> Probability:
        return self.cuts.c

    def __repr__(self) -> str:
        return f"ARTBP(c={getattr(self.c, '__name__', self.c)}, b={self.b})"

    def due(self, trainer: Shell, T: int) -> list[int]:
        """The cuts among the boundaries after steps t+1..t+T (8.11), drawn before any step."""
        cuts, weights = self.cuts.decide(trainer.t, trainer.t + T)
        self.weights.update(weights)
        return cuts

    def run(self, trainer: Shell, x, y, mask, reset) -> tuple[Trajectory, Array]:
        traj, l = self.hist.run(trainer, x, y, mask, reset, trainer.u_prev + 1)
        L, batch = len(x), len(x[0])
        self.resets.append(np.zeros((L, batch), bool) if reset is None else reset.copy())
        self.counts.append(L * batch if mask is None else float(mask.sum()))
        return traj, l

    def gradient(self, trainer: Shell, final: bool) -> tuple[dict[str, Array], float]:
        """(8.11)-(8.12) over the window u_prev+1..t (the end of the stream is a cut)."""
        model, hist, s, u = trainer.model, self.hist, trainer.u_prev + 1, trainer.t
        a, c = s - hist.first, u - hist.first + 1  # the window's rows
        reset = np.concatenate(self.resets)  # (L, batch)
        h_prev = hist.h[a:c]
        if reset.any():
            assert trainer.h0 is not None  # the first chunk set it
            h_prev = np.where(reset[:, :, None], trainer.h0, h_prev)
        h = hist.h[a + 1 : c + 1]
        f = activation(model.f)
        cut = reset if reset.any() else None
        traj = Trajectory(hist.x[a:c], h_prev, h, f.grad(h), None, cut)  # type: ignore[arg-type]
        weights = {k: w for k, w in self.weights.items() if s <= k < u}
        return window_gradients(model, traj, hist.e[a:c], s - 1, [], weights), sum(self.counts)

    def updated(self, trainer: Shell) -> None:
        self.weights = {k: w for k, w in self.weights.items() if k > trainer.t}
        self.resets, self.counts = [], []

    def final(self, trainer: Shell) -> bool:
        return True  # the end of the stream is a cut

    # -- saving ---------------------------------------------------------------------------------
    def _settings(self, trainer: Shell) -> dict[str, object]:
        return {
            "c": "callable" if callable(self.c) else self.c,
            "b": self.b,
            "biased_max_length": 0 if self.max_length is None else self.max_length,
            "loss": trainer.loss,
            "reduction": trainer.reduction,
        }

    def state_dict(self, trainer: Shell) -> dict[str, Array]:
        """The settings, the random state, the last cut, the weights of the window's uncut
        boundaries and its steps."""
        out: dict[str, Array] = {"rng": rng_state(self.rng)}
        out.update({f"setting.{k}": np.asarray(v) for k, v in self._settings(trainer).items()})
        out["start"], out["last_cut"] = np.asarray(trainer.u_prev + 1), np.asarray(self.cuts.last)
        out["weights.step"] = np.asarray(sorted(self.weights), np.int64)
        out["weights.value"] = np.asarray([self.weights[k] for k in sorted(self.weights)])
        if trainer.h is not None:
            hist = self.hist
            a, c = trainer.u_prev + 1 - hist.first, trainer.t - hist.first + 1
            out["window.x"], out["window.e"] = hist.x[a:c], hist.e[a:c]
            out["window.h"] = hist.h[a : c + 1]  # h_{s-1} .. h_t
            out["window.reset"] = (
                np.concatenate(self.resets) if self.resets else np.zeros((0, len(trainer.h)), bool)
            )
            out["window.count"] = np.asarray(float(sum(self.counts)))
        return out

    def read(self, state: dict[str, Array], trainer: Shell) -> tuple[int, Callable[[], None]]:
        """Check the saved settings, position, window and random state; return u_prev and the
        restore."""
        try:
            for k, v in self._settings(trainer).items():
                check_saved_setting(k, as_saved(v, state[f"setting.{k}"].item()), v)
            t, start, last = (int(state[k]) for k in ("t", "start", "last_cut"))
            weights = dict(
                zip(state["weights.step"].tolist(), state["weights.value"].tolist(), strict=True)
            )
            h = state.get("h")
            window, count = None, 0.0
            if h is not None:
                window = {k: np.array(state[f"window.{k}"]) for k in ("x", "e", "h", "reset")}
                count = float(state["window.count"])
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(exc) from None
        if not (0 <= last <= t and start == last + 1):
            raise InputError(f"the saved position is inconsistent (t={t}, last cut={last})")
        L = t - start + 1
        if window is not None and (
            np.ndim(h) != 2  # type: ignore[arg-type]
            or len(window["x"]) != L
            or window["h"].shape != (L + 1, *np.shape(h))  # type: ignore[arg-type]
        ):
            raise InputError(f"the saved window does not match its position (t={t}, start={start})")
        probe = np.random.Generator(type(self.rng.bit_generator)())
        set_rng_state(probe, state["rng"])

        def restore() -> None:
            self.rng.bit_generator.state = probe.bit_generator.state
            self.cuts.last, self.weights = last, weights
            self.history, self.resets, self.counts = None, [], []
            if window is None:
                return
            m, p = trainer.model.m, trainer.model.p
            hist = self.history = History(window["h"][0], m, p)
            hist.first = start
            hist.reserve(L, start)
            hist.x[:L], hist.e[:L], hist.h[: L + 1] = window["x"], window["e"], window["h"]
            hist.rows = L
            if L:
                self.resets, self.counts = [window["reset"]], [count]

        return start - 1, restore
