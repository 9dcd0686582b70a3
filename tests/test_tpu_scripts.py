"""tpu_scripts/: shellcheck-clean, argument checks, and the exact commands each step prints
with --dry-run (they cannot run here: no gcloud, no TPU)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from breadcrumbs_jax.cli import build_parser
from breadcrumbs_jax.sharding import ShardRule

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
WHERE = ["--name", "bc-test", "--zone", "us-central2-b"]


def sh(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=60)


def dry(script: str, command: str, *args: str) -> list[list[str]]:
    """The commands a --dry-run prints (lines '+ ...'), split into words as a shell would."""
    r = sh(script, command, *WHERE, "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]


def remote(cmd: list[str]) -> str:
    """The command line a `gcloud ... ssh --command=...` runs on the workers."""
    (line,) = [w[len("--command="):] for w in cmd if w.startswith("--command=")]
    return line


def words(line: str) -> list[str]:
    """A shell command line split into words and operators (';', '&&', '|', ...)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    r = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=SCRIPTS.parent)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("script", ["tpu_vm.sh", "tpu_pod.sh"])
def test_help(script):
    r = sh(script, "--help")
    assert r.returncode == 0
    for command in ("create", "install", "stage", "merge", "teardown"):
        assert f"\n  {command} " in r.stdout
    assert ("  fetch " in r.stdout) == (script == "tpu_vm.sh")


def test_create():
    assert dry("tpu_pod.sh", "create", "--accelerator-type", "v4-32") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "bc-test", "--zone=us-central2-b",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
    ]]
    assert dry("tpu_vm.sh", "create", "--accelerator-type", "v5litepod-8", "--spot", "--project", "my-proj") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "bc-test", "--zone=us-central2-b", "--project=my-proj",
        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot",
    ]]
    (cmd,) = dry("tpu_pod.sh", "create", "--accelerator-type", "v6e-32", "--version", "custom-runtime")
    assert cmd[-1] == "--version=custom-runtime"


def test_install():
    build, copy, install = dry("tpu_pod.sh", "install")
    assert build[:4] == ["python3", "-m", "pip", "wheel"] and build[-1] == str(SCRIPTS.parent)
    wheel = Path(copy[5])
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and wheel.name.startswith("breadcrumbs_jax-")
    assert copy[6:] == [f"bc-test:{wheel.name}", "--zone=us-central2-b", "--worker=all"]
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bc-test"] and "--worker=all" in install
    w = words(remote(install))
    pip = ["breadcrumbs-venv/bin/pip", "install", "-q", "jax[tpu]==0.10.2", "gcsfs", f"./{wheel.name}", ";"]
    assert pip == w[w.index("jax[tpu]==0.10.2") - 3: w.index("jax[tpu]==0.10.2") + 4]
    assert ["python3.11", "-m", "venv", "breadcrumbs-venv", ";"] == w[w.index("venv") - 2: w.index("venv") + 3]
    (_, _, vm_install) = dry("tpu_vm.sh", "install")
    assert "--worker=0" in vm_install


def test_stage():
    (cmd,) = dry("tpu_pod.sh", "stage", "--from", "gs://bucket/models/", "--to", "/tmp/my models")
    assert remote(cmd) == "set -e; mkdir -p '/tmp/my models' && gcloud storage cp -r 'gs://bucket/models/*' '/tmp/my models/'"


