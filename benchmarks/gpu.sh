#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md's "One call" tables in one device call of <= 9 minutes.
#
#   bash benchmarks/gpu.sh [--tiny] [--out DIR] [--budget SECONDS] [--only REGEX]
#
# Run from the repository root. It installs the carried wheels in .whl/ when gptjax's imports
# fail (the GPU image lacks gin-config), prints the GPU, then runs one configuration per step,
# most important first, each with a time-out cut to what is left of --budget (default 510 s),
# so a slow compile costs the steps after it, never the table: GPT-2 124M training at batch
# 16/24/32 (unrolled, then scan; cuDNN attention), GPT-2 XL (1.5B) training, decode at batch 1
# and 64. A step that no longer fits is recorded as skipped. Writes to DIR (default $OUT):
# train.jsonl, sample.jsonl (one JSON line per step), rows.md (the RESULTS.md rows, from
# benchmarks/results_table.py; also printed last) and log.txt.
#
# --tiny: the same steps with the 2-layer model of the scripts' own --tiny on any device
# (batches / 8, 2 timed steps): a smoke test for CPU. --only: run only the steps whose name
# matches (bash regex), e.g. after a time-out: --only 'scan|decode-b64'.
set -uo pipefail

command="bash benchmarks/gpu.sh${*:+ $*}"
tiny="" out="${OUT:-/tmp/gptjax-gpu-bench}" budget=510 only=""
while (($#)); do
  case $1 in
    --tiny) tiny="--tiny" ;;
    --out) out=$2; shift ;;
    --budget) budget=$2; shift ;;
    --only) only=$2; shift ;;
    *)
      echo "gpu.sh: unknown argument '$1' (--tiny, --out DIR, --budget S, --only REGEX)" >&2
      exit 2
      ;;
  esac
  shift
done
[[ -f benchmarks/gpu.sh ]] || { echo "gpu.sh: run it from the repository root" >&2; exit 2; }

py=${PYTHON:-python3}
site=${SITE:-/tmp/site} # where carried wheels are installed
reserve=15 # seconds kept for the table at the end
min_step=20 # a step given less than this is skipped: a GPU compile alone takes longer
mkdir -p "$out" && rm -f "$out"/{train.jsonl,sample.jsonl,rows.md,log.txt}
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Each step is its own process, so the 1.5B model may use nearly all of an 80 GB card.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

imports_ok() { "$py" -c "import gptjax.training.step, gptjax.inference.sampling" 2>&1; }
if ! err=$(imports_ok); then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "# gptjax imports failed ($(tail -1 <<<"$err")): installing .whl/*.whl into $site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site:$PYTHONPATH"
  fi
  err=$(imports_ok) || { echo "gpu.sh: gptjax does not import: $(tail -1 <<<"$err")"; exit 1; }
fi

hbm=3.0 # TB/s for the decode roofline: H100 SXM as measured; H200 copies at ~4.3 (KINDS.md)
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && hbm=4.3
fi

timeout_for() { # the step's cap cut to the budget left, or nothing when below min_step
  local left=$((budget - SECONDS - reserve))
  local t=$(($1 < left ? $1 : left))
  ((t >= min_step)) && echo "$t"
}

record() { # FILE MODEL BATCH LAYERS ATTENTION ERROR: a row for a step that left none
  local fields='"model": "%s", "batch_size": %d, "layers": "%s", "attention": "%s"'
  printf "{$fields, \"remat\": \"none\", \"error\": \"%s\"}\n" "$2" "$3" "$4" "$5" "$6" >>"$1"
}

