"""ARTBP, UORO and RTRL in the torch engine: resume exactly, by name, and bad input in one line.

The resume reference is the same run never interrupted (float64, CPU): after save, a fresh model
(other initial values), optimizer, scheduler and trainer load the file, after torch's and numpy's
generators were disturbed, and continue; parameters, carried state and counters must be equal,
compared exactly. The cuts' and signs' generator is in the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tbptt
from tbptt import InputError
from tbptt.torch import ARTBP, RTRL, TBPTT, UORO, Recurrent
from tbptt.torch.artbp import ARTBPRule
from tbptt.torch.methods import OPTIONS, frozen_gradients, make_trainer
from tbptt.torch.rtrl import RTRLRule
from tbptt.torch.tbptt import TruncationRule
from tbptt.torch.uoro import UORORule

DT = torch.float64
M, H, P, BATCH, T = 3, 4, 2, 2, 30
CHUNKS = [(0, 4), (4, 11), (11, 12), (12, 19), (19, 26), (26, 30)]

METHODS = {  # name: (method, options, dropout: whether the module draws random numbers)
    "artbp": ("artbp", {"c": 0.3, "b": 2, "rng": 4}, True),
    "artbp-checkpoint": ("artbp", {"c": 0.2, "rng": 5, "checkpoint": True}, True),
    "artbp-callable": ("artbp", {"c": lambda L: min(1.0, 0.1 * L), "rng": 6}, False),
    "uoro": ("uoro", {"k1": 3, "rng": 7}, False),
    "rtrl": ("rtrl", {"k1": 2}, False),
}


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, BATCH, M, generator=g, dtype=DT)
    y = torch.randn(T, BATCH, P, generator=g, dtype=DT)
    mask = torch.rand(T, BATCH, generator=g, dtype=DT)
    return x, y, mask, torch.rand(T, BATCH, generator=g) < 0.1


def make(name: str, seed: int = 1, rng: int | None = None):
    """A 2-layer LSTM (dropout where the method allows it), Adam, StepLR, clipping, the mean."""
    method, options, dropout = METHODS[name]
    torch.manual_seed(seed)
    rnn = nn.LSTM(M, H, num_layers=2, dropout=0.3 if dropout else 0.0)
    model = Recurrent(rnn, nn.Linear(H, P)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    if rng is not None and "rng" in options:
        options = {**options, "rng": rng}
    return make_trainer(method, model, opt, clip=1.0, scheduler=sched, reduction="mean", **options)


def run(trainer, chunks) -> None:
    x, y, mask, reset = data()
    for a, b in chunks:
        trainer.feed(x[a:b], y[a:b], mask[a:b], reset[a:b])


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("cut", [2, 3])
def test_resume_equals_uninterrupted_run(name: str, cut: int, tmp_path) -> None:
    """Save after `cut` chunks, load into a fresh trainer, continue: the uninterrupted run's
    parameters, state and counters, exactly."""
    whole = make(name)
    run(whole, CHUNKS)
    whole.finish()
    first = make(name)
    run(first, CHUNKS[:cut])
    first.save(tmp_path / "run.pt")
    torch.manual_seed(123)  # disturb the generators the dropout draws from
    second = make(name, seed=2, rng=99)
    second.load(tmp_path / "run.pt")
    assert (second.t, second.updates) == (first.t, first.updates)
    run(second, CHUNKS[cut:])
    second.finish()
    assert (second.t, second.updates) == (whole.t, whole.updates) and whole.updates > 2
    mine = second.model.state_dict()
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, mine[k]), k
    for a, b in zip(whole.state, second.state, strict=True):
        assert torch.equal(a, b)


def test_make_trainer_and_frozen_gradients_by_name() -> None:
    """One call builds each method's trainer with its options; frozen tbptt over the whole
    stream, rtrl, and artbp with c = 0 give the same (exact) gradient."""
    x, y, mask, reset = data()
    torch.manual_seed(0)
    model = Recurrent(nn.GRU(M, H), nn.Linear(H, P)).to(DT)
    kinds = {"tbptt": TruncationRule, "rtrl": RTRLRule, "uoro": UORORule, "artbp": ARTBPRule}
    needed = {"tbptt": {"k1": 5}, "artbp": {"c": 0.5}, "uoro": {"rng": 1}, "rtrl": {}}
    for method, kind in kinds.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        trainer = make_trainer(method, model, opt, **needed[method])
        assert type(trainer) is TBPTT and type(trainer.rule) is kind  # one shell, the method's rule
        trainer.feed(x[:7], y[:7])
        trainer.finish()
        assert trainer.updates >= 1
    kw = {"mask": mask, "reset": reset}
    want = frozen_gradients("tbptt", model, x, y, k1=T, **kw)
    for method, options in (("rtrl", {}), ("artbp", {"c": 0.0, "b": 4})):
        got = frozen_gradients(method, model, x, y, **kw, **options)
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12)
    assert set(OPTIONS) == set(tbptt.methods.OPTIONS)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, InputError)
    return msg


def test_bad_settings_are_one_line_errors() -> None:
    """Each bad setting: an InputError of one line naming it, before anything is trained."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM(M, H), nn.Linear(H, P)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (lambda: ARTBP(model, opt, c=1.5), r"c must be a probability in \[0, 1\], got 1.5"),
        (lambda: ARTBP(model, opt, c="x"), "c must be a probability"),
        (lambda: ARTBP(model, opt, c=0.1, b=0), "b must be an integer >= 1, got 0"),
        (lambda: ARTBP(model, opt, c=lambda L: 2.0), r"c\(1\) returned 2.0"),
        (lambda: ARTBP(model, opt, c=0.1, b=3, biased_max_length=2), "at least b = 3"),
        (lambda: ARTBP(model, opt, c=0.1, rng="x"), "rng must be a seed"),
        (lambda: UORO(model, opt, eps=0), "eps must be a positive number, got 0"),
        (lambda: UORO(model, opt, k1=0), "k1 must be an integer >= 1"),
        (lambda: RTRL(model, opt, max_bytes=-1), "max_bytes must be a positive number"),
        (lambda: make_trainer("uoro", model, opt, c=0.1), "method uoro does not take c"),
        (lambda: make_trainer("artbp", model, opt), "method artbp needs c"),
        (lambda: make_trainer("bptt", model, opt), "method must be one of"),
        (lambda: UORO(model, "sgd"), "optimizer must be a torch.optim.Optimizer"),
    ]
    for build, match in cases:
        with pytest.raises(InputError, match=match) as err:
            build()
        one_line(err)


