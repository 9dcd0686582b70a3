#!/usr/bin/env bash
# Merge Hugging Face-style safetensors checkpoints from the command line with a YAML config.
#
#   bash examples/merge_safetensors_cli.sh [WORKDIR]
#
# Builds a small "pre-trained" model and three "fine-tunings" of it as safetensors files
# (PyTorch names and [out, in] layout, as a Hugging Face checkpoint has them), writes the
# config, shows the per-leaf plan (--dry-run), merges, and prints what was written. With real
# checkpoints only the paths in the config change: the merge reads one tensor at a time.
set -euo pipefail
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cd "$work"

python - <<'PY'
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(0)
shapes = {
    "model.embed_tokens.weight": (1000, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (256, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 256),
    "model.norm.weight": (64,),
}
base = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in shapes.items()}
save_file(base, "base.safetensors")
for name in ("math", "code", "chat"):
    tuned = {k: v + rng.normal(0, 0.002, v.shape).astype(np.float32) for k, v in base.items()}
    save_file(tuned, f"{name}.safetensors")
PY

cat > merge.yaml <<'YAML'
base_model: base.safetensors
models:
  - {path: math.safetensors, name: math}
  - {path: code.safetensors, name: code, weight: 1.2}
  - {path: chat.safetensors, name: chat, params: {density: 0.2}}   # its own band
method: breadcrumbs
params: {alpha: 0.5, density: 0.1, gamma_top: 0.01, granularity: row}
layout: torch                      # [out, in] weights: rows are output units
rules:
  - {pattern: "*embed_tokens*", action: base}                  # keep the pre-trained embeddings
  - {pattern: "*norm*", method: task_arithmetic, params: {alpha: 0.5}}
output: {format: safetensors}
YAML

breadcrumbs-jax merge merge.yaml merged.safetensors --dry-run
breadcrumbs-jax merge merge.yaml merged.safetensors --overwrite

python - <<'PY'
import json
from safetensors import safe_open

with safe_open("merged.safetensors", framework="numpy") as f:
    for k in f.keys():
        print(f"{k:45s} {f.get_slice(k).get_shape()}")
report = json.load(open("merged.safetensors.report.json"))
print("report leaves:", len(report["leaves"]), "tasks:", report["task_names"])
PY
echo "outputs in $work"
