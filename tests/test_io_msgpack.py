import flax.serialization
import numpy as np
import pytest

from breadcrumbs_jax import MergeError, io
from breadcrumbs_jax.io import msgpack as bc_msgpack

from tests.ckpt_factory import pretrained, same_bits


def test_reads_flax_to_bytes_lazily(tmp_path):
    tree = pretrained()
    tree["scalar"] = np.float32(2.5)  # flax stores numpy scalars as their own extension type
    (tmp_path / "m.msgpack").write_bytes(flax.serialization.to_bytes(tree))
    src = io.open_source(tmp_path / "m.msgpack")
    assert src.format == "msgpack" and src.layout == "flax"
    assert src.leaves()["params/Dense_0/bias"].dtype == "bfloat16"
    assert src.leaves()["scalar"].shape == ()
    np.testing.assert_array_equal(src.read("params/embed/embedding", (slice(5, 9),)), tree["params"]["embed"]["embedding"][5:9])
    assert same_bits(io.load(tmp_path / "m.msgpack"), tree)


def test_written_file_restores_with_flax(tmp_path):
    tree = pretrained()
    io.save(tree, tmp_path / "m.msgpack")
    restored = flax.serialization.msgpack_restore((tmp_path / "m.msgpack").read_bytes())
    assert same_bits(restored, tree)


def test_chunked_arrays_both_ways(tmp_path, monkeypatch):
    """Arrays above flax's chunk limit (2**30 bytes; lowered here) are split into chunks."""
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 100)
    monkeypatch.setattr(bc_msgpack, "MAX_CHUNK_SIZE", 100)
    tree = pretrained()
    (tmp_path / "flax.msgpack").write_bytes(flax.serialization.to_bytes(tree))
    assert same_bits(io.load(tmp_path / "flax.msgpack"), tree)
    io.save(tree, tmp_path / "ours.msgpack")
    raw = (tmp_path / "ours.msgpack").read_bytes()
    assert b"__msgpack_chunked_array__" in raw
    assert same_bits(flax.serialization.msgpack_restore(raw), tree)


def test_truncated_and_corrupt_files(tmp_path):
    io.save(pretrained(), tmp_path / "m.msgpack")
    raw = (tmp_path / "m.msgpack").read_bytes()
    (tmp_path / "cut.msgpack").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MergeError, match="truncated msgpack") as e:
        io.open_source(tmp_path / "cut.msgpack")
    assert "cut.msgpack" in str(e.value)
    (tmp_path / "bad.msgpack").write_bytes(b"\x81\xa1a\xc1")  # {'a': <never-used byte 0xc1>}
    with pytest.raises(MergeError, match="corrupt msgpack"):
        io.open_source(tmp_path / "bad.msgpack")
    (tmp_path / "str.msgpack").write_bytes(flax.serialization.msgpack_serialize({"a": "text"}))
    with pytest.raises(MergeError, match="not an array"):
        io.open_source(tmp_path / "str.msgpack")
