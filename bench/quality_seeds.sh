#!/bin/bash
# Several seeds of bench_quality.py at once (made for one GPU; 12 runs at a time), then one report per
# configuration and seed, then bench/results/quality-gpu.md over the seeds. Usage:
#   GLUE_DIR=../shared/glue bash bench/quality_seeds.sh [parallel runs, default 12]
# Configurations: new3 = the trainer's defaults of the time (--method l0, 3 L0 + 3 fixed-mask epochs), new6 = the same with 6 L0
# epochs (the gates reach the target in the L0 phase), old3 = the earlier defaults (--lr 5e-4 --alpha-lr 0.1).
set -u
cd "$(dirname "$0")/.."
P=${1:-12}
GLUE=${GLUE_DIR:-../shared/glue}
WORK=bench/work-seeds
RES=bench/results/gpu
mkdir -p $WORK/logs $RES
args() {  # config name -> dp-epochs and dp-args
  case $1 in
    new3) echo "3|--lr 1e-4 --fixmask-lr 1e-3 --alpha-lr 0.05" ;;
    new6) echo "6|--lr 1e-4 --fixmask-lr 1e-3 --alpha-lr 0.05" ;;
    old3) echo "3|--lr 5e-4 --fixmask-lr 1e-3 --alpha-lr 0.1" ;;
  esac
}
one() {  # seed config task method
  IFS='|' read -r e a <<< "$(args $2)"
  OMP_NUM_THREADS=1 python bench/bench_quality.py --tasks $3 --methods $4 --seed $1 --epochs 3 --dp-epochs $e \
    --dp-fixmask-epochs 3 --dp-args "$a" --full-lr 5e-5,1e-4 --lora-lr 1e-3 --work-dir $WORK --data-dir $GLUE \
    --no-report > $WORK/logs/$1-$2-$3-$4.log 2>&1
  echo "done $* rc=$?"
}
export -f one args; export WORK GLUE
{
  for s in 42 43 44; do for t in rte mrpc stsb cola; do echo "$s new3 $t full"; echo "$s new3 $t diffprune"; done; done
  for s in 42 43 44; do for t in rte mrpc stsb cola; do echo "$s old3 $t diffprune"; echo "$s new3 $t lora"; done; done
  for s in 42 43 44; do for t in rte mrpc stsb cola; do echo "$s new6 $t diffprune"; done; done
} | xargs -P "$P" -L 1 bash -c 'one "$@"' _
for c in new3 old3 new6; do
  IFS='|' read -r e a <<< "$(args $c)"
  for s in 42 43 44; do
    common=(--seed $s --epochs 3 --dp-epochs $e --dp-fixmask-epochs 3 --full-lr 5e-5,1e-4 --lora-lr 1e-3
            --work-dir $WORK --data-dir $GLUE --dp-args "$a")
    python bench/bench_quality.py "${common[@]}" --methods diffprune-matched --no-report > $WORK/logs/matched-$c-$s.log 2>&1
    python bench/bench_quality.py "${common[@]}" --report-only --label gpu-$c-s$s --results-dir $RES > /dev/null
  done
done
python bench/summarize_quality.py $RES/quality-gpu-*.json --title "# Quality over three seeds (GPU)" \
  --preamble bench/results/quality_gpu_notes.md --out bench/results/quality-gpu.md
