#!/usr/bin/env bash
# Fetch, on this machine, the wheels that scripts/gpu_check.sh needs on a lent GPU machine and does
# not find there (it has no package registry): msgspec, pyzmq, setproctitle and xgrammar for CPython
# 3.12 on x86-64 Linux, into ./.whl (ignored by git). Then hand `.whl` to the device tool's `carry`;
# gpu_check.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
fetch() {  # directory, packages...
    local dir=$1; shift
    mkdir -p "$dir"
    for pkg in "$@"; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_26_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64 --platform any -d "$dir" "$pkg"
    done
}
# xgrammar (structured outputs; its GPU test) and its FFI runtime; pydantic, which it imports, only
# where the machine has none (.whl/ifmissing: gpu_check.sh installs those if `import pydantic` fails)
fetch .whl msgspec pyzmq setproctitle xgrammar apache-tvm-ffi
fetch .whl/ifmissing pydantic pydantic-core annotated-types typing-inspection
ls -lR .whl
du -sh .whl
