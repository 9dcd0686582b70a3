"""Llama-style Hugging Face checkpoints with random weights: a base and T perturbed fine-tunings.

    python bench/llama_models.py OUT_DIR --size 100m --tasks 4 [--dtype bfloat16|float32]

Each model is a folder with config.json (LlamaForCausalLM, so mergekit and transformers accept it)
and safetensors shards of at most 1 GiB with model.safetensors.index.json, tensors in PyTorch
layout ([out, in]). The base has N(0, 0.02) matrices and unit norms; fine-tuning t adds
N(0, 0.002) noise (N(0, 0.01) to norms), so the task vectors are dense and, in bf16, full of
exact ties, as real ones are. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np

# name: (hidden, intermediate, layers, heads, vocab)
SIZES = {
    "100m": (768, 2048, 8, 12, 32000),
    "400m": (1024, 2816, 24, 16, 32000),
    "1b": (2048, 5632, 16, 16, 32000),
}
SHARD_BYTES = 1 << 30


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama model (untied embeddings, as many heads for k/v as q)."""
    h, i, n_layers, _, v = SIZES[size]
    out = {"model.embed_tokens.weight": (v, h)}
    for layer in range(n_layers):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{name}.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def n_params(size: str) -> int:
    return sum(int(np.prod(s)) for s in shapes(size).values())


def config(size: str, dtype: str) -> dict:
    h, i, n_layers, heads, v = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": v, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
    }


def _tensor(rng, name: str, shape, base: np.ndarray | None) -> np.ndarray:
    norm = name.endswith("norm.weight")
    if base is None:
        return np.ones(shape, np.float32) if norm else rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01 if norm else 0.002)
    return base.astype(np.float32) + noise


def write_model(folder: Path, size: str, dtype: str, seed: int, base_folder: Path | None) -> None:
    """One model; with `base_folder`, a fine-tuning of that base (read back tensor by tensor)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    base_files = {}
    if base_folder is not None:
        index = json.loads((base_folder / "model.safetensors.index.json").read_text())["weight_map"]
        base_files = {name: base_folder / f for name, f in index.items()}
    shards, current, current_bytes = [], {}, 0
    for name, shape in shapes(size).items():
        base = None
        if base_folder is not None:
            with safe_open(str(base_files[name]), framework="numpy") as f:
                base = f.get_tensor(name)
        current[name] = _tensor(rng, name, shape, base).astype(np_dtype)
        current_bytes += current[name].nbytes
        if current_bytes >= SHARD_BYTES:
            shards.append(current)
            current, current_bytes = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for s in shards for a in s.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config(size, dtype), indent=1))


def make_models(out: Path, size: str, tasks: int, dtype: str = "bfloat16", seed: int = 0) -> tuple[Path, list[Path]]:
    """Base and fine-tuned folders under out/{size}-{dtype}/ (made once, reused)."""
    root = out / f"{size}-{dtype}"
    base = root / "base"
    if not (base / "config.json").exists():
        write_model(base, size, dtype, seed, None)
    fts = []
    for t in range(tasks):
        ft = root / f"ft{t}"
        if not (ft / "config.json").exists():
            write_model(ft, size, dtype, seed + 1 + t, base)
        fts.append(ft)
    return base, fts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=list(SIZES), default="100m")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    base, fts = make_models(args.out, args.size, args.tasks, args.dtype)
    print(f"{args.size}: {n_params(args.size) / 1e6:.0f}M parameters; base {base}; fine-tunings {', '.join(map(os.fspath, fts))}")


if __name__ == "__main__":
    main()
