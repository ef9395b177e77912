"""The README's example: exact BPTT against TBPTT(k1, k2) on the seed's model."""

import numpy as np

import tbptt

rng = np.random.default_rng(0)
model = tbptt.ElmanRNN.init(n=16, m=3, p=2, f="tanh", g="identity", seed=0)
x, y = rng.normal(size=(200, 3)), rng.normal(size=(200, 2))  # one stream, time-major (T, m)

exact = tbptt.gradients(model, x, y)  # truncation=None: exact BPTT
for k2 in (5, 10, 20, 40):
    trunc = tbptt.Truncation(k1=5, k2=k2, inject="new")
    approx = tbptt.gradients(model, x, y, truncation=trunc)
    err = np.linalg.norm(approx["A"] - exact["A"]) / np.linalg.norm(exact["A"])
    print(f"{trunc.describe():40s} relative error of dL/dA: {err:.2e}")
