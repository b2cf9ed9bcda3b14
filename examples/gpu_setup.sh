# Sourced by the GPU checks (examples/gpu_check.sh, examples/gpu_check_video.sh): installs
# the carried wheels (.whl/, from examples/gpu_wheels.sh), turns cudagraph skips into errors,
# records the card, and defines `bench SECONDS NAME ARGS...`: one `fora-fx bench` run under
# its own time limit, writing $OUT/NAME.json (rewritten after every row), $OUT/NAME.log and
# appending its table to $OUT/bench.md.
set -uo pipefail
OUT="${OUT:-/tmp/fora_out}"; mkdir -p "$OUT"
# fora_fx runs from this checkout as it is (it imports with nothing installed).
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${FORA_WHEELS:-.whl}"  # (tests/test_packaging.py sets it)
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$SRC:${PYTHONPATH:-}"
else
  export PYTHONPATH="$SRC:${PYTHONPATH:-}"
fi
export TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, fora_fx; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'fora_fx', fora_fx.__file__)" || exit 1
bench() {  # bench SECONDS NAME ARGS...
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 -m fora_fx.cli bench "$@" --json "$OUT/$name.json" \
    2> >(tee "$OUT/$name.log" >&2) | tee -a "$OUT/bench.md"
}
