"""breadcrumbs_jax's CLI against mergekit on the same Breadcrumbs merge of Llama-style models.

Generates a Hugging Face-style Llama checkpoint (config.json + model.safetensors, random
float32 weights) and T fine-tunings (base + a dense, heavy-tailed perturbation), then, each in
a fresh process under /usr/bin/time, measures wall time and peak RSS of:

  read+write  reading every input tensor and writing one output (safetensors): the I/O floor
  ours        breadcrumbs-jax merge CONFIG OUT     (method breadcrumbs, tensor granularity)
  mergekit    mergekit-yaml CONFIG OUT             (merge_method breadcrumbs; if installed)

and compares the two outputs tensor by tensor: largest |difference|, and how many entries'
kept/dropped status differs (an entry is kept iff merged != base; differences can only come
from ties at the thresholds and from mergekit's float product int(density * n)).

    python bench/mergekit_compare.py --sizes 100m,400m --tasks 2,4 \
        --mergekit /work/venvs/mergekit/bin/mergekit-yaml

Float32 so that both tools compute the same task vectors (mergekit subtracts in the model's
dtype). mergekit is never a dependency: install it in its own virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # hidden, intermediate, layers, vocab -> about the named parameter count
    "tiny": (256, 512, 2, 1000),
    "100m": (768, 2048, 12, 32000),
    "400m": (1280, 3456, 16, 32000),
    "1b": (2048, 5632, 16, 32000),
}
DENSITY, GAMMA_TOP = 0.1, 0.01
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def llama_shapes(hidden, inter, layers, vocab) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_model(folder: Path, size: str, model: int) -> int:
    """Model 0 is the base; model t > 0 is base + 1e-3 * Student-t(3) noise. Returns bytes."""
    from safetensors.numpy import save_file

    hidden, inter, layers, vocab = SIZES[size]
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "torch_dtype": "float32", "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {}
    for k, (name, shape) in enumerate(llama_shapes(hidden, inter, layers, vocab).items()):
        x = np.random.default_rng([k]).standard_normal(shape, dtype=np.float32) * 0.02
        if model:
            x += 1e-3 * np.random.default_rng([k, model]).standard_t(3, size=shape).astype(np.float32)
        tensors[name] = x
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


def timed(cmd: list[str], env=None) -> dict:
    """Wall time and peak RSS (MiB) of a command in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return {"wall_s": wall, "rss_mib": rss}


IO_FLOOR = """
import sys
from safetensors import safe_open
from safetensors.numpy import save_file
out = {}
for path in sys.argv[2:]:
    with safe_open(path, framework="numpy") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
save_file(out, sys.argv[1])
"""


def our_config(root: Path, tasks: int) -> Path:
    import yaml

    cfg = {
        "base_model": str(root / "base"),
        "models": [{"path": str(root / f"ft{t}"), "weight": 1.0, "params": {"density": DENSITY, "gamma_top": GAMMA_TOP}} for t in range(1, tasks + 1)],
        "method": "breadcrumbs",
        "params": {"alpha": 1.0, "granularity": "tensor"},
        "output": {"format": "safetensors"},
    }
    path = root / f"ours_{tasks}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def mergekit_config(root: Path, tasks: int) -> Path:
    import yaml

    cfg = {
        "merge_method": "breadcrumbs",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"ft{t}"), "parameters": {"weight": 1.0, "density": DENSITY, "gamma": GAMMA_TOP}} for t in range(1, tasks + 1)],
        "dtype": "float32",
    }
    path = root / f"mergekit_{tasks}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def output_file(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]


def compare(base: Path, a: Path, b: Path) -> dict:
    """Largest |a - b| and the number of entries kept by one tool and not the other."""
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in output_file(folder):
            h = safe_open(str(f), framework="numpy")
            out.update({k: (h, k) for k in h.keys()})
        return out

    ta, tb, t0 = tensors(a), tensors(b), tensors(base)
    max_diff, kept_diff, entries = 0.0, 0, 0
    for k, (h0, _) in t0.items():
        x0 = h0.get_tensor(k)
        xa, xb = ta[k][0].get_tensor(k), tb[k][0].get_tensor(k)
        max_diff = max(max_diff, float(np.max(np.abs(xa.astype(np.float32) - xb.astype(np.float32)))))
        kept_diff += int(np.count_nonzero((xa != x0) != (xb != x0)))
        entries += x0.size
    return {"max_abs_diff": max_diff, "kept_status_differs": kept_diff, "entries": entries}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100m,400m")
    ap.add_argument("--tasks", default="2,4")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path of mergekit-yaml (optional)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, deleted)")
    args = ap.parse_args()
    tasks = [int(t) for t in args.tasks.split(",")]
    rows = []
    for size in args.sizes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench_{size}_", dir=args.dir))
        try:
            nbytes = write_model(root / "base", size, 0)
            for t in range(1, max(tasks) + 1):
                write_model(root / f"ft{t}", size, t)
            for T in tasks:
                inputs = [str(root / "base" / "model.safetensors")] + [str(root / f"ft{t}" / "model.safetensors") for t in range(1, T + 1)]
                row = {"size": size, "params_m": nbytes / 4e6, "T": T}
                row["io"] = timed([sys.executable, "-c", IO_FLOOR, str(root / "io.safetensors"), *inputs])
                (root / "io.safetensors").unlink()
                ours = root / f"ours_{T}"
                row["ours"] = timed([sys.executable, "-m", "breadcrumbs_jax.cli", "merge", str(our_config(root, T)), str(ours), "--no-progress"], env=ENV)
                if args.mergekit:
                    theirs = root / f"mergekit_{T}"
                    row["mergekit"] = timed([args.mergekit, str(mergekit_config(root, T)), str(theirs), "--lazy-unpickle"])
                    row["agreement"] = compare(root / "base", ours, theirs)
                    shutil.rmtree(theirs)
                shutil.rmtree(ours)
                rows.append(row)
                report(row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(rows, indent=1))


def report(row: dict) -> None:
    o, io = row["ours"], row["io"]
    line = (f"{row['size']:>5} ({row['params_m']:.0f}M params, f32) T={row['T']}: ours {o['wall_s']:.1f} s, "
            f"{o['rss_mib']:.0f} MiB; read+write floor {io['wall_s']:.1f} s (ours/floor {o['wall_s'] / io['wall_s']:.2f}x)")
    if "mergekit" in row:
        m, a = row["mergekit"], row["agreement"]
        line += (f"; mergekit {m['wall_s']:.1f} s, {m['rss_mib']:.0f} MiB -> speed-up {m['wall_s'] / o['wall_s']:.1f}x, "
                 f"RSS ratio {o['rss_mib'] / m['rss_mib']:.2f}; max |diff| {a['max_abs_diff']:.3g}, "
                 f"kept status differs on {a['kept_status_differs']} of {a['entries']} entries")
    print(line, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
