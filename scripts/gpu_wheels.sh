#!/usr/bin/env bash
# The Python wheels benchmarks/gpu_run.py needs on a lent GPU machine (Python 3.12, x86-64, the CUDA 13
# libraries, no internet), downloaded here into the ignored folder .whl/, and whether they fit in what
# one run carries (64 MiB: the working tree, the carried models and the wheels together).
#
#   scripts/gpu_wheels.sh                    # serving wheels + onnxruntime-gpu 1.29.0, the smallest CUDA 13 build
#   ORT_VERSIONS="1.31.1 1.30.0" scripts/gpu_wheels.sh   # try several onnxruntime-gpu versions, keep the smallest CUDA 13 one
#
# The serving packages are pinned to the versions installed where this runs (PYTHON, default
# python3), the ones the tests pass with. The machine already has numpy, pillow, protobuf, grpcio,
# prometheus-client, anyio, h11, click, uvloop and onnxruntime (CPU only), so those stay behind.
# onnxruntime-gpu is downloaded into .whl-ort/ and moved into .whl/ only when everything fits.
# Exit status: 0 when it fits, 3 when it does not (the reason is printed), else pip's.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
ORT_VERSIONS=${ORT_VERSIONS:-1.29.0}
MODELS=${MODELS:-runs/gpu-models/models}
LIMIT=$((64 * 1024 * 1024))
SERVING=(fastapi starlette uvicorn httptools pydantic pydantic-core annotated-types typing-inspection
         typing-extensions pydantic-settings python-dotenv python-multipart)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

download() {  # download FOLDER REQUIREMENT...
    local folder=$1
    shift
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$folder" "$@" 2>&1 | grep -v 'is ignored' >&2 || true
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
bytes_of() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }

pins=()
for name in "${SERVING[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
    pins+=("$name${version:+==$version}")
done
rm -rf .whl .whl-ort
mkdir -p .whl .whl-ort
download .whl "${pins[@]}"
for name in "${SERVING[@]}"; do
    pattern=$(echo "$name" | tr '-' '_')
    ls .whl | grep -qi "^${pattern}-" || { echo "no wheel for $name in .whl/" >&2; exit 1; }
done

# onnxruntime-gpu: only builds against CUDA 13 load on that machine (1.25 and older are CUDA 12 builds).
best="" best_size=0
for version in $ORT_VERSIONS; do
    mkdir -p ".whl-ort/$version"
    download ".whl-ort/$version" "onnxruntime-gpu==$version"
    wheel=$(ls ".whl-ort/$version"/*.whl 2>/dev/null | head -1)
    [ -n "$wheel" ] || { echo "onnxruntime-gpu $version: no wheel for Python 3.12 on x86-64"; continue; }
    size=$(bytes_of "$wheel")
    cuda=$(unzip -p "$wheel" '*/METADATA' | grep -o 'nvidia-cuda-runtime[^;]*' | head -1)
    echo "onnxruntime-gpu $version: $(mib "$size") MiB ($size bytes), needs ${cuda:-no CUDA runtime named}"
    case "$cuda" in
        *"~=13"*) if [ -z "$best" ] || [ "$size" -lt "$best_size" ]; then best=$wheel best_size=$size; fi ;;
    esac
done
[ -n "$best" ] || { echo "none of onnxruntime-gpu $ORT_VERSIONS is a CUDA 13 build"; exit 1; }

tree=0
while IFS= read -r -d '' file; do
    [ -f "$file" ] && tree=$((tree + $(stat -c %s "$file")))
done < <(git ls-files -z --cached --others --exclude-standard)
serving=$(bytes_of .whl)
models=$(bytes_of "$MODELS")
total=$((tree + models + serving + best_size))
echo
echo "what one run carries, of at most $(mib $LIMIT) MiB:"
echo "  working tree (tracked and untracked, not ignored)  $(mib $tree) MiB"
echo "  models ($MODELS)  $(mib "$models") MiB"
echo "  serving wheels (.whl/: ${#SERVING[@]} packages)  $(mib "$serving") MiB"
echo "  $(basename "$best")  $(mib "$best_size") MiB"
echo "  together  $(mib $total) MiB"
if [ "$total" -le "$LIMIT" ]; then
    mv "$best" .whl/
    rm -rf .whl-ort
    echo "fits: carry .whl and $MODELS"
    exit 0
fi
echo "DOES NOT FIT: onnxruntime-gpu alone is $(mib "$best_size") MiB against the $(mib $LIMIT) MiB a run carries;"
echo "the run on CUDA is blocked by it (the serving wheels in .whl/ fit; onnxruntime-gpu stays in .whl-ort/)."
exit 3
