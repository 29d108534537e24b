#!/usr/bin/env bash
# The CPU rehearsal of the GPU acceptance, and the check that it is ready: from the repository as
# committed (HEAD, not the working tree), build the wheelhouse, make a Python 3.12 venv holding what
# the GPU image holds (tools/gpu/gpu_image_requirements.txt: torch 2.11 + cu130 and the rest, none
# of what the wheelhouse brings), install the wheelhouse into it offline exactly as
# tools/gpu/acceptance.sh does on the GPU machine, and run tools/gpu/acceptance.py --cpu end to end.
# Exit status non-zero if any stage failed.
#
#   tools/gpu/rehearse.sh [WORKDIR]       (default /tmp/mae_scale_rehearsal; results in WORKDIR/results)
#
# The venv (5 GB: torch's CUDA libraries) is kept in WORKDIR and reused while the requirements file
# is unchanged; delete WORKDIR/venv for a cold run. PY312 overrides the Python 3.12 interpreter.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mkdir -p "${1:-/tmp/mae_scale_rehearsal}" && cd "${1:-/tmp/mae_scale_rehearsal}" && pwd)
PY312=${PY312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3}
die() { echo "error: $*" >&2; exit 1; }
t0=$(date +%s)
stamp() { echo "[rehearse] $(( $(date +%s) - t0 )) s: $*"; }

[ -x "$PY312" ] || die "no Python 3.12 at $PY312 (set PY312)"
git -C "$SRC" rev-parse --verify -q HEAD >/dev/null || die "$SRC is not a git checkout with a commit"

# 1. The repository as committed: what a session would carry to the GPU machine once committed.
rm -rf "$WORK/repo" "$WORK/site" "$WORK/results" "$WORK/accept"
mkdir -p "$WORK/repo"
git -C "$SRC" archive HEAD | tar -x -C "$WORK/repo"
stamp "HEAD $(git -C "$SRC" rev-parse --short HEAD) in $WORK/repo"

# 2. The GPU image's Python world, minus the GPU.
VENV=$WORK/venv
REQ=$WORK/repo/tools/gpu/gpu_image_requirements.txt
if ! cmp -s "$REQ" "$VENV/.gpu_image_requirements.txt" 2>/dev/null; then
    rm -rf "$VENV"
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    cp "$REQ" "$VENV/.gpu_image_requirements.txt"
    stamp "venv made"
else
    stamp "venv reused ($VENV)"
fi
for missing in deepspeed pydantic pydantic_core annotated_types typing_inspection hjson webdataset braceexpand \
               submitit mlflow; do
    if "$VENV/bin/python" -c "import $missing" 2>/dev/null; then
        die "$missing is importable in $VENV, but the GPU image lacks it: the rehearsal would prove nothing"
    fi
done

# 3. The wheelhouse, built by the committed script (the venv's torch is the one DeepSpeed's setup sees).
PYTHON=$VENV/bin/python "$WORK/repo/tools/gpu/build_wheelhouse.sh" "$WORK/repo/.whl"
stamp "wheelhouse built"

# 4. The acceptance, started the way a GPU session starts it (python3 = the image's interpreter).
cd "$WORK/repo"
set +e
PATH=$VENV/bin:$PATH SITE=$WORK/site bash tools/gpu/acceptance.sh "$WORK/results" --cpu --work-dir "$WORK/accept"
rc=$?
set -e
stamp "acceptance --cpu exited $rc; report: $WORK/results/gpu_report.md"
ls -l "$WORK/results"
exit $rc
