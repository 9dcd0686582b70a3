import errno
import json
import struct
import threading

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from breadcrumbs_jax import MergeError, io
from breadcrumbs_jax.io import write_behind
from breadcrumbs_jax.io.safetensors import INDEX_NAME, SafetensorsSource

from tests.ckpt_factory import HF_SHAPES, pretrained, same_bits


@pytest.fixture
def tree():
    return pretrained(HF_SHAPES)


def test_single_file_round_trip_keeps_names_values_and_bf16(tmp_path, tree):
    io.save(tree, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:  # the usual reader
        assert set(f.keys()) == set(tree)
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == ml_dtypes.bfloat16
        assert f.metadata() == {"format": "pt"}
    assert same_bits(io.load(tmp_path / "m.safetensors"), tree)


def test_reads_files_written_by_safetensors_itself(tmp_path, tree):
    save_file(tree, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    src = io.open_source(tmp_path / "ref.safetensors")
    assert src.format == "safetensors" and src.layout == "torch"
    assert {p: (i.shape, i.dtype) for p, i in src.leaves().items()} == {
        k: (v.shape, str(v.dtype)) for k, v in tree.items()
    }
    assert same_bits(io.load(tmp_path / "ref.safetensors"), tree)


def test_read_leaves_reach_the_device_without_a_copy(tmp_path, tree):
    """Leaves are read into 64-byte-aligned memory, which jax.device_put on CPU takes as it is."""
    save_file(tree, str(tmp_path / "ref.safetensors"))
    src = io.open_source(tmp_path / "ref.safetensors")
    for path, info in src.leaves().items():
        array = src.read(path)
        assert array.ctypes.data % 64 == 0, path
        if array.size and jax.default_backend() == "cpu":
            assert jax.device_put(array).unsafe_buffer_pointer() == array.ctypes.data, path


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack", "orbax"])
def test_read_into_a_given_array(tmp_path, tree, fmt):
    """`read_into` fills a slot of the kernel's [T, ...] stack (safetensors and msgpack read
    straight into it, other sources through a copy)."""
    from breadcrumbs_jax.io.base import read_into

    io.save(tree, tmp_path / "m", format=fmt)
    src = io.open_source(tmp_path / "m")
    assert getattr(src, "reads_into", False) == (fmt != "orbax")
    for path in src.leaves():
        want = src.read(path)
        slot = np.zeros((2, *want.shape), want.dtype)
        read_into(src, path, None, slot[1, ...])
        assert not slot[0].any()
        np.testing.assert_array_equal(slot[1].view(np.uint8), want.view(np.uint8), err_msg=path)


def test_read_into_an_array_of_another_shape_names_leaf_and_file(tmp_path, tree):
    save_file(tree, str(tmp_path / "ref.safetensors"))
    src = io.open_source(tmp_path / "ref.safetensors")
    path, info = next((p, i) for p, i in src.leaves().items() if i.size > 1)
    with pytest.raises(MergeError, match="cannot read") as e:
        src.read(path, out=np.zeros((info.size + 1,), info.dtype))
    assert path in str(e.value) and "ref.safetensors" in str(e.value)


def test_sharded_folder_round_trip_with_index(tmp_path, tree):
    io.save(tree, tmp_path / "model", format="safetensors", shard_size=700)
    index = json.loads((tmp_path / "model" / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tmp_path / "model" / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tree.values())
    for name, file in index["weight_map"].items():  # the index tells the truth
        with safe_open(str(tmp_path / "model" / file), framework="numpy") as f:
            assert name in f.keys()
    assert same_bits(io.load(tmp_path / "model"), tree)


def test_output_mirrors_the_input_shard_layout_and_copies_config(tmp_path, tree):
    io.save(tree, tmp_path / "src", format="safetensors", shard_size=700)
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llama"}')
    io.write(io.open_source(tmp_path / "src"), tmp_path / "dst", format="safetensors")
    src_index = json.loads((tmp_path / "src" / INDEX_NAME).read_text())
    dst_index = json.loads((tmp_path / "dst" / INDEX_NAME).read_text())
    assert dst_index["weight_map"] == src_index["weight_map"]
    assert (tmp_path / "dst" / "config.json").read_text() == '{"model_type": "llama"}'
    assert same_bits(io.load(tmp_path / "dst"), tree)


def test_slices_are_read_lazily_and_exactly(tmp_path, tree):
    io.save(tree, tmp_path / "m.safetensors")
    src = io.open_source(tmp_path / "m.safetensors")
    got = src.read("model.embed_tokens.weight", (slice(3, 7),))
    np.testing.assert_array_equal(got, tree["model.embed_tokens.weight"][3:7])


def test_truncated_file_is_a_clear_error(tmp_path, tree):
    io.save(tree, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(MergeError, match="truncated or corrupt") as e:
        io.open_source(tmp_path / "cut.safetensors")
    assert "cut.safetensors" in str(e.value)


def test_garbage_and_bad_header_entries_are_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MergeError, match="not a safetensors file"):
        io.open_source(tmp_path / "junk.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(MergeError, match="offsets do not match") as e:
        io.open_source(tmp_path / "bad.safetensors")
    assert "'w'" in str(e.value)


def test_index_naming_a_missing_shard_or_tensor_is_an_error(tmp_path, tree):
    io.save(tree, tmp_path / "m", format="safetensors", shard_size=700)
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "m" / first).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(MergeError, match="shard listed in the index is missing"):
        SafetensorsSource(tmp_path / "m")
    (tmp_path / "elsewhere.safetensors").rename(tmp_path / "m" / first)
    index["weight_map"]["not.a.tensor"] = first
    (tmp_path / "m" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(MergeError, match="does not hold it") as e:
        SafetensorsSource(tmp_path / "m")
    assert "not.a.tensor" in str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack"])
def test_written_data_is_synced_in_the_background_before_the_commit(tmp_path, tree, monkeypatch, fmt):
    """After every `_EVERY` bytes to a file, an fdatasync of it runs in a background thread, so
    the fsync at commit waits only for the rest; the output is the same."""
    synced = []
    real = write_behind._datasync

    def datasync(fd):
        synced.append((fd, threading.current_thread().name))
        real(fd)

    monkeypatch.setattr(write_behind, "_EVERY", 1000)
    monkeypatch.setattr(write_behind, "_datasync", datasync)
    io.save(tree, tmp_path / "model", format=fmt)
    assert synced and all(name.startswith("breadcrumbs-sync") for _, name in synced)
    assert same_bits(io.load(tmp_path / "model"), tree)


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack"])
def test_a_failed_background_sync_fails_the_write_and_leaves_no_output(tmp_path, tree, monkeypatch, fmt):
    def datasync(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(write_behind, "_EVERY", 1000)
    monkeypatch.setattr(write_behind, "_datasync", datasync)
    with pytest.raises(OSError, match="I/O error"):
        io.save(tree, tmp_path / "m", format=fmt)
    assert list(tmp_path.iterdir()) == []


def test_write_behind_runs_one_sync_at_a_time_and_counts_per_file(monkeypatch):
    release, calls = threading.Event(), []

    def blocked(fd):
        calls.append(fd)
        release.wait(10)

    monkeypatch.setattr(write_behind, "_datasync", blocked)
    behind = write_behind.WriteBehind(every=100)
    behind.wrote(3, 60)
    assert calls == []  # under the threshold
    behind.wrote(3, 60)
    behind.wrote(4, 150)  # over it, but file 3's sync still runs
    assert calls in ([], [3])  # (its thread may not have started yet)
    release.set()
    behind.wait()
    assert calls == [3]
    behind.wrote(4, 1)  # file 4's bytes were kept: now its sync starts
    behind.wait()
    assert calls == [3, 4]
