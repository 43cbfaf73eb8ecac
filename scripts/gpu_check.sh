#!/usr/bin/env bash
# One-call GPU check (issue 9), for whoever holds a CUDA machine: run it in the repository
# root, with torch installed, and the folder for the results as the only argument:
#
#   scripts/gpu_check.sh "$OUT"
#
# It measures the batched linear engine on the GPU (benchmarks/bench_engine.py --device cuda)
# and runs one full paper-scale setting end to end on the GPU (P = 1000 ScatterNet + linear
# instances, MNIST, sigma = 2: features, training, all certificates, report), then keeps the
# small results (<= 8 files: the device tool returns no more). Needs data/mnist (the IDX
# files, .gz is fine) and the wheels the machine lacks in .whl/: dp-accounting==0.6.0, dm-tree
# and kymatio==0.3.0 (pure Python; its declared appdirs/configparser are never imported), by
# the download command of ../shared/DEVICE.md.
# DEVICE=cpu INSTANCES=4 PYTHON=.venv/bin/python scripts/gpu_check.sh /tmp/x: a dry run here.
set -euo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
device=${DEVICE:-cuda}
instances=${INSTANCES:-1000}
python=${PYTHON:-python3}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --target .site .whl/*.whl
fi
export PYTHONPATH="src:.site${PYTHONPATH:+:$PYTHONPATH}"
export DPCERT_CACHE="$out/cache"
work="$out/work"

{
    nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || true
    "$python" benchmarks/bench_engine.py --device "$device" --threads "$(nproc)" --steps 200 \
        --instances "$instances" --reference-instances 2
} > "$out/bench_engine.txt" 2>&1

start=$(date +%s)
"$python" -m dpcert.cli run configs/mnist_sigma3_best.yaml --noise-multiplier 2 \
    --instances "$instances" --device "$device" --batch-instances "$instances" \
    --output "$work" --quiet > "$out/run_report.txt" 2>&1
end=$(date +%s)
printf '{"device": "%s", "instances": %s, "run_seconds": %s}\n' \
    "$device" "$instances" "$((end - start))" > "$out/timings.json"

for f in votes.npy labels.npy certificates.csv report.md mechanism.json; do
    cp "$work/$f" "$out/$f"
done
rm -rf "$work" "$DPCERT_CACHE"
echo "gpu check done: $out"
