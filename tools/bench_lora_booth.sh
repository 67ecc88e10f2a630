#!/usr/bin/env bash
# tools/bench_lora_booth.sh MODEL RES STEPS OUTDIR: one lora-booth run, measured like the diffusers
# reference by the benchmark harness in $BENCH (a folder with bench/run_command.sh and reference/; see
# its README, section 4). Every setting of its table "Settings both trainers must match" is set below,
# prior.mode included: the reference draws class images, so the comparison row pins prior.mode=images
# (the demo preset's own choice, prediction, draws none and is measured as a row of its own with
# LORA_BOOTH_PRIOR_MODE=prediction). Differences by design, to state next to the numbers: latents and
# prompt embeddings are cached (less work per step), and in e2e mode class images are drawn with
# DPM-Solver++ in 25 steps at the training resolution (the reference: DDPM, 50 steps, the model's size).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${BENCH:?set BENCH to the benchmark harness folder (bench/run_command.sh, reference/)}"
PRIOR_MODE="${LORA_BOOTH_PRIOR_MODE:-images}"
PY="${LORA_BOOTH_PYTHON:-$ROOT/.venv/bin/python}"
MATCH=(
  num_class_images=@NUM_CLASS_IMAGES@ prior.weight=1.0 prior.mode=$PRIOR_MODE lr=1e-4 optim.schedule=constant optim.warmup_steps=0
  optim.optimizer=adamw optim.weight_decay=1e-2 optim.max_grad_norm=1.0 train.batch_size=1 train.grad_accum=1
  train.mixed_precision=no lora.text_encoder=false train.gradient_checkpointing=false data.flip=false
  save.checkpoint_every=0 sample.num=0 alpha=4 lora.dropout=0 train.device=cpu
)
cd "$ROOT"
exec "$BENCH/bench/run_command.sh" lora-booth "$1" "$2" "$3" "$4" --probe -- \
  "$PY" -m lora_booth train preset="${LORA_BOOTH_PRESET:-tiny}" \
    model=@MODEL_DIR@ instance_dir=@INSTANCE_DIR@ instance_prompt="a photo of sks dog" \
    class_dir=@CLASS_DIR@ class_prompt="a photo of dog" output_dir=@LORA_DIR@ \
    resolution=@RES@ max_steps=@STEPS@ rank=4 seed=0 prior.sample_steps=25 "${MATCH[@]}"
