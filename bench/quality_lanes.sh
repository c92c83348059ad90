#!/usr/bin/env bash
# Background lanes of the quality-v2 benchmark, trained from a frozen copy of the current commit.
#
#   bench/quality_lanes.sh LANES UNTIL [quality_v2.py options...]
#   bench/quality_lanes.sh 2 15:10                    # 2 lanes; none starts a run it cannot finish by 15:10
#   bench/quality_lanes.sh 2 15:10 --table methods    # the methods table (issue 10)
#
# The lanes run in a git worktree of HEAD (bench/work/tree-<commit>), so edits made here while they train do
# not leak into their runs; each finished run's entry is written to this checkout's tracked store
# (bench/results/{quality,methods}-v2-runs/), where it is valid while the files it imported are unchanged:
# commit the entries as they arrive. One thread per lane (OMP_NUM_THREADS=1): start one lane per core.
# Logs: bench/work/lane-N.log (methods table: lane-methods-N.log, so both tables can run side by side); to add
# lanes beside running ones, LANE_START=3 numbers the new ones from 3 so no live log is truncated. Stop: pkill -f 'bench/quality_v2.py' (a run in flight is lost).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bench/quality_lanes.sh LANES UNTIL(HH:MM) [quality_v2.py options...]" >&2
  exit 2
fi
lanes=$1
until_s=$(date -d "$2" +%s) || { echo "error: UNTIL must be a time such as 15:10" >&2; exit 2; }
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
hours=$("$py" -c "import sys, time; h = ($until_s - time.time()) / 3600; print(f'{h:.2f}') if h > 0 else sys.exit(1)") \
  || { echo "error: $(date -d "@$until_s") has passed" >&2; exit 2; }
table=quality
data=(--data-dir "${GLUE_DIR:-$(cd "$repo/.." && pwd)/shared/glue}")  # the worktree's own ../shared is not there
prev=
for a in "$@"; do  # --table methods or --table=methods; --data-dir DIR or --data-dir=DIR
  { [ "$prev" = --table ] && [ "$a" = methods ]; } || [ "$a" = --table=methods ] && table=methods
  case $a in --data-dir|--data-dir=*) data=() ;; esac
  prev=$a
done
log=lane; [ "$table" = methods ] && log=lane-methods
commit=$(git -C "$repo" rev-parse --short HEAD)
tree=$repo/bench/work/tree-$commit
if [ ! -d "$tree" ]; then
  git -C "$repo" worktree add --detach "$tree" HEAD >/dev/null
fi
start=${LANE_START:-1}
for i in $(seq "$start" $((start + lanes - 1))); do
  (cd "$tree" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nohup "$py" bench/quality_v2.py --no-report --hours "$hours" \
      --store-dir "$repo/bench/results/$table-v2-runs" --work-dir "$repo/bench/work/v2" "${data[@]}" "$@" \
      >"$repo/bench/work/$log-$i.log" 2>&1 &)
  sleep 5  # the lanes claim runs one after another
done
echo "$lanes lane(s) of commit $commit for $hours h; logs: bench/work/$log-*.log; entries: bench/results/$table-v2-runs/"