def test_rtrl_too_large_is_refused_with_its_size() -> None:
    """RTRL's influence of 2 streams x 8 state entries (h, c) x 144 parameters (the LSTM's, not
    its head's) in float64, three copies: 55,296 bytes, refused under max_bytes = 50,000 at the
    first step, nothing trained; 20,000 bytes are too few for one stream, refused when the trainer
    is made (the LSTM's sizes are known then)."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM(M, H), nn.Linear(H, P)).to(DT)
    before = [p.detach().clone() for p in model.parameters()]
    driver = RTRL(model, torch.optim.SGD(model.parameters(), lr=0.1), max_bytes=50_000)
    x, y, _, _ = data()
    with pytest.raises(InputError) as err:
        driver.feed(x[:3], y[:3])
    msg = one_line(err)
    assert "needs batch x state x |theta| = 2 x 8 x 144 = 2,304 entries, 54 KiB" in msg
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert driver.updates == 0
    with pytest.raises(InputError) as err:  # too large for one stream: told when it is made
        RTRL(model, torch.optim.SGD(model.parameters(), lr=0.1), max_bytes=20_000)
    assert "= 1 x 8 x 144 = 1,152 entries, 27 KiB" in one_line(err)


@pytest.mark.parametrize("kind", [UORO, RTRL])
def test_a_module_drawing_random_numbers_is_refused(kind) -> None:
    """UORO and RTRL run the module several times per step: dropout is refused in one line."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM(M, H, num_layers=2, dropout=0.5), nn.Linear(H, P)).to(DT)
    driver = kind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y, _, _ = data()
    with pytest.raises(InputError, match="must be deterministic") as err:
        driver.feed(x[:3], y[:3])
    one_line(err)


def test_load_refuses_another_method_other_settings_and_damage(tmp_path) -> None:
    """A checkpoint of another method, of other settings, or a damaged file (then named): one
    line, and the trainer unchanged."""
    a = make("artbp")
    run(a, CHUNKS[:2])
    a.save(tmp_path / "artbp.pt")
    u = make("uoro")
    run(u, CHUNKS[:2])
    u.save(tmp_path / "uoro.pt")
    cases = [
        (make("uoro"), "artbp.pt", "state must be a 'tbptt.torch.UORO/1' dict"),
        (make("artbp"), "uoro.pt", "state must be a 'tbptt.torch.ARTBP/1' dict"),
        (make("artbp-callable"), "artbp.pt", "the saved run had c=0.3, this driver 'callable'"),
        (make("rtrl"), "uoro.pt", "state must be a 'tbptt.torch.RTRL/1' dict"),
    ]
    model = make("uoro").model
    other = make_trainer("uoro", model, torch.optim.SGD(model.parameters()), k1=3, eps=1e-3)
    cases.append((other, "uoro.pt", "the saved run had eps=1e-07, this driver 0.001"))
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not a zip")
    cases.append((make("uoro"), "bad.pt", "damaged"))
    for trainer, name, match in cases:
        with pytest.raises(InputError, match=match) as err:
            trainer.load(tmp_path / name)
        assert (str(tmp_path) in one_line(err)) == (name == "bad.pt") and trainer.t == 0


def test_uoro_draws_do_not_depend_on_the_chunks() -> None:
    """The signs are drawn step by step: chunks of 1, 7 or all steps train to the same values."""
    results = []
    for size in (1, 7, T):
        trainer = make("uoro")
        run(trainer, [(a, min(a + size, T)) for a in range(0, T, size)])
        trainer.finish()
        results.append([p.detach() for p in trainer.model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert np.isfinite(results[0][0].numpy()).all()


@pytest.mark.parametrize("factory", [RTRL, UORO, ARTBP])
def test_the_factories_pass_the_shells_options_on(factory) -> None:
    """Each factory hands the shell's options it takes (one documented list, driver.py's
    ForwardOptions or SegmentOptions) to the shell as TBPTT would hold them, and refuses any other
    keyword as Python refuses an unknown one."""
    model = Recurrent(nn.GRU(2, 3, batch_first=True), nn.Linear(3, 1))
    extra = {"c": 0.5, "rng": 0} if factory is ARTBP else {"rng": 0} if factory is UORO else {}
    sched_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(sched_opt, 1)
    given = {"clip": 2.5, "reduction": "mean", "batch_first": True, "scheduler": sched}
    d = factory(model, sched_opt, **extra, **given)
    held = (d.clip, d.reduction, d.batch_first, d.scheduler)
    assert held == (2.5, "mean", True, sched)
    if factory is ARTBP:
        assert factory(model, sched_opt, c=0.5, checkpoint=True, batch_first=True).checkpoint
    else:  # amp and checkpoint apply to kept segments only
        with pytest.raises(TypeError, match=rf"^{factory.__name__}\(\) got an unexpected keyword "):
            factory(model, sched_opt, checkpoint=True, batch_first=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'clipp'"):
        factory(model, sched_opt, **extra, clipp=1.0)