def test_merge_pod(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("base_model: /tmp/models/base\n")
    copy, launch = dry(
        "tpu_pod.sh", "merge", "--config", str(config), "--out", "gs://bucket/merged", "--mesh", "4,4",
        "--mesh-axes", "x,y", "--shard", "*kernel=-,x+y", "--", "--overwrite",
    )
    assert copy[4:7] == ["scp", str(config), "bc-test:breadcrumbs-merge.yaml"] and "--worker=all" in copy
    assert "--worker=all" in launch
    line = remote(launch)
    assert line.startswith("set -o pipefail; cd && ") and line.endswith(" 2>&1 | tee breadcrumbs-merge.log")
    w = words(line)
    args = w[w.index("breadcrumbs-venv/bin/breadcrumbs-jax") + 1: w.index("2")]
    assert args == [
        "merge", "breadcrumbs-merge.yaml", "gs://bucket/merged", "--distributed", "--mesh", "4,4", "--mesh-axes",
        "x,y", "--shard", "*kernel=-,x+y", "--report", "breadcrumbs-merge.report.json", "--overwrite",
    ]
    parsed = build_parser().parse_args(args)  # what the launcher on each worker will make of them
    assert (parsed.command, parsed.config, parsed.out) == ("merge", "breadcrumbs-merge.yaml", "gs://bucket/merged")
    assert parsed.distributed and parsed.overwrite and parsed.mesh == (4, 4) and parsed.mesh_axes == ("x", "y")
    assert parsed.shard == [ShardRule("*kernel", (None, ("x", "y")))]


def test_merge_vm_fetch_teardown(tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text("base_model: base\n")
    _, launch = dry("tpu_vm.sh", "merge", "--config", str(config), "--out", "merged")
    assert "--worker=0" in launch
    assert remote(launch).startswith("set -o pipefail; cd && breadcrumbs-venv/bin/breadcrumbs-jax merge "
                                     "breadcrumbs-merge.yaml merged --sharded --report ")  # all chips of the VM
    assert dry("tpu_vm.sh", "fetch", "--out", "merged", "--to", str(tmp_path)) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "bc-test:merged", str(tmp_path),
        "--zone=us-central2-b", "--worker=0",
    ]]
    assert dry("tpu_pod.sh", "teardown") == [[
        "gcloud", "compute", "tpus", "tpu-vm", "delete", "bc-test", "--zone=us-central2-b", "--quiet",
    ]]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("tpu_vm.sh", ["create", "--zone", "us-central2-b", "--accelerator-type", "v4-8"], "--name is required"),
        ("tpu_vm.sh", ["create", "--name", "Bad_Name", "--zone", "us-central2-b"], "--name 'Bad_Name'"),
        ("tpu_vm.sh", ["create", "--name", "a", "--zone", "central"], "not a zone"),
        ("tpu_vm.sh", ["create", *WHERE], "create needs --accelerator-type"),
        ("tpu_vm.sh", ["create", *WHERE, "--accelerator-type", "v4-32"], "use tpu_pod.sh"),
        ("tpu_pod.sh", ["create", *WHERE, "--accelerator-type", "v5litepod-8"], "use tpu_vm.sh"),
        ("tpu_pod.sh", ["create", *WHERE, "--accelerator-type", "tpu9"], "not like v4-32"),
        ("tpu_pod.sh", ["create", *WHERE, "--accelerator-type", "v9x-32"], "no default --version"),
        ("tpu_pod.sh", ["stage", *WHERE, "--from", "/local", "--to", "/tmp/m"], "--from gs://"),
        ("tpu_pod.sh", ["merge", *WHERE, "--out", "gs://b/o"], "merge needs --config"),
        ("tpu_pod.sh", ["merge", *WHERE, "--config", "/no/such.yaml", "--out", "gs://b/o"], "is not a file"),
        ("tpu_pod.sh", ["merge", *WHERE, "--config", __file__, "--out", "/local/out"], "must be shared storage"),
        ("tpu_pod.sh", ["merge", *WHERE, "--config", __file__, "--out", "gs://b/o", "--mesh", "4x4"], "--mesh '4x4'"),
        ("tpu_pod.sh", ["fetch", *WHERE, "--out", "o", "--to", "/tmp"], "fetch is for a single VM"),
        ("tpu_pod.sh", ["resize", *WHERE], "unknown command 'resize'"),
        ("tpu_pod.sh", ["teardown", *WHERE, "--force"], "unknown argument '--force'"),
        ("tpu_pod.sh", ["teardown", "--name"], "--name needs a value"),
    ],
)
def test_bad_arguments(script, args, message):
    r = sh(script, *args, "--dry-run")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "+ " not in r.stdout  # nothing was (or would have been) run


def test_runs_nothing_without_gcloud(tmp_path):
    """Without --dry-run the scripts need gcloud, and say so before doing anything."""
    bash = shutil.which("bash")
    r = subprocess.run([bash, str(SCRIPTS / "tpu_vm.sh"), "teardown", *WHERE], capture_output=True, text=True,
                       env={"PATH": str(tmp_path)}, timeout=60)
    assert r.returncode == 2 and "gcloud is not installed" in r.stderr and "+ " not in r.stdout
