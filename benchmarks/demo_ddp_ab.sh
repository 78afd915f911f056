#!/bin/bash
# The image demo's pretraining as 1 process x 1 thread (global batch 128) and as 2 DDP
# processes x 1 thread (gloo, 64 each), alternating, each at N1 and N2 steps: the CPU seconds
# of (N2 - N1) steps are the difference of the two runs (start-up cancels). /usr/bin/time
# sees the launched process only: under `unipred fit trainer.devices=2` that is rank 0 (its
# Lightning launcher does not wait for rank 1), so the DDP figure is ONE rank's CPU, which on
# an idle 2-core machine is the step's wall time (each rank has a core).
# Usage, from the repo root: bash benchmarks/demo_ddp_ab.sh [N1=20] [N2=120] [ROUNDS=2] \
#   [LAYOUTS="one ddp"]   (one64: 1 process x 1 thread at a global batch of 64; ddp1: DDP with
#   one rank, batch 64: the DDP wrapper without a peer)
# Prints one line per run; logs in runs/ab2_*.log.
N1=${1:-20}; N2=${2:-120}; R=${3:-2}; LAYOUTS=${4:-one ddp}
export PYTHONSAFEPATH=1 OMP_NUM_THREADS=1
mkdir -p runs
for r in $(seq "$R"); do
  for lay in $LAYOUTS; do
    for n in $N1 $N2; do
      case $lay in
        one) ov="trainer.threads=1" ;;
        one64) ov="trainer.threads=1 trainer.global_batch=64" ;;
        ddp1) ov="trainer.devices=1 trainer.strategy=ddp trainer.threads=1 trainer.global_batch=64" ;;
        ddp) ov="trainer.devices=2 trainer.strategy=ddp trainer.threads=1" ;;
        *) echo "unknown layout $lay (one one64 ddp1 ddp)"; exit 2 ;;
      esac
      l0=$(cut -d' ' -f1 /proc/loadavg)
      # shellcheck disable=SC2086
      /usr/bin/time -f "$lay round $r steps $n: wall %e s user %U s sys %S s" \
        .venv/bin/python -m unipred.cli fit configs/demo/fmnist_pretrain.yaml \
        run_dir=runs/ab2_$lay trainer.max_steps="$n" trainer.progress_bar=false \
        trainer.threads_check_s=0 $ov > "runs/ab2_${lay}_${r}_$n.log" 2>&1
      echo "$(tail -1 "runs/ab2_${lay}_${r}_$n.log") load $l0 -> $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
