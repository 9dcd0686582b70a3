import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import breadcrumbs_jax as bj
from breadcrumbs_jax import io
from breadcrumbs_jax.cli import main

from tests.ckpt_factory import HF_SHAPES, models, same_bits

PARAMS = {"alpha": 0.7, "beta": 0.6, "gamma": 0.95}  # as test_stream's BC: its kernels are compiled once


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    base, fts = models()
    io.save(base, d / "base")
    for i, (ft, suffix) in enumerate(zip(fts, (".safetensors", ".msgpack", ""))):
        io.save(ft, d / f"ft{i}{suffix}")
    return d, base, fts


def write_config(path, ckpts_dir, models=("ft0.safetensors", "ft1.msgpack", "ft2"), **extra):
    data = {"base_model": str(ckpts_dir / "base"), "models": [{"path": str(ckpts_dir / m)} for m in models],
            "method": "breadcrumbs", "params": PARAMS, **extra}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_merge_end_to_end(tmp_path, ckpts, capsys):
    d, base, fts = ckpts
    config = write_config(tmp_path / "merge.yaml", d)
    code, out, err = run(capsys, "merge", config, tmp_path / "out", "--no-progress")
    assert code == 0, err
    expected = bj.merge(base, fts, bj.breadcrumbs(**PARAMS))
    assert same_bits(io.load(tmp_path / "out"), expected.params)
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert [lr["kept"] for lr in report["leaves"]] == [list(lr.kept) for lr in expected.report.leaves]
    assert "merged 4 leaves of 3 models" in err

    code, _, err = run(capsys, "merge", config, tmp_path / "out")
    assert code == 2 and err.strip() == f"breadcrumbs-jax: error: {tmp_path / 'out'}: output exists; pass --overwrite (overwrite=True) to replace it"
    code, _, _ = run(capsys, "merge", config, tmp_path / "out", "--overwrite", "--report", tmp_path / "r.json")
    assert code == 0 and (tmp_path / "r.json").exists()


def test_safetensors_output_with_shards_and_dtype(tmp_path, ckpts, capsys):
    d, base, fts = ckpts
    config = write_config(tmp_path / "m.yaml", d, dtype="bfloat16", output={"format": "safetensors", "shard_size": 300})
    code, _, err = run(capsys, "merge", config, tmp_path / "hf")
    assert code == 0, err
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    expected = bj.merge(base, fts, bj.breadcrumbs(**PARAMS), out_dtype="bfloat16").params
    assert same_bits(io.load(tmp_path / "hf"), expected)


def test_dry_run_writes_nothing(tmp_path, ckpts, capsys):
    d, _, _ = ckpts
    config = write_config(tmp_path / "m.yaml", d, rules=[{"pattern": "*embed*", "action": "base"}])
    code, out, _ = run(capsys, "merge", config, tmp_path / "out", "--dry-run")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("params/", "step"))}
    assert set(lines) == {"params/embed/embedding", "params/Dense_0/kernel", "params/Dense_0/bias", "step"}
    assert " base " in lines["params/embed/embedding"] and "*embed*" in lines["params/embed/embedding"]
    assert "breadcrumbs(band[0.6,0.95]/tensor,sum,alpha=0.7)" in lines["params/Dense_0/kernel"]
    assert " copy " in lines["step"]
    assert not (tmp_path / "out").exists()


def test_inspect_reads_metadata_only(tmp_path, ckpts, capsys):
    d, base, _ = ckpts
    code, out, _ = run(capsys, "inspect", d / "ft0.safetensors")
    assert code == 0
    assert "params/Dense_0/bias" in out and "bfloat16" in out and "4 leaves" in out
    code, out, _ = run(capsys, "inspect", d / "base", "--json", "--pattern", "params/Dense_0/*")
    info = json.loads(out)
    assert info["format"] == "orbax"
    assert {(x["path"], tuple(x["shape"]), x["dtype"]) for x in info["leaves"]} == {
        ("params/Dense_0/kernel", (8, 12), "float32"), ("params/Dense_0/bias", (12,), "bfloat16")}


