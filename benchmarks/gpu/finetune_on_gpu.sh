#!/usr/bin/env bash
# The fine-tune stage on a CUDA machine that has torch but no network and no model hub (the device
# machines this project is lent): wheels for what the image lacks travel in .whl/ (fetch them with
# `pip download --python-version 3.12 --only-binary=:all: --no-deps -d .whl ...`, see docs); the base
# models are randomly initialised SmolLM2-135M- and Qwen2.5-1.5B-shaped models with SmolLM2's real
# tokenizer (the weights are too large to carry), so the seconds per step are real and the losses are
# not. Then the `gpu` tests.
#   bash benchmarks/gpu/finetune_on_gpu.sh   (OUT=... collects the reports)
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
python3 - <<'PY'
import shutil, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
shapes = {
    "smollm2-135m": (LlamaForCausalLM, LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    # Qwen2.5-1.5B's shape with SmolLM2's vocabulary (the tokenizer that travels with the tests)
    "qwen2.5-1.5b": (Qwen2ForCausalLM, Qwen2Config(
        vocab_size=49152, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
}
for name, (cls, config) in shapes.items():
    out = Path("/tmp/shapes") / name
    torch.manual_seed(0)
    cls(config).save_pretrained(str(out))
    for f in Path("tests/fixtures/smollm2_tokenizer").iterdir():
        shutil.copy(f, out / f.name)
print(torch.__version__, torch.cuda.get_device_name(0))
PY
for shape in smollm2-135m qwen2.5-1.5b; do
  printf 'model: {base: /tmp/shapes/%s}\ntrain: {device: cuda, max_steps: %s, control_examples: 16}\n' \
    "$shape" "${STEPS:-160}" > "/tmp/$shape.yaml"
  python3 -m toolkit.cli build -c "/tmp/$shape.yaml" --workspace "/tmp/ws-$shape" --until finetune 2>&1 | tail -n 12
  cp "/tmp/ws-$shape/report.json" "$OUT/report-$shape.json" || true
  python3 - "$shape" <<'PY'
import json, sys
r = json.load(open(f"/tmp/ws-{sys.argv[1]}/report.json"))
for s in r["stages"]:
    if s["name"] == "finetune":
        m = s["metrics"]
        print("GPU finetune", sys.argv[1], {k: m.get(k) for k in ("device", "precision", "steps", "s_per_step",
              "train_s", "frozen_prefix_layers", "train_examples", "batch_size")}, "stage", s.get("duration_s"), "s")
PY
done
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit 2>&1 | tail -n 5
