#!/usr/bin/env bash
# Build the wheelhouse the GPU check machine installs offline: exactly the packages its image lacks
# (the machine reaches no package registry), for CPython 3.12 manylinux x86_64, pinned to
# constraints.txt. mlflow is left out on purpose: with its dependencies it would not fit the 64 MiB
# that travels with the working tree, the project imports it lazily, and the acceptance runs with
# tracking.enabled=false.
#
#   tools/gpu/build_wheelhouse.sh [DIR]        (default DIR: .whl/ at the repository root)
#
# PYTHON (default python3) builds DeepSpeed's wheel: it must import torch and setuptools, because
# DeepSpeed's setup.py imports torch even with every op disabled (DS_BUILD_OPS=0).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${1:-$ROOT/.whl}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=64
CONSTRAINTS=$ROOT/constraints.txt

# What the GPU image lacks. deepspeed is source-only on PyPI (built below), the rest are wheels.
BINARY=(hjson pydantic pydantic_core annotated-types typing-inspection webdataset braceexpand submitit)

die() { echo "error: $*" >&2; exit 1; }

pin() {  # the version constraints.txt pins for a name; pip's name normalisation (-, _, case)
    local want v
    want=$(echo "$1" | tr 'A-Z_.' 'a-z--')
    v=$(awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/, "-", n); if (n == w) {print $2; exit}}' "$CONSTRAINTS")
    [ -n "$v" ] || die "$1 is not pinned in $CONSTRAINTS"
    echo "$v"
}

[ -f "$CONSTRAINTS" ] || die "no constraints.txt at $CONSTRAINTS"
"$PYTHON" -c "import torch, setuptools" 2>/dev/null \
    || die "$PYTHON cannot import torch and setuptools, which DeepSpeed's setup.py needs; set PYTHON to one that can (e.g. the project's .venv/bin/python)"

mkdir -p "$DIR"
# A fresh set: a stale wheel of another version would be installed next to the pinned one.
rm -f "$DIR"/*.whl

for name in "${BINARY[@]}"; do
    version=$(pin "$name")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR" "$name==$version"
done

# DeepSpeed: a pure-Python wheel with no prebuilt op; the ops it needs are compiled just in time on
# the GPU machine (the project uses torch's AdamW, so normally none is). No build isolation, so the
# build sees PYTHON's torch instead of downloading one.
ds=$(pin deepspeed)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$ds" -w "$build" \
    || die "building the deepspeed==$ds wheel failed (see above)"
ls "$build"/deepspeed-"$ds"-py3-none-any.whl >/dev/null 2>&1 \
    || die "deepspeed built as $(ls "$build"), not a pure py3-none-any wheel: it would not install on Python 3.12"
mv "$build"/deepspeed-*.whl "$DIR"/

count=$(ls "$DIR"/*.whl | wc -l)
[ "$count" -eq $(( ${#BINARY[@]} + 1 )) ] || die "expected $(( ${#BINARY[@]} + 1 )) wheels in $DIR, found $count"
bytes=$(cat "$DIR"/*.whl | wc -c)
echo "wheelhouse $DIR: $count wheels, $(( bytes / 1024 )) KiB"
ls -l "$DIR"/*.whl | awk '{printf "  %8d KiB  %s\n", $5 / 1024, $NF}'
[ "$bytes" -le $(( LIMIT_MIB * 1024 * 1024 )) ] || die "wheelhouse is $(( bytes / 1048576 )) MiB, over the $LIMIT_MIB MiB limit"
