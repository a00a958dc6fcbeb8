#!/usr/bin/env bash
# Fetch, on this machine, the wheels that scripts/gpu_check.sh needs on a lent GPU machine and does
# not find there (it has no package registry): msgspec, pyzmq and setproctitle for CPython 3.12 on
# x86-64 Linux, into ./.whl (ignored by git). Then hand `.whl` to the device tool's `carry`;
# gpu_check.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
for pkg in msgspec pyzmq setproctitle; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_26_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64 -d .whl "$pkg"
done
ls -l .whl
du -sh .whl
