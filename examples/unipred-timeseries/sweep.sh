#!/bin/bash
# The README's measurement: for each seed, NEPA pretraining, then fine-tuning from scratch and
# from the pretrained backbone, and linear probes of a random and of the pretrained backbone;
# then a table of held-out (TEST split) top-1 accuracy after the last epoch.
#   bash sweep.sh jv        # JapaneseVowels       (configs/jv_*.yaml)
#   bash sweep.sh gesture   # PickupGestureWiimoteZ (configs/gesture_*.yaml)
# SEEDS="0 1 2" by default; UNIPRED=path/to/unipred if it is not on PATH. Runs go to runs/NAME/.
set -euo pipefail
cd "$(dirname "$0")"
name=${1:?usage: bash sweep.sh jv|gesture}
U=${UNIPRED:-unipred}
for s in ${SEEDS:-0 1 2}; do
  P=runs/$name/pretrain_s$s/checkpoints/last.ckpt
  [ -f "$P" ] || nice $U fit configs/${name}_pretrain.yaml seed=$s run_dir=runs/$name/pretrain_s$s
  nice $U fit configs/${name}_finetune.yaml seed=$s run_dir=runs/$name/scratch_s$s
  nice $U fit configs/${name}_finetune.yaml seed=$s run_dir=runs/$name/nepa_s$s model.init=pretrain:$P
  nice $U fit configs/${name}_probe.yaml seed=$s run_dir=runs/$name/probe_random_s$s
  nice $U fit configs/${name}_probe.yaml seed=$s run_dir=runs/$name/probe_nepa_s$s model.init=pretrain:$P
done
python3 - "$name" <<'PY'
import csv, glob, re, statistics as st, sys

name = sys.argv[1]
arms = {"scratch": "fine-tune, random init", "nepa": "fine-tune, NEPA init",
        "probe_random": "linear probe, random init", "probe_nepa": "linear probe, NEPA init"}
acc = {}
for arm in arms:
    for path in sorted(glob.glob(f"runs/{name}/{arm}_s*/logs/version_*/metrics.csv")):
        seed = int(re.search(r"_s(\d+)/", path).group(1))
        rows = [r for r in csv.DictReader(open(path)) if r.get("val/acc1")]
        if rows:  # a run still in progress has none yet
            acc.setdefault(arm, {})[seed] = 100 * float(rows[-1]["val/acc1"])
seeds = sorted(set.intersection(*(set(v) for v in acc.values())))
print(f"| {name} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |")
print("|---" * (len(seeds) + 3) + "|")
for arm, label in arms.items():
    v = [acc[arm][s] for s in seeds]
    print(f"| {label} | " + " | ".join(f"{x:.1f}" for x in v)
          + f" | {st.mean(v):.1f} | {st.stdev(v) if len(v) > 1 else 0:.1f} |")
for a, b in (("nepa", "scratch"), ("probe_nepa", "probe_random")):
    d = [acc[a][s] - acc[b][s] for s in seeds]
    print(f"paired {a} - {b}: " + ", ".join(f"{x:+.1f}" for x in d) + f" (mean {st.mean(d):+.1f})")
PY
