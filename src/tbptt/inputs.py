"""Integer inputs: x_t as a one-hot vector, B x_t as a lookup and dL/dB as a scatter-add.

A character or word model reads x_t = onehot(ids_t) in R^m. The model is the same (SEMANTICS.md 1);
only the two products with x change form:

    (1.1)  B x_t = column ids_t of B                        (a row of B^T, looked up)
    (2.3)  dL/dB = sum_t r_t x_t^T:  column ids_t of dL/dB gets r_t added, every t (a scatter-add)

which replaces two products of m-wide rows by n-wide copies and additions. The results equal the
one-hot products: the lookup exactly, the scatter-add to rounding (the same terms summed in
another order). The scatter-add is a compiled loop when numba is installed (tbptt[fast]); numpy's
own scatter-adds are slower than BLAS, so without numba dL/dB stays one product, with the one-hot
rows built from the ids.

Integer arrays are accepted as real-valued inputs elsewhere, so ids are told apart by type, not
dtype: `tbptt.OneHot(ids, m)` is x, for every function that takes x.
"""

from __future__ import annotations

import numpy as np

from .checks import check_int
from .errors import InputError
from .numpy import fast

Array = np.ndarray


class OneHot:
    """Inputs x_t = onehot(ids_t) in R^m, given by their indices (the columns of B they select).

    Args:
        ids: integers in [0, m), shape (T,) for one stream or (T, batch), time-major like x.
        m: the input size (the model's m): x has shape (T, [batch,] m).

    Pass it wherever x goes (tbptt.gradients, total_loss, TBPTT.feed; the torch engine takes the
    ids as an integer tensor, see tbptt.torch.ElmanRNN). Slicing slices the ids: x[a:b] is the
    chunk of steps a..b-1. `dense()` gives the one-hot array.
    """

    __slots__ = ("ids", "m")

    def __init__(self, ids: object, m: int) -> None:
        check_int("m", m, what=" (the input size)")
        arr = np.asarray(ids)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"ids must hold integers (indices in [0, m)), got dtype {arr.dtype}")
        if arr.ndim not in (1, 2):
            raise InputError(f"ids must have shape (T,) or (T, batch), got {arr.shape}")
        if arr.size and (arr.min() < 0 or arr.max() >= m):
            bad = arr.min() if arr.min() < 0 else arr.max()
            raise InputError(f"ids holds {int(bad)}, expected 0 <= ids < m = {m}")
        self.ids = np.array(arr, dtype=np.intp)  # our own copy: a caller may refill its buffer
        self.m = int(m)

    @classmethod
    def checked(cls, ids: Array, m: int) -> OneHot:
        """Wrap ids already known to be integers in [0, m), without checking or copying them
        (the engines' and the data readers' own arrays)."""
        out = object.__new__(cls)
        out.ids, out.m = ids, m
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of x: (T, [batch,] m)."""
        return (*self.ids.shape, self.m)

    @property
    def ndim(self) -> int:
        return self.ids.ndim + 1

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> OneHot:
        """Steps (and streams) of x: indexes the ids, never the m axis."""
        ids = self.ids[key]
        if np.ndim(ids) not in (1, 2):
            raise InputError(f"OneHot[{key!r}] must keep the time axis, got shape {np.shape(ids)}")
        return OneHot.checked(ids, self.m)

    def dense(self, dtype: type = np.float64) -> Array:
        """The one-hot array x, shape (T, [batch,] m)."""
        out = np.zeros(self.shape, dtype)
        np.put_along_axis(out, self.ids[..., None], 1, axis=-1)
        return out

    def __repr__(self) -> str:
        return f"OneHot(ids of shape {self.ids.shape}, m={self.m})"


def input_product(x: Array | OneHot, B: Array, b: Array | None, out: Array) -> Array:
    """B x_t + b for every step, into out (N, n): x is (N, m) stacked rows, or a OneHot of N ids."""
    if isinstance(x, OneHot):
        table = B.T if b is None else B.T + b  # (m, n): row i is B e_i + b
        table = np.ascontiguousarray(table)  # the looked-up columns as contiguous rows
        return np.take(table, x.ids.reshape(-1), axis=0, out=out)  # (1.1): column ids_t of B
    np.matmul(x.reshape(-1, x.shape[-1]), B.T, out=out)
    if b is not None:
        out += b
    return out


def input_gradient(R: Array, x: Array | OneHot) -> Array:
    """dL/dB = sum_t r_t x_t^T (n, m) from R (N, n) stacked r_t and x (N, m) or N ids (2.3)."""
    if not isinstance(x, OneHot):
        return R.T @ x.reshape(-1, x.shape[-1])
    ids = x.ids.reshape(-1)
    kernels = fast.compiled()
    if kernels is None:  # numpy: the one-hot rows, built for one BLAS product. Measured at the
        # demo's sizes (1024 rows, n = 256, m = 81) it beats np.add.at (about 6x slower) and a
        # sort with np.add.reduceat (about 1.3x slower)
        X = np.zeros((len(ids), x.m), R.dtype)  # (N, m)
        X[np.arange(len(ids)), ids] = 1
        return R.T @ X
    G = np.zeros((x.m, R.shape[1]), R.dtype)  # (m, n): (dL/dB)^T
    kernels.scatter_rows(G, ids, np.ascontiguousarray(R))  # row ids_t gets r_t, a compiled loop
    return np.ascontiguousarray(G.T)  # (n, m)
