"""foldship.files: a write lands whole or not at all; digests match hashlib's known answer."""
import hashlib

import pytest

from foldship.files import atomic_path, atomic_write, sha256_of


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic_write(target, "new text é")
    assert target.read_bytes() == "new text é".encode()
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_previous_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "latency.png"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"half a pic")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["latency.png"]


def test_sha256_of_a_file_larger_than_one_read_chunk(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: more than the 1 MiB chunk
    (tmp_path / "blob").write_bytes(data)
    assert sha256_of(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_of(tmp_path / "empty") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # FIPS 180-4
