#!/usr/bin/env bash
# Build .gpu/ (git-ignored) for scripts/gpu_check.sh on a lent GPU machine: the wheels that
# machine lacks (for its Python 3.12) and the datasets gzipped, 42 MB in all (a call carries
# at most 64 MiB). Run in the repository root after scripts/fetch_data.sh; then call the
# device tool with carry [".gpu"] and the command `BUDGET=560 bash scripts/gpu_check.sh $OUT`.
set -euo pipefail
if [ -d .git ]; then
    mkdir -p .git/info
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
fi
mkdir -p .gpu/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl dp-accounting==0.6.0 dm-tree opacus==1.6.0 randomgen==2.5.1 \
    safetensors
for d in mnist fashion-mnist; do
    mkdir -p ".gpu/$d"
    for f in data/"$d"/*-ubyte data/"$d"/*-ubyte.gz; do
        [ -e "$f" ] || continue
        case "$f" in
            *.gz) cp "$f" ".gpu/$d/" ;;
            *) gzip -c "$f" > ".gpu/$d/$(basename "$f").gz" ;;
        esac
    done
done
du -sh .gpu