run_step() { # NAME CAP FILE MODEL BATCH LAYERS ATTENTION -- COMMAND ({T}: 5 s under the time-out)
  local name=$1 cap=$2 file=$3 model=$4 batch=$5 layers=$6 attention=$7 t rc before msg a
  shift 8
  [[ -z $only || $name =~ $only ]] || return 0
  if ! t=$(timeout_for "$cap"); then
    echo "## $name: skipped, $((budget - SECONDS))s of the budget left"
    record "$file" "$model" "$batch" "$layers" "$attention" "skipped (budget)"
    return 0
  fi
  echo "## $name: time-out ${t}s, $((budget - SECONDS))s of the budget left"
  local cmd=()
  for a in "$@"; do cmd+=("${a//\{T\}/$((t - 5))}"); done # train's own time-out fires first
  before=$(lines "$file")
  timeout -k 5 "$t" "${cmd[@]}"
  rc=$?
  if (($(lines "$file") == before)); then # it died before writing its row
    ((rc == 124 || rc == 137)) && msg="timeout after ${t}s" || msg="exit $rc"
    record "$file" "$model" "$batch" "$layers" "$attention" "$msg"
  fi
}
lines() { if [[ -f $1 ]]; then wc -l <"$1"; else echo 0; fi; }

attention=cudnn # for training; fused if the first step shows cuDNN failing
train() { # NAME CAP MODEL BATCH LAYERS [EXTRA FLAGS]
  local name=$1 cap=$2 model=$3 batch=$4 layers=$5 attention=$attention
  shift 5
  if [[ -n $tiny ]]; then
    model=tiny batch=$((batch > 8 ? batch / 8 : 1)) attention=xla
    set -- "$@" --steps=2
  fi
  run_step "$name" "$cap" "$out/train.jsonl" "$model" "$batch" "$layers" "$attention" -- \
    "$py" benchmarks/train_throughput.py $tiny --models="$model" --batch_sizes="$batch" \
    --layers="$layers" --attention="$attention" --results="$out/train.jsonl" "$@" --timeout={T}
}

decode() { # NAME CAP BATCH LAYERS
  local name=$1 cap=$2 model=gpt2_small batch=$3 layers=$4
  [[ -n $tiny ]] && { model=tiny batch=$((batch < 8 ? batch : 8)); }
  run_step "$name" "$cap" "$out/sample.jsonl" "$model" "$batch" "$layers" xla -- \
    "$py" benchmarks/sample_throughput.py $tiny --models=gpt2_small \
    --batch_sizes="$batch" --layers="$layers" --hbm_tb_s=$hbm --results="$out/sample.jsonl"
}

# name                        cap  model       batch layers
train small-b16-unrolled      150  gpt2_small  16    unrolled
failed() { # did the last step of FILE fail otherwise than by OOM, time-out or budget?
  tail -1 "$1" | "$py" -c 'import json, sys; e = json.load(sys.stdin).get("error", "")
sys.exit(not e or e == "OOM" or e.startswith(("timeout", "skipped")))'
}
if [[ -z $tiny && -s $out/train.jsonl ]] && failed "$out/train.jsonl"; then
  echo "## the first step failed with cuDNN attention: the later training steps use 'fused'"
  attention=fused
fi
decode decode-b1-scan         90               1     scan
decode decode-b64-scan        90               64    scan
train small-b24-unrolled      120  gpt2_small  24    unrolled
train small-b32-unrolled      120  gpt2_small  32    unrolled
# 1.5B: scan (a 48-layer unrolled compile takes minutes), few timed steps (~0.2 s each).
train xl-b8-scan              200  gpt2_xl     8     scan --warmup=2 --steps=5 --repeats=2
train small-b16-scan          90   gpt2_small  16    scan
train small-b24-scan          90   gpt2_small  24    scan
train small-b32-scan          90   gpt2_small  32    scan
decode decode-b1-unrolled     90               1     unrolled
decode decode-b64-unrolled    90               64    unrolled

echo "## done in ${SECONDS}s; rows for benchmarks/RESULTS.md ($out/rows.md):"
"$py" benchmarks/results_table.py --train "$out/train.jsonl" --sample "$out/sample.jsonl" \
  --command "$command" >"$out/rows.md"
cat "$out/rows.md"