def _bad(tmp_path, d, case):
    """Write the bad input of `case`; return the model list of the config."""
    models = ["ft0.safetensors", "ft1.msgpack", "ft2"]
    fts = [io.load(d / m) for m in models]
    if case == "missing file":
        return [*models[:2], str(tmp_path / "nowhere")]
    if case == "truncated safetensors":
        raw = (d / models[0]).read_bytes()
        (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 7])
        return [str(tmp_path / "cut.safetensors"), *models[1:]]
    if case == "corrupt orbax":
        io.save(fts[2], tmp_path / "broken")
        for f in glob.glob(str(tmp_path / "broken" / "state" / "ocdbt.process_*" / "d" / "*")):
            os.truncate(f, 16)
        return [*models[:2], str(tmp_path / "broken")]
    if case == "leaf missing":
        del fts[1]["params"]["Dense_0"]["bias"]
    elif case == "shape mismatch":
        fts[1]["params"]["Dense_0"]["kernel"] = np.zeros((12, 8), np.float32)
    elif case == "vocab mismatch":
        emb = fts[1]["params"]["embed"]["embedding"]
        fts[1]["params"]["embed"]["embedding"] = np.concatenate([emb, emb[:2]])
    io.save(fts[1], tmp_path / "changed.msgpack")
    return [models[0], str(tmp_path / "changed.msgpack"), models[2]]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing file", "nowhere: no such file or directory"),
        ("truncated safetensors", "cut.safetensors: truncated or corrupt"),
        ("corrupt orbax", "broken, leaf 'params/"),
        ("leaf missing", "changed.msgpack, leaf 'params/Dense_0/bias': missing from this model"),
        ("shape mismatch", "changed.msgpack, leaf 'params/Dense_0/kernel': shape (12, 8) differs from the pre-trained (8, 12)"),
        ("vocab mismatch", "changed.msgpack, leaf 'params/embed/embedding': shape (42, 8) differs from the pre-trained "
                           "(40, 8): 42 vs 40 entries along axis 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, ckpts, capsys, case, message):
    d, _, _ = ckpts
    config = write_config(tmp_path / "m.yaml", d, models=_bad(tmp_path, d, case))
    code, _, err = run(capsys, "merge", config, tmp_path / "out", "--no-progress")
    assert code == 2
    assert err.startswith("breadcrumbs-jax: error: ") and err.count("\n") == 1
    assert message in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_vocab_shared_option(tmp_path, capsys):
    base, fts = models(HF_SHAPES, n=1)
    fts[0]["lm_head.weight"] = np.concatenate([fts[0]["lm_head.weight"], np.ones((3, 8), np.float32)])
    io.save(base, tmp_path / "base.safetensors")
    io.save(fts[0], tmp_path / "ft.safetensors")
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base.safetensors", "models": [{"path": "ft.safetensors"}],
                                      "method": "task_arithmetic", "vocab": "shared"}))
    code, _, err = run(capsys, "merge", config, tmp_path / "out.safetensors")
    assert code == 0, err
    fts[0]["lm_head.weight"] = fts[0]["lm_head.weight"][:40]
    assert same_bits(io.load(tmp_path / "out.safetensors"), bj.merge(base, fts, bj.task_arithmetic(), layout="torch").params)


def test_unknown_config_key_and_runtime_failure(tmp_path, ckpts, capsys, monkeypatch):
    d, _, _ = ckpts
    config = write_config(tmp_path / "m.yaml", d, outptu={"format": "orbax"})
    code, _, err = run(capsys, "merge", config, tmp_path / "out")
    assert code == 2 and "m.yaml: outptu: unknown key (allowed here: base_model" in err
    config = write_config(tmp_path / "m.yaml", d)

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.orbax.OrbaxSink, "commit", disk_full)
    code, _, err = run(capsys, "merge", config, tmp_path / "out")
    assert code == 1 and err.strip() == "breadcrumbs-jax: failed: OSError: [Errno 28] No space left on device"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))]


