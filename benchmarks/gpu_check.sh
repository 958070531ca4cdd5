#!/usr/bin/env bash
# The GPU path measured in one table, in at most 8 minutes on one GPU (benchmarks/gpu_check.py says what it
# measures). Run from anywhere:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine: the table in $OUT (or runs/gpu_check)
#   bash benchmarks/gpu_check.sh --smoke    # the same code on a CPU with tiny settings (~1 minute; the test suite)
#
# The GPU machine has python3 with torch, timm, pandas, scipy and peft but no package registry. What fedsens
# needs beyond those and is pure Python comes as wheels in benchmarks/wheels (benchmarks/wheels/README.md);
# whatever is still missing (scikit-learn, matplotlib, medmnist: compiled or large) is reported, and the parts
# that need it are skipped or use stand-ins. fedsens itself is installed editable without its dependencies;
# if that fails, it is imported from the checkout (PYTHONPATH). Options: --smoke, --no-install, and the
# driver's own (--budget SECONDS, --only PART); PYTHON picks the interpreter (default python3).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
INSTALL=1
SMOKE=0
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --no-install) INSTALL=0 ;;
        --smoke) SMOKE=1; ARGS+=("$arg") ;;
        *) ARGS+=("$arg") ;;
    esac
done
cd "$REPO" || exit 1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# module name -> the wheel's project name, for what fedsens imports that such a machine may lack
declare -A PROJECT=([typer]=typer [click]=click [rich]=rich [tqdm]=tqdm [pytest]=pytest)
absent() {  # the modules named that this python cannot import, in one interpreter start
    "$PYTHON" -c 'import importlib.util, sys; print(*(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}

"$PYTHON" -c "import torch, timm, pandas" || { echo "gpu_check: needs python with torch, timm and pandas" >&2; exit 2; }
MISSING="$(absent "${!PROJECT[@]}")"
if [ -n "$MISSING" ] && [ "$INSTALL" = 1 ]; then
    wanted=()
    for module in $MISSING; do wanted+=("${PROJECT[$module]}"); done
    echo "gpu_check: installing from benchmarks/wheels: ${wanted[*]}"
    "$PYTHON" -m pip install --quiet --no-index --find-links "$HERE/wheels" "${wanted[@]}" \
        || echo "gpu_check: could not install ${wanted[*]} from benchmarks/wheels"
    MISSING="$(absent "${!PROJECT[@]}")"
fi
[ -n "$MISSING" ] && echo "gpu_check: still missing: $MISSING (the parts that need them are skipped)"
OTHERS="$(absent sklearn matplotlib seaborn medmnist scipy yaml)"
[ -n "$OTHERS" ] && echo "gpu_check: not installed (not carried: compiled or large): $OTHERS"

# fedsens itself: not with --smoke (the test suite's environment is not to be changed by a test)
if [ "$INSTALL" = 1 ] && [ "$SMOKE" = 0 ] && ! (cd / && PYTHONPATH= "$PYTHON" -c "import fedsens" 2>/dev/null); then
    "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e "$REPO" \
        || echo "gpu_check: the editable install failed; fedsens is imported from $REPO"
fi

exec "$PYTHON" "$HERE/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}
