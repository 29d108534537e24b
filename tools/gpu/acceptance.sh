#!/usr/bin/env bash
# On the GPU check machine (no package registry reachable): install the wheelhouse carried in .whl/
# offline into a --target directory, put it and the checkout on PYTHONPATH, run the acceptance.
#
#   bash tools/gpu/acceptance.sh RESULTS_DIR [acceptance.py options, e.g. --only bench_step,plan]
#
# PYTHON (default python3) is the image's interpreter; SITE (default /tmp/site) the install target.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
[ $# -ge 1 ] || { echo "usage: tools/gpu/acceptance.sh RESULTS_DIR [acceptance.py options]" >&2; exit 2; }
RESULTS=$1
shift
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}

shopt -s nullglob
wheels=(.whl/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "error: no wheels in .whl/; build them with tools/gpu/build_wheelhouse.sh and carry .whl" >&2; exit 2; }
t0=$(date +%s)
# --no-deps: the wheelhouse is exactly what the image lacks; everything else comes from the image.
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || { echo "error: installing the wheelhouse into $SITE failed" >&2; exit 2; }
echo "[acceptance.sh] installed ${#wheels[@]} wheels into $SITE in $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PYTHON" tools/gpu/acceptance.py "$RESULTS" "$@"