def test_process_exit_codes(tmp_path, ckpts):
    d, _, _ = ckpts
    cmd = [sys.executable, "-m", "breadcrumbs_jax.cli"]
    ok = subprocess.run([*cmd, "inspect", str(d / "ft1.msgpack")], capture_output=True, text=True)
    assert ok.returncode == 0 and "msgpack (flax layout): 4 leaves" in ok.stdout
    bad = subprocess.run([*cmd, "inspect", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("none: no such file or directory")
    usage = subprocess.run([*cmd, "merge"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_program_runs_main_in_a_tuned_process(tmp_path, ckpts):
    """`program` (the console script and `python -m breadcrumbs_jax.cli`) gives main's exit codes
    and output, with glibc keeping freed blocks of up to 32 MiB for reuse and the imported
    commands' objects frozen out of garbage collection."""
    d, _, _ = ckpts
    script = ("import gc, sys; from breadcrumbs_jax import cli; code = cli.program(sys.argv[1:]); "
              "print('frozen', gc.get_freeze_count() > 0, 'kept', cli._keep_freed_memory()); sys.exit(code)")
    cmd = [sys.executable, "-c", script]
    ok = subprocess.run([*cmd, "inspect", str(d / "ft1.msgpack")], capture_output=True, text=True)
    assert ok.returncode == 0 and "msgpack (flax layout): 4 leaves" in ok.stdout
    assert ok.stdout.strip().endswith(f"frozen True kept {sys.platform == 'linux'}")
    bad = subprocess.run([*cmd, "inspect", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "none: no such file or directory" in bad.stderr


def test_kernels_from_jax_cache_are_not_stored(tmp_path, ckpts):
    """A kernel that JAX's persistent cache gives (its store entry gone, e.g. after an upgrade)
    is not stored: re-serialized, it lacked its code, and the next run failed ("Function ... not
    found"). Every run gives the same bits."""
    d, _, _ = ckpts
    config = write_config(tmp_path / "merge.yaml", d)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    env["BREADCRUMBS_JAX_CACHE"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "breadcrumbs_jax.cli", "merge", config]
    kernels = tmp_path / "cache" / "kernels"
    for out in ("a", "b", "c"):
        done = subprocess.run([*cmd, str(tmp_path / out)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        if out == "a":
            assert any(kernels.iterdir())
            shutil.rmtree(kernels)
        else:
            assert not kernels.exists() or not any(kernels.iterdir())
    assert same_bits(io.load(tmp_path / "a"), io.load(tmp_path / "b"))
    assert same_bits(io.load(tmp_path / "a"), io.load(tmp_path / "c"))


def test_merge_keeps_compiled_kernels_across_runs(tmp_path, ckpts):
    """On one device the CLI keeps its kernels in ~/.cache/breadcrumbs_jax ($XDG_CACHE_HOME), or in
    $BREADCRUMBS_JAX_CACHE (JAX's persistent cache, and the kernel store's executables); `off` keeps none.
    The second run reads them and gives the same bits."""
    d, _, _ = ckpts
    config = write_config(tmp_path / "merge.yaml", d)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "BREADCRUMBS_JAX_CACHE")}  # one device
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    cmd = [sys.executable, "-m", "breadcrumbs_jax.cli", "merge", config]
    stored = {}
    for out in ("a", "b"):
        done = subprocess.run([*cmd, str(tmp_path / out)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        stored[out] = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "xdg" / "breadcrumbs_jax" / "kernels").iterdir()}
    cached = sorted(p.name for p in (tmp_path / "xdg" / "breadcrumbs_jax").glob("*-cache"))
    assert cached, "no kernel was cached"
    assert stored["a"] and stored["b"] == stored["a"]  # the second run loaded every kernel from the store
    assert same_bits(io.load(tmp_path / "a"), io.load(tmp_path / "b"))
    done = subprocess.run([*cmd, str(tmp_path / "c")], capture_output=True, text=True,
                          env={**env, "BREADCRUMBS_JAX_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "none").exists()
