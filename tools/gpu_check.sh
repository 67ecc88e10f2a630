#!/usr/bin/env bash
# tools/gpu_check.sh: prepare .gpu-carry/ for tools/gpu_check.py on the lent GPU machine (issue #20)
# and print the one device `run` call that uses it. Run it here, in the checkout, before asking for
# a card: the GPU machine cannot download anything, and it has no diffusers or bitsandbytes.
#
#   tools/gpu_check.sh          # ≈ 10 s with a warm pip cache
#
# .gpu-carry/ (ignored by git; the device call names it in `carry`):
#   wheels/    diffusers and bitsandbytes at the versions of constraints.txt, for CPython 3.12 on
#              x86-64 (the GPU machine's python3), fetched with `pip download --no-deps`
#   reference/ train_dreambooth_lora.py + LICENSE from $BENCH/reference, the benchmark harness (unmodified, Apache-2.0)
#   bench/     launch_timed.py (the bench's per-step timing probe) and shims/ (its torchvision stand-in)
# Everything that travels (tracked and untracked files of the checkout, plus .gpu-carry) must stay
# under 64 MiB; if it would not, bitsandbytes is left out and the 8-bit cases run AdamW instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="$ROOT/.gpu-carry"
BENCH="${BENCH:?set BENCH to the benchmark harness folder (its reference/ and bench/ are copied)}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
LIMIT=$((64 * 1024 * 1024))

pin() {  # the tested version of a package, from constraints.txt
  local version
  version="$(sed -n "s/^$1==\([^ #]*\).*/\1/p" "$ROOT/constraints.txt")"
  [ -n "$version" ] || { echo "gpu_check.sh: no $1 pin in constraints.txt" >&2; exit 1; }
  echo "$version"
}

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/reference" "$CARRY/bench"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$CARRY/wheels" "diffusers==$(pin diffusers)" "bitsandbytes==$(pin bitsandbytes)"

if [ -f "$BENCH/reference/train_dreambooth_lora.py" ]; then
  cp "$BENCH/reference/train_dreambooth_lora.py" "$BENCH/reference/LICENSE" "$CARRY/reference/"
  cp "$BENCH/bench/launch_timed.py" "$CARRY/bench/"
  cp -r "$BENCH/bench/shims" "$CARRY/bench/"
  chmod -R u+w "$CARRY"   # the bench folder is read-only; the copies need not be
else
  echo "gpu_check.sh: no $BENCH/reference: the reference cases will be reported as skipped" >&2
fi

tree_bytes() {  # what the device call sends besides the carried folder
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{ s += $1 } END { print s + 0 }')
}
carry_bytes() { du -sb "$CARRY" | cut -f1; }
if [ $(( $(tree_bytes) + $(carry_bytes) )) -gt "$LIMIT" ]; then
  echo "gpu_check.sh: over 64 MiB with bitsandbytes; leaving it out (the 8-bit cases will run adamw)" >&2
  rm -f "$CARRY"/wheels/bitsandbytes-*.whl
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "prepared $CARRY:"
for wheel in "$CARRY"/wheels/*.whl; do echo "  $(basename "$wheel")  $(mib "$(stat -c %s "$wheel")")"; done
echo "  reference script: $( [ -f "$CARRY/reference/train_dreambooth_lora.py" ] && echo yes || echo no)"
echo "travels: checkout $(mib "$(tree_bytes)") + .gpu-carry $(mib "$(carry_bytes)") (limit 64 MiB)"
cat <<'EOF'

The device call (tools/README.md explains each part):
  command:
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-carry/wheels/*.whl || exit 3; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; nvidia-smi > $OUT/nvidia-smi.txt 2>&1; timeout -k 15 -s INT 440 python3 tools/gpu_check.py --out $OUT 2> $OUT/gpu_check.stderr.txt | tee $OUT/gpu_check.log; rc=$?; tail -n 8 $OUT/gpu_check.stderr.txt; exit $rc
  carry: [".gpu-carry"]
  timeout_s: 480
EOF
