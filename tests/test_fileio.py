"""Tests for compress.fileio.load_npz: safe against header bombs, zip bombs and pickles."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from compress.fileio import load_npz
from tests.test_npy import header_blob


class LoadError(Exception):
    """The caller's own error class."""


WHAT = "weights file"


def load(path: Path, max_bytes: int = 1 << 20) -> dict[str, npt.NDArray[Any]]:
    return load_npz(path, max_bytes=max_bytes, error=LoadError, what=WHAT)


def npy_bytes(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def refused(path: Path, match: str, max_bytes: int = 1 << 20) -> LoadError:
    with pytest.raises(LoadError, match=match) as info:
        load(path, max_bytes)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return info.value


def test_round_trip_several_arrays(tmp_path: Path) -> None:
    arrays: dict[str, npt.NDArray[Any]] = {
        "W0": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b0": np.array([-1, 2**40], dtype=np.int64),
        "mask": np.array([[True, False], [False, True]]),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "big_endian": np.arange(3, dtype=">i4"),
        "scalar": np.array(7, dtype=np.uint8),
        "empty": np.zeros((0, 5), dtype=np.float16),
    }
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, **arrays)  # type: ignore[operator]
        loaded = load(path)
        assert list(loaded) == list(arrays)
        for name, array in arrays.items():
            assert loaded[name].shape == array.shape, name
            assert loaded[name].dtype.newbyteorder("=") == array.dtype.newbyteorder("="), name
            assert np.array_equal(loaded[name], array), name
            assert loaded[name].flags.writeable, name
        assert loaded["fortran"].flags.f_contiguous
        loaded["W0"][0, 0] = 99.0  # callers may modify what they get


def test_header_bomb_is_refused_without_allocating(tmp_path: Path) -> None:
    # numpy.load would try to allocate 8 TB for this file of a few hundred bytes.
    path = write_zip(tmp_path / "bomb.npz", {"x.npy": header_blob("(1000000000000,)")})
    assert path.stat().st_size < 600
    refused(path, rf"cannot read {WHAT}: member 'x.npy': array dimension 1000000000000 exceeds")


def test_deflate_zip_bomb_is_refused(tmp_path: Path) -> None:
    zeros = np.zeros(4 * 1024 * 1024, dtype=np.uint8)
    path = write_zip(tmp_path / "zip.npz", {"x.npy": npy_bytes(zeros)}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 64 * 1024
    refused(path, "unpacks to 4194432 bytes", max_bytes=256 * 1024)


def test_zip_bomb_with_a_lying_size_field_is_refused(tmp_path: Path) -> None:
    zeros = np.zeros(4 * 1024 * 1024, dtype=np.uint8)
    path = write_zip(tmp_path / "liar.npz", {"x.npy": npy_bytes(zeros)}, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + 22 : local + 26] = struct.pack("<I", 1000)  # uncompressed size
    data[central + 24 : central + 28] = struct.pack("<I", 1000)
    path.write_bytes(bytes(data))
    refused(path, "not a readable .npz file", max_bytes=256 * 1024)


def test_running_total_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "two.npz"
    np.savez_compressed(path, a=np.zeros(1000, np.uint8), b=np.zeros(1000, np.uint8))
    assert set(load(path, max_bytes=2500)) == {"a", "b"}
    refused(path, r"member 'b.npy' unpacks to 1128 bytes, more than the 372 left", 1500)


def test_member_that_is_not_npy_is_refused(tmp_path: Path) -> None:
    members = {"x.npy": npy_bytes(np.ones(3)), "README.txt": b"hello"}
    refused(write_zip(tmp_path / "extra.npz", members), "member 'README.txt' is not an .npy")
    refused(write_zip(tmp_path / "dir.npz", {"sub/": b""}), "member 'sub/' is not an .npy")


def test_duplicate_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", npy_bytes(np.ones(2)))
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("x.npy", npy_bytes(np.zeros(2)))
    refused(path, "appears twice")


def test_object_dtype_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickle.npz"
    np.savez(path, x=np.array([1.0, None], dtype=object))  # savez pickles object arrays
    refused(path, r"member 'x.npy': .npy dtype '\|O' is not allowed: only real numbers")


@pytest.mark.parametrize(
    "array",
    [np.array(["a", "b"]), np.array([1 + 2j]), np.zeros(2, dtype=[("a", "<f4")])],
)
def test_other_non_numeric_dtypes_are_refused(tmp_path: Path, array: npt.NDArray[Any]) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, x=array)
    refused(path, "member 'x.npy'")


def test_truncated_npy_member_is_refused(tmp_path: Path) -> None:
    blob = npy_bytes(np.ones(4))[:-1]
    refused(write_zip(tmp_path / "short.npz", {"x.npy": blob}), "shape and dtype say 32")


def test_not_an_npz(tmp_path: Path) -> None:
    npy_file = tmp_path / "x.npy"
    np.save(npy_file, np.ones(3))
    refused(npy_file, r"not an \.npz archive")
    text = tmp_path / "x.txt"
    text.write_text("1 2 3\n")
    refused(text, rf"cannot read {WHAT}: not a readable \.npz file \(BadZipFile")
    refused(tmp_path / "missing.npz", f"no such {WHAT}")
    big = tmp_path / "big.npz"
    np.savez(big, x=np.zeros(1000))
    refused(big, "too large", max_bytes=1000)


def test_corrupted_deflate_stream_is_refused(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "bad.npz", {"x.npy": npy_bytes(np.arange(1000.0))}, zipfile.ZIP_DEFLATED
    )
    data = bytearray(path.read_bytes())
    start = data.index(b"x.npy") + len("x.npy")
    for offset in range(start + 10, start + 40):
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    refused(path, "not a readable .npz file")
