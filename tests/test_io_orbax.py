import glob
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from breadcrumbs_jax import MergeError, io
from breadcrumbs_jax.io.orbax import OrbaxSink, OrbaxSource

from tests.ckpt_factory import HF_SHAPES, pretrained, same_bits


def test_round_trip_values_and_dtypes(tmp_path):
    tree = pretrained()
    io.save(tree, tmp_path / "ckpt")
    assert io.detect_format(tmp_path / "ckpt") == "orbax"
    assert same_bits(io.load(tmp_path / "ckpt"), tree)
    assert same_bits(ocp.v1.load(tmp_path / "ckpt"), tree)  # loads with orbax's own API


def test_hugging_face_names_survive_orbax(tmp_path):
    tree = pretrained(HF_SHAPES)  # flat keys with dots, as in safetensors
    io.save(tree, tmp_path / "ckpt")
    assert list(io.open_source(tmp_path / "ckpt").leaves()) == sorted(tree)
    assert same_bits(io.load(tmp_path / "ckpt"), tree)


def test_leaf_by_leaf_writes_in_several_partial_saves(tmp_path):
    tree = pretrained()
    src = io.TreeSource(tree)
    sink = OrbaxSink(tmp_path / "ckpt", list(src.leaves().values()), flush_bytes=1)  # one save per leaf
    for p in sink.order:
        sink.write(p, src.read(p))
    sink.commit()
    assert same_bits(io.load(tmp_path / "ckpt"), tree)


def test_reads_v0_and_checkpoint_manager_layouts(tmp_path):
    tree = pretrained()
    ocp.PyTreeCheckpointer().save(tmp_path / "v0", tree)
    assert same_bits(io.load(tmp_path / "v0"), tree)
    mgr = ocp.CheckpointManager(tmp_path / "run")
    old = {**tree, "step": np.asarray(1, np.int64)}
    for step, state in ((1, old), (7, tree)):
        mgr.save(step, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
    src = OrbaxSource(tmp_path / "run")  # the latest step's item
    assert src.directory == tmp_path / "run" / "7" / "default"
    assert same_bits(io.load(tmp_path / "run"), tree)


def test_metadata_only_and_one_leaf(tmp_path):
    tree = pretrained()
    io.save(tree, tmp_path / "ckpt")
    src = io.open_source(tmp_path / "ckpt")
    info = src.leaves()["params/Dense_0/bias"]
    assert (info.shape, info.dtype) == ((12,), "bfloat16")
    got = src.read("params/embed/embedding", (slice(2, 5),))
    np.testing.assert_array_equal(got, tree["params"]["embed"]["embedding"][2:5])


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_array_data_is_a_clear_error(tmp_path, damage):
    io.save(pretrained(), tmp_path / "ckpt")
    for f in glob.glob(str(tmp_path / "ckpt" / "state" / "ocdbt.process_*" / "d" / "*")):
        if damage == "truncate":
            os.truncate(f, 20)
        else:
            os.remove(f)
    src = io.open_source(tmp_path / "ckpt")  # metadata is intact
    with pytest.raises(MergeError, match="unreadable") as e:
        for p in src.leaves():
            src.read(p)
    assert "ckpt" in str(e.value) and "leaf '" in str(e.value)


def test_damaged_metadata_and_non_checkpoints(tmp_path):
    io.save(pretrained(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "state" / "_METADATA").write_text("{not json")
    with pytest.raises(MergeError, match="Orbax"):
        io.open_source(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="not an Orbax checkpoint"):
        io.open_source(tmp_path / "empty")
    shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(MergeError, match="no such file"):
        io.open_source(tmp_path / "ckpt")
