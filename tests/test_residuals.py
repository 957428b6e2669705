"""edge_agent.training.residuals: top-k error-feedback residuals kept across restarts."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from compress.codecs import encode_update, layout_of, parse_codec
from edge_agent.errors import StateError
from edge_agent.training.residuals import ResidualStore

LOGGER = "edge_agent.training.residuals"

Residual = dict[str, npt.NDArray[np.float32]]


def residual(seed: int = 0) -> Residual:
    """Names deliberately out of sorted order: the layout's order must survive."""
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((4, 3)).astype(np.float32),
        "b1": rng.standard_normal(3).astype(np.float32),
        "W0": rng.standard_normal((5, 4)).astype(np.float32),
        "b0": rng.standard_normal(4).astype(np.float32),
    }


def assert_same(loaded: Residual | None, expected: Residual) -> None:
    assert loaded is not None
    assert list(loaded) == list(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], value)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "state" / "residuals"


def test_round_trip_across_a_restart(directory: Path) -> None:
    saved = residual()
    ResidualStore(directory).save("digits", saved)
    restarted = ResidualStore(directory)
    assert_same(restarted.load("digits", layout_of(saved)), saved)


def test_save_replaces_the_previous_residual(directory: Path) -> None:
    store = ResidualStore(directory)
    store.save("digits", residual(1))
    store.save("digits", residual(2))
    assert_same(ResidualStore(directory).load("digits", layout_of(residual())), residual(2))


def test_a_real_codec_residual_round_trips(directory: Path) -> None:
    delta = residual(7)
    encoded = encode_update(delta, parse_codec("topk:0.1+int8"), rng=np.random.default_rng(0))
    assert encoded.residual is not None
    ResidualStore(directory).save("digits", encoded.residual)
    loaded = ResidualStore(directory).load("digits", layout_of(delta))
    assert_same(loaded, encoded.residual)
    # and it is usable as the next round's error feedback
    assert loaded is not None
    again = encode_update(
        delta, parse_codec("topk:0.1+int8"), rng=np.random.default_rng(1), residual=loaded
    )
    assert again.residual is not None


def test_models_are_kept_apart(directory: Path) -> None:
    store = ResidualStore(directory)
    store.save("digits", residual(1))
    store.save("digits.v2", residual(2))
    layout = layout_of(residual())
    assert_same(store.load("digits", layout), residual(1))
    assert_same(store.load("digits.v2", layout), residual(2))
    store.clear("digits")
    assert store.load("digits", layout) is None
    assert_same(store.load("digits.v2", layout), residual(2))


def test_none_when_nothing_was_saved(directory: Path) -> None:
    store = ResidualStore(directory)
    assert store.load("digits", layout_of(residual())) is None
    assert not directory.exists()  # loading creates nothing


def test_save_creates_a_private_directory_and_file(directory: Path) -> None:
    ResidualStore(directory).save("digits", residual())
    files = list(directory.iterdir())
    assert [f.name for f in files] == ["residual-digits.npz"]  # no temp files left
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"W0": np.zeros((6, 4), np.float32)}, id="shape"),
        pytest.param({"W2": np.zeros((3, 2), np.float32)}, id="extra-tensor"),
    ],
)
def test_discarded_when_the_layout_differs(
    directory: Path, changed: Residual, caplog: pytest.LogCaptureFixture
) -> None:
    store = ResidualStore(directory)
    store.save("digits", residual())
    model = {**residual(), **changed}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert store.load("digits", layout_of(model)) is None
    assert "does not fit" in caplog.text


def test_discarded_when_a_tensor_is_missing_or_renamed(directory: Path) -> None:
    store = ResidualStore(directory)
    store.save("digits", residual())
    fewer = {k: v for k, v in residual().items() if k != "b0"}
    assert store.load("digits", layout_of(fewer)) is None
    renamed = {("bias0" if k == "b0" else k): v for k, v in residual().items()}
    assert store.load("digits", layout_of(renamed)) is None


def test_discarded_when_the_order_differs(directory: Path) -> None:
    """Codecs encode in layout order, so the same tensors in another order do not fit."""
    store = ResidualStore(directory)
    store.save("digits", residual())
    reordered = dict(sorted(residual().items()))
    assert list(reordered) != list(residual())
    assert store.load("digits", layout_of(reordered)) is None


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a zip archive at all", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x93NUMPY\x01\x00", id="npy-not-npz"),
    ],
)
def test_corrupt_file_is_none_and_logged(
    directory: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    directory.mkdir(parents=True)
    (directory / "residual-digits.npz").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ResidualStore(directory).load("digits", layout_of(residual())) is None
    records = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "digits" in records[0].getMessage()
    assert "unreadable" in records[0].getMessage()


def test_truncated_file_is_none_and_logged(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ResidualStore(directory)
    store.save("digits", residual())
    path = directory / "residual-digits.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.load("digits", layout_of(residual())) is None
    assert "unreadable" in caplog.text
    # a later save starts afresh and works
    store.save("digits", residual(3))
    assert_same(store.load("digits", layout_of(residual())), residual(3))


@pytest.mark.parametrize(
    "name", ["", "../escape", "a/b", ".hidden", "-dash", "x" * 65, "sp ace", "naïve"]
)
def test_invalid_model_names_are_state_errors(directory: Path, name: str) -> None:
    store = ResidualStore(directory)
    with pytest.raises(StateError, match="invalid model name"):
        store.load(name, layout_of(residual()))
    with pytest.raises(StateError, match="invalid model name"):
        store.save(name, residual())
    with pytest.raises(StateError, match="invalid model name"):
        store.clear(name)
    assert not any(directory.parent.rglob("residual-*"))


def test_longest_valid_name(directory: Path) -> None:
    name = "m" + "x" * 63
    store = ResidualStore(directory)
    store.save(name, residual())
    assert_same(store.load(name, layout_of(residual())), residual())


def test_clear_forgets_and_tolerates_absence(directory: Path) -> None:
    store = ResidualStore(directory)
    store.clear("digits")  # nothing saved yet: fine
    store.save("digits", residual())
    store.clear("digits")
    assert store.load("digits", layout_of(residual())) is None
    assert ResidualStore(directory).load("digits", layout_of(residual())) is None
    store.clear("digits")


def test_unwritable_directory_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateError, match="cannot save the residual of digits"):
        ResidualStore(blocker / "residuals").save("digits", residual())
