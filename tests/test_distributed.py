"""The sharded checkpoint merge in one process (8 CPU devices): the command line's mesh and shard
options, its dry run, per-process reads, and its checks; jax.distributed argument checks."""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P

from breadcrumbs_jax.cli import main
from breadcrumbs_jax.distributed import global_leaf, initialize, local_bytes
from breadcrumbs_jax.errors import MergeError
from breadcrumbs_jax.io import load, open_source, save
from breadcrumbs_jax.sharding import make_mesh
from tests.ckpt_factory import models, same_bits

SHAPES = {
    "params/Dense_0/kernel": ((24, 16), np.float32),
    "params/Dense_0/bias": ((16,), ml_dtypes.bfloat16),
    "params/odd": ((13, 7), np.float32),
    "step": ((), np.int64),
}


@pytest.fixture
def config(tmp_path):
    base, fts = models(SHAPES, n=2, seed=3)
    save(base, tmp_path / "base")
    for t, f in enumerate(fts):
        save(f, tmp_path / f"ft{t}.safetensors")  # mixed formats: Orbax base, safetensors tasks
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": "base", "models": [{"path": "ft0.safetensors"}, {"path": "ft1.safetensors"}],
        "method": "ties", "params": {"density": 0.5, "granularity": "row"},
    }))
    return path


def test_cli_sharded_equals_streaming(config, tmp_path, capsys):
    assert main(["merge", str(config), str(tmp_path / "one")]) == 0
    args = ["merge", str(config), str(tmp_path / "eight"), "--mesh", "2,4", "--mesh-axes", "x,y",
            "--shard", "params/odd=-,-"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "process 0/1: read" in err and "on mesh {'x': 2, 'y': 4}" in err
    assert same_bits(load(tmp_path / "eight"), load(tmp_path / "one"))
    assert (tmp_path / "eight.report.json").read_text() == (tmp_path / "one.report.json").read_text()
    assert main(args) == 2 and "output exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_cli_sharded_dry_run(config, tmp_path, capsys):
    assert main(["merge", str(config), str(tmp_path / "out"), "--mesh", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mesh {'x': 8} over 8 devices of 1 process(es)" in out
    table = out[out.index("mesh {"):]
    rows = {r[0]: r[1:] for r in (re.split(r"\s{2,}", line) for line in table.splitlines()) if len(r) == 4}
    # row granularity keeps rows whole: the [in, out] kernel splits its output axis
    assert rows["params/Dense_0/kernel"] == ["24x16", "(None, 'x')", "24x2"]
    assert rows["params/odd"] == ["13x7", "(None, None)", "13x7"]  # 8 divides neither dimension
    assert rows["step"] == ["scalar", "()", "scalar"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, yaml_extra, message",
    [
        (["--coordinator", "127.0.0.1:1"], {}, "need --distributed"),
        (["--mesh", "3"], {}, "needs 3 devices, 8 available"),
        (["--mesh", "8", "--shard", "params/odd=x"], {}, "not divisible by the 8 devices"),
        (["--mesh", "8"], {"vocab": "shared"}, "vocab: shared is not supported"),
        (["--mesh", "8"], {"output": {"format": "safetensors"}}, "write Orbax checkpoints"),
    ],
)
def test_cli_sharded_bad_input(config, tmp_path, capsys, extra, yaml_extra, message):
    if yaml_extra:
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), **yaml_extra}))
    assert main(["merge", str(config), str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_merge_leaves_no_output(config, tmp_path, capsys):
    bad = load(tmp_path / "ft1.safetensors")
    bad["params"]["Dense_0"]["kernel"][3, 4] = np.nan
    (tmp_path / "ft1.safetensors").unlink()
    save(bad, tmp_path / "ft1.safetensors")
    assert main(["merge", str(config), str(tmp_path / "out"), "--mesh", "8"]) == 2
    assert "leaf 'params/Dense_0/kernel': contains NaN or Inf" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))  # neither the output nor its staging


def test_bad_mesh_argument(config, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["merge", str(config), str(tmp_path / "out"), "--mesh", "2x4"])
    assert "not a mesh shape" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, dtype", [("orbax", np.float32), ("orbax", np.float64), ("safetensors", np.float32)])
def test_each_device_reads_its_shard(tmp_path, fmt, dtype):
    """A global leaf built from per-device reads equals the leaf (float64 arrives as JAX holds
    it, float32), and each distinct shard is read once."""
    x = np.arange(24 * 16, dtype=dtype).reshape(24, 16)
    path = tmp_path / ("ckpt" if fmt == "orbax" else "ckpt.safetensors")
    save({"w": x}, path)
    source = open_source(path)
    mesh = make_mesh((2, 4), ("x", "y"))
    leaf = global_leaf(source, source.leaves()["w"], NamedSharding(mesh, P("x", "y")))
    assert leaf.dtype == np.float32 and np.array_equal(np.asarray(leaf), x.astype(np.float32))
    assert [s.data.shape for s in leaf.addressable_shards] == [(12, 4)] * 8
    assert local_bytes(leaf) == leaf.nbytes  # 8 distinct shards, each once
    replicated = global_leaf(source, source.leaves()["w"], NamedSharding(mesh, P()))
    assert local_bytes(replicated) == leaf.nbytes  # 8 copies of one shard, read once


@pytest.mark.parametrize(
    "args, env, message",
    [
        (("127.0.0.1:1234", None, None), {}, "give all of"),
        ((None, 2, None), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "give all of"),
        ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
         "JAX_NUM_PROCESSES must be an integer"),
        (("h:1", 2, 2), {}, "process id 2 is not in [0, 2)"),
    ],
)
def test_initialize_checks_arguments(args, env, message):
    with pytest.raises(MergeError, match=message.replace("[", r"\[").replace(")", r"\)")):
        initialize(*args, env=env)
