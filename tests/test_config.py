"""The real configs compose, and bad values are rejected with a message that names the key."""

from __future__ import annotations

import pytest

from src.config import ConfigError, validate
from tests.conftest import compose


@pytest.mark.parametrize("data", ["average", "echo", "adding"])
@pytest.mark.parametrize("tbptt", ["fixed", "k1k2", "random"])
def test_every_group_option_composes_and_validates(data: str, tbptt: str) -> None:
    validate(compose([f"data={data}", f"tbptt={tbptt}"]))


def test_text_composes_with_a_real_file(tmp_path) -> None:
    text = tmp_path / "words.txt"
    text.write_text("to be or not to be " * 50)
    validate(compose(["data=text", f"data.path={text}"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tbptt.k=0", "tbptt.k must be a positive integer, but got 0"),
        ("tbptt.k=-3", "tbptt.k must be a positive integer, but got -3"),
        ("tbptt.k=2.5", "tbptt.k must be a positive integer, but got 2.5"),
        ("tbptt.k=abc", "tbptt.k must be a positive integer, but got 'abc'"),
        ("tbptt.k=true", "tbptt.k must be a positive integer, but got True"),
        ("optimizer.lr=0", "optimizer.lr must be a positive finite number, but got 0"),
        ("optimizer.lr=-1e-3", "optimizer.lr must be a positive finite number, but got -0.001"),
        ("optimizer.lr=fast", "optimizer.lr must be a positive finite number, but got 'fast'"),
        ("model.hidden_size=0", "model.hidden_size must be a positive integer, but got 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be a positive integer, but got 0"),
        ("tbptt.mode=sideways", "tbptt.mode must be one of fixed, k1k2, random; got 'sideways'"),
        ("data.lag=64", "data.lag must be less than data.seq_len (64)"),
        ("tbptt.stream=true", "tbptt.stream=true needs a dataset of long streams"),
        ("model.dropout=1.0", "model.dropout must be a number with 0.0 <= model.dropout < 1.0"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose([override]))
    assert message in str(error.value)


def test_k2_below_k1_is_rejected() -> None:
    with pytest.raises(ConfigError, match="tbptt.k2 must be at least tbptt.k1"):
        validate(compose(["tbptt=k1k2", "tbptt.k=8", "tbptt.k2=4"]))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda folder: None, "data.path must name a text file"),
        (lambda folder: folder / "missing.txt", "does not exist"),
        (lambda folder: folder, "is a folder"),
        (lambda folder: _write(folder / "empty.txt", b""), "is empty"),
        (lambda folder: _write(folder / "blob.bin", b"\x00\x01\xff" * 100), "looks binary"),
        (lambda folder: _write(folder / "latin.txt", b"caf\xe9 " * 100), "looks binary"),
    ],
)
def test_bad_text_paths(tmp_path, make, message: str) -> None:
    path = make(tmp_path)
    overrides = ["data=text"] + ([f"data.path={path}"] if path is not None else [])
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def _write(path, content: bytes):
    path.write_bytes(content)
    return path
