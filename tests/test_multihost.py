"""Multi-host merging on one machine: 2 processes x 4 CPU devices, jax.distributed on a local
coordinator, launched through the command line exactly as tpu_scripts/ launch it on TPU hosts;
the output must equal the single-process merge bit for bit."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml

from breadcrumbs_jax.cli import main
from breadcrumbs_jax.io import load, save

from tests.ckpt_factory import models, same_bits

ROOT = Path(__file__).resolve().parent.parent
PROCESSES, DEVICES = 2, 4

# sizes the meshes do not all divide, a bfloat16 leaf, a scalar, an integer leaf
FLAX = {
    "params/Dense_0/kernel": ((24, 16), np.float32),
    "params/Dense_0/bias": ((16,), ml_dtypes.bfloat16),
    "params/odd/kernel": ((13, 7), np.float32),
    "params/conv/kernel": ((5, 3, 11), np.float32),
    "params/vec": ((1000,), np.float32),
    "params/scale": ((), np.float32),
    "step": ((), np.int64),
}
HF = {
    "model.embed_tokens.weight": ((40, 8), np.float32),
    "model.layers.0.self_attn.q_proj.weight": ((16, 16), np.float32),
    "model.layers.0.mlp.up_proj.weight": ((24, 8), ml_dtypes.bfloat16),
    "model.layers.0.mlp.odd.weight": ((13, 7), np.float32),
    "model.norm.weight": ((8,), np.float32),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_models(tmp: Path, shapes: dict, suffix: str) -> Path:
    base, fts = models(shapes, n=3, seed=7)
    names = ["base"] + [f"task{t}" for t in range(len(fts))]
    for name, tree in zip(names, [base, *fts]):
        save(tree, tmp / f"{name}{suffix}")
    return tmp


def launch(args: list[str], timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Run `breadcrumbs-jax ARGS --distributed` in PROCESSES local processes of DEVICES CPU devices."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "breadcrumbs_jax.cli", *args, "--distributed", "--coordinator",
             f"127.0.0.1:{port}", "--num-processes", str(PROCESSES), "--process-id", str(i)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(PROCESSES)
    ]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r in out:
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def read_bytes(result: subprocess.CompletedProcess) -> tuple[int, int]:
    """(bytes read, bytes of the leaves loaded) from the summary line a process prints."""
    line = next(x for x in result.stderr.splitlines() if x.startswith("process ") and " read " in x)
    m = re.search(r"read (\d+) of the (\d+) bytes", line)
    return int(m.group(1)), int(m.group(2))


@pytest.mark.multihost
@pytest.mark.filterwarnings("ignore:.*keep no entries")  # the scalar leaf's band is empty
@pytest.mark.parametrize(
    "shapes, suffix, params, mesh",
    [
        # safetensors in, PyTorch layout, row granularity, mesh (8,) over both processes
        pytest.param(HF, ".safetensors", {"granularity": "row", "beta": 0.3, "gamma": 0.9, "alpha": 0.5}, [],
                     marks=pytest.mark.slow),
        # Orbax in, Flax layout, one ranked group over all leaves, mesh (2, 4)
        (FLAX, "", {"granularity": "global", "density": 0.4, "gamma_top": 0.05}, ["--mesh", "2,4", "--mesh-axes", "x,y"]),
    ],
    ids=["safetensors-row-8", "orbax-global-2x4"],
)
def test_two_processes_equal_one(tmp_path, shapes, suffix, params, mesh):
    write_models(tmp_path, shapes, suffix)
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": f"base{suffix}",
        "models": [{"path": f"task{t}{suffix}"} for t in range(3)],
        "method": "breadcrumbs",
        "params": params,
    }))
    want, got = tmp_path / "single", tmp_path / "multi"
    assert main(["merge", str(config), str(want), "--report", str(tmp_path / "single.json")]) == 0
    results = launch(["merge", str(config), str(got), "--report", str(tmp_path / "multi.json"), *mesh])

    assert same_bits(load(got), load(want))
    assert json.loads((tmp_path / "multi.json").read_text()) == json.loads((tmp_path / "single.json").read_text())
    for r in results:  # each process read only its devices' shards (plus the replicated leaves)
        read, total = read_bytes(r)
        assert 0 < read < total, r.stderr
    assert sum(read_bytes(r)[0] for r in results) >= read_bytes(results[0])[1]
    assert "merged" in results[0].stderr and "merged" not in results[1].stderr

