"""Where the numpy engine's time goes, and a check that float32 stays float32 (diagnostics).

    python benchmarks/profile_numpy.py                 phases of exact BPTT at the target sizes
    python benchmarks/profile_numpy.py --pyinstrument  the same calls under pyinstrument
    python benchmarks/profile_numpy.py --dtypes        float32 audit of every engine function
    python benchmarks/profile_numpy.py --lean          the engine against a lean rewrite and JAX

The phase table re-runs the steps of tbptt.gradients one by one through the engine's internal
functions (tbptt.elman, tbptt.functions, tbptt.gradients), so it follows their current names;
each phase is timed over interleaved repetitions (median) and shown as a share of the sum. It is
a diagnostic for engine work, not part of `make bench`, and reads internals that may change.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bptt  # noqa: E402
import common  # noqa: E402

import tbptt  # noqa: E402
from tbptt.numpy import batch as checks  # noqa: E402
from tbptt.numpy import elman, functions
from tbptt.numpy import tbptt as gradients


def phases(cfg: bptt.Config, reps: int) -> dict[str, float]:
    """Median seconds of each step of exact tbptt.gradients at one configuration."""
    model, x, y = bptt.data(cfg)
    data = checks.check_batch(
        x, y, m=model.m, p=model.p, dtype=model.dtype, loss="l2", g="identity"
    )
    h_init = checks.check_h0(None, model.n, cfg.batch, model.dtype)
    traj = elman.forward(model, data.x, h_init)
    _, e = functions.loss_and_error("identity", "l2", traj.z, data.y, None)
    dh = elman.project(e, model.C)
    R, _ = elman.backprop(traj.fprime, model.A, dh)
    T, batch, n = traj.h.shape
    hs = np.empty((T + 1, batch, n), model.dtype)
    AT = np.ascontiguousarray(model.A.T)

    def recurrence_only():  # the forward loop's products and activations, nothing else
        for t in range(T):
            np.dot(hs[t], AT, out=hs[t + 1])
            hs[t + 1] += traj.h[t]
            np.tanh(hs[t + 1], out=hs[t + 1])

    cases = {
        "validation (check_batch, check_h0)": lambda: (
            checks.check_batch(
                x, y, m=model.m, p=model.p, dtype=model.dtype, loss="l2", g="identity"
            ),
            checks.check_h0(None, model.n, cfg.batch, model.dtype),
        ),
        "forward (B x, loop, f, C h)": lambda: elman.forward(model, data.x, h_init),
        "  of which the bare loop": recurrence_only,
        "loss and e_t": lambda: functions.loss_and_error("identity", "l2", traj.z, data.y, None),
        "C^T e_t (one product)": lambda: elman.project(e, model.C),
        "backward loop (backprop)": lambda: elman.backprop(traj.fprime, model.A, dh),
        "parameter gradients (3 products)": lambda: elman.parameter_gradients(
            R, traj.h_prev, traj.x, e, traj.h, False, False
        ),
        "whole tbptt.gradients": lambda: tbptt.gradients(model, x, y),
    }
    t = common.interleave(cases, reps=reps)
    return {k: t.median(k) for k in cases}


def print_phases(reps: int) -> None:
    for cfg in bptt.CONFIGS:
        med = phases(cfg, reps)
        parts = sum(
            v for k, v in med.items() if not k.startswith(" ") and k != "whole tbptt.gradients"
        )
        print(f"\n{cfg.label()}  ({common.load()})")
        for k, v in med.items():
            share = "" if k == "whole tbptt.gradients" else f"{100 * v / parts:5.1f}%"
            print(f"  {k:38s} {1e3 * v:9.3f} ms {share}")
        fwd = 1e6 * med["forward (B x, loop, f, C h)"] / cfg.T
        bwd = 1e6 * med["backward loop (backprop)"] / cfg.T
        print(f"  per step: forward {fwd:.2f} us, backward {bwd:.2f} us")


def lean_gradients(A, B, C, x, y):
    """Exact BPTT of the seed's model with every change proposed in the report, for comparison.

    Same validation of x and y (finite), same products; differs only in bookkeeping: B x written
    straight into the state buffer, np.tanh called directly (no wrapper), f' = 1 - h^2 in place,
    e = z - y in place (no copy of yhat, no unused loss), R written over C^T e (no R buffer).
    """
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    T, batch, m = x.shape
    n, p = A.shape[0], C.shape[0]
    hs = np.empty((T + 1, batch, n), A.dtype)  # h_0..h_T
    hs[0] = 0
    H = hs[1:]
    np.matmul(x.reshape(-1, m), B.T, out=H.reshape(-1, n))  # B x_t for every t, into h's buffer
    AT = np.ascontiguousarray(A.T)
    tmp = np.empty((batch, n), A.dtype)
    dot, add, tanh, mul = np.dot, np.add, np.tanh, np.multiply
    rows = list(hs)
    for prev, cur in zip(rows[:-1], rows[1:], strict=True):  # (1.1), (1.2)
        dot(prev, AT, out=tmp)
        add(tmp, cur, out=cur)
        tanh(cur, out=cur)
    z = H.reshape(-1, n) @ C.T  # (T batch, p)
    np.subtract(z, y.reshape(-1, p), out=z)  # e_t, identity g
    R = (z @ C).reshape(T, batch, n)  # C^T e_t; becomes r_t in place
    fp = mul(H, H)
    np.subtract(1, fp, out=fp)  # f'(a_t) = 1 - h_t^2
    back = np.zeros((batch, n), A.dtype)
    for r, f in zip(R[::-1], fp[::-1], strict=True):  # (2.2)
        add(r, back, out=r)
        mul(r, f, out=r)
        dot(r, A, out=back)
    R2 = R.reshape(-1, n)
    return R2.T @ hs[:-1].reshape(-1, n), R2.T @ x.reshape(-1, m), z.T @ H.reshape(-1, n)


def compare_lean(reps: int) -> None:
    """The engine, lean_gradients and JAX side by side (medians of interleaved repetitions)."""
    common.prepare_jax(2)
    for cfg in bptt.CONFIGS:
        model, x, y = bptt.data(cfg)
        A, B, C = (model.params[k] for k in "ABC")
        want = [np.asarray(tbptt.gradients(model, x, y)[k], np.float64) for k in "ABC"]
        err = bptt.relative_error(list(lean_gradients(A, B, C, x, y)), want)
        cases = {
            "engine": bptt.numpy_case(model, x, y),
            "lean": lambda A=A, B=B, C=C, x=x, y=y: lean_gradients(A, B, C, x, y),
            "jax": bptt.jax_case(model, x, y),
        }
        t = common.interleave(cases, reps=reps, inner=cfg.inner)
        print(
            f"{cfg.label()}: engine {1e3 * t.median('engine'):.2f} ms, lean "
            f"{1e3 * t.median('lean'):.2f} ms (engine/lean {t.ratio('engine', 'lean'):.2f}x), "
            f"jax {1e3 * t.median('jax'):.2f} ms (jax/engine {t.ratio('jax', 'engine'):.2f}x, "
            f"jax/lean {t.ratio('jax', 'lean'):.2f}x); lean matches to {err:.1e}; "
            f"{t.contention()}; {common.load()}"
        )


def audit_dtypes() -> list[str]:
    """Run every public path in float32 with each engine function wrapped to check its outputs."""
    bad: list[str] = []

    def check(name, out):
        stack = [out]
        while stack:
            o = stack.pop()
            if isinstance(o, np.ndarray) and o.dtype.kind == "f" and o.dtype != np.float32:
                bad.append(f"{name} returned {o.dtype} {o.shape}")
            elif isinstance(o, dict):
                stack.extend(o.values())
            elif isinstance(o, tuple | list):
                stack.extend(o)
            elif hasattr(o, "__dataclass_fields__"):
                stack.extend(getattr(o, f) for f in o.__dataclass_fields__)

    def wrapped(name, fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            out = fn(*a, **k)
            check(name, out)
            return out

        return inner

    from tbptt import online, optim

    modules = (elman, functions, gradients, checks, online, optim)
    wrappers = {}  # every engine function, wrapped wherever a module refers to it by name
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__:
                wrappers[obj] = wrapped(f"{mod.__name__}.{name}", obj)
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, types.FunctionType) and obj in wrappers:
                setattr(mod, name, wrappers[obj])
    for cls in (optim.SGD, optim.Adam):
        for meth in ("step", "init"):
            setattr(cls, meth, wrapped(f"{cls.__name__}.{meth}", getattr(cls, meth)))
    rng = np.random.default_rng(0)
    T, batch, n, m, p = 40, 3, 8, 5, 4
    f32 = np.float32
    x = rng.standard_normal((T, batch, m), dtype=f32)
    y = rng.standard_normal((T, batch, p), dtype=f32)
    yc = rng.integers(0, p, (T, batch))
    mask = (rng.random((T, batch)) > 0.2).astype(f32)
    reset = rng.random((T, batch)) > 0.9
    for f in ("tanh", "sigmoid", "relu", "identity"):
        model = tbptt.ElmanRNN.init(n=n, m=m, p=p, f=f, dtype=f32)
        softmax = tbptt.ElmanRNN.init(n=n, m=m, p=p, f=f, g="softmax", dtype=f32)
        check("gradients", tbptt.gradients(model, x, y, mask=mask, reset=reset))
        check("gradients", tbptt.gradients(softmax, x, yc, loss="cross_entropy"))
        check("gradients", tbptt.gradients(model, x, y, truncation=tbptt.Truncation(5, 10)))
        for opt in (tbptt.SGD(lr=0.01, momentum=0.9), tbptt.Adam()):
            d = tbptt.TBPTT(model, tbptt.Truncation(5, 15), opt, clip=1.0)
            for i in range(0, T, 7):
                d.feed(x[i : i + 7], y[i : i + 7], mask=mask[i : i + 7], reset=reset[i : i + 7])
            d.finish()
            check("TBPTT.model", d.model.params)
            check("TBPTT.opt_state", {k: v for k, v in d.opt_state.items() if k != "step"})
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyinstrument", action="store_true", help="profile under pyinstrument")
    parser.add_argument("--dtypes", action="store_true", help="audit the float32 path only")
    parser.add_argument(
        "--lean",
        action="store_true",
        help="time the engine against a lean rewrite with the proposed changes, and JAX",
    )
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads (default: 2)")
    parser.add_argument("--reps", type=int, default=9, help="repetitions per phase (default: 9)")
    args = parser.parse_args()
    common.set_blas_threads(args.threads)
    print(f"numpy BLAS: {common.blas_info()}")
    if args.dtypes:
        bad = audit_dtypes()
        print("float32 audit:", "no float64 anywhere" if not bad else "\n  " + "\n  ".join(bad))
        return 1 if bad else 0
    if args.lean:
        compare_lean(args.reps)
        return 0
    if args.pyinstrument:
        from pyinstrument import Profiler

        for cfg in bptt.CONFIGS:
            model, x, y = bptt.data(cfg)
            calls = max(3, int(2.0 / (cfg.forward_flops() * 3 / 5e10 + 2e-6 * cfg.T)))
            prof = Profiler(interval=0.0002)
            prof.start()
            for _ in range(calls):
                tbptt.gradients(model, x, y)
            prof.stop()
            print(f"\n{cfg.label()}: {calls} calls")
            print(prof.output_text(unicode=False, color=False))
        return 0
    print_phases(args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
