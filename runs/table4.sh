#!/usr/bin/env bash
# The paper's Table 4 ablations on ReDial at this scale, the generative recommender alone, one seed per variant:
#   bash runs/table4.sh [SEED] [RAW]              every variant at the recipe's 3,000 steps (8 runs of runs/redial.sh's size)
#   STEPS=1000 bash runs/table4.sh [SEED] [RAW]   the scale of docs/results.md: every variant, 3x64 full included, at 1,000
# Training targets (train.py --target): full (runs/redial.sh's model itself), sid (no response supervised),
# mode-resp (no item slot), resp (a plain LM on the dialogs, its item read from the first <BOI> it writes).
# SID shapes (data_prep.py --levels L --codebook-size K): 3x64 is the recipe's, then 4x64 (the paper's), 5x64,
# 4x32, 4x128. The embedding ablation (train.py --embed-train all) needs a pretrained backbone (--init-from, a GPU).
# ONLY="sid-4x64 target-resp ..." runs just those variants (two shells, two lanes); the table prints whatever is done.
# Each variant: val and test evals beside its checkpoint in out/t4-VARIANT-sSEED; then one line per variant.
set -euo pipefail
SEED=${1:-0}; RAW=${2:-../shared/data/redial}; THREADS=${THREADS:-2}; STEPS=${STEPS:-3000}; ONLY=${ONLY:-}
TRAIN=(--seed $SEED --threads $THREADS --item-loss-weight 5 --block-size 512 --batch-size 16 --max-steps $STEPS
       --warmup 40 --dropout 0.1 --eval-interval 500 --save-interval 500)
chosen() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
variant() {  # NAME DATA [train.py flags...]
    local name=$1 data=$2; shift 2
    local out=out/t4-$name-s$SEED  # the run's folder names its steps unless they are the recipe's
    [ "$STEPS" = 3000 ] || out=$out-$STEPS
    chosen $name || return 0
    [ -f $out/eval_test.json ] && return 0
    python train.py --data $data --out $out "${TRAIN[@]}" "$@"
    python sample.py --ckpt $out --eval val --calibrate --threads $THREADS --max-gen 0 --json $out/eval_val.json \
        --rankings $out/rankings_val.jsonl
    python sample.py --ckpt $out --eval test --threads $THREADS --max-gen 0 --json $out/eval_test.json --rankings $out/rankings_test.jsonl
}
mkdir -p out  # 3x64 with the full target is runs/redial.sh's own model: reuse it when that run is there
if [ "$STEPS" = 3000 ] && [ ! -e out/t4-sid-3x64-s$SEED ] && [ -f out/redial-s$SEED/eval_test.json ]; then ln -s redial-s$SEED out/t4-sid-3x64-s$SEED; fi
for shape in 3x64 4x64 5x64 4x32 4x128; do
    L=${shape%x*}; K=${shape#*x}; DATA=data/redial-$shape
    [ "$shape" = 3x64 ] && DATA=data/redial  # the recipe's own data
    chosen sid-$shape || continue
    [ -f $DATA/sids.json ] || python data_prep.py --dataset redial --raw "$RAW" --out $DATA \
        --encoder minilm --levels $L --codebook-size $K --item-features text+cooc
    variant sid-$shape $DATA
done
for target in sid mode-resp resp; do
    variant target-$target data/redial --target $target
done
python - "$SEED" "$STEPS" <<'PY'
import json, os, sys
import numpy as np
sys.path.insert(0, "runs")
from table import paired_interval
seed, steps = sys.argv[1], sys.argv[2]
tail = "" if steps == "3000" else f"-{steps}"
names = [f"sid-{s}" for s in ("3x64", "4x64", "5x64", "4x32", "4x128")] + [f"target-{t}" for t in ("sid", "mode-resp", "resp")]
print("| variant | val R@1 | val R@10 | test R@1 | test R@10 | test NDCG@10 | test fresh R@10 | test PPL |")
print("|---|---|---|---|---|---|---|---|")
for n in names:
    ev = {}
    for split in ("val", "test"):
        p = f"out/t4-{n}-s{seed}{tail}/eval_{split}.json"
        ev[split] = json.load(open(p)) if os.path.isfile(p) else None
    if not ev["test"]:
        continue
    v, t = ev["val"]["model"], ev["test"]
    ppl = t["dialog"]["perplexity"]
    print(f"| {n} | {v['recall@1']:.4f} | {v['recall@10']:.4f} | {t['model']['recall@1']:.4f} | {t['model']['recall@10']:.4f} | "
          f"{t['model']['ndcg@10']:.4f} | {t['fresh']['model']['recall@10']:.4f} | {'–' if ppl is None else f'{ppl:.2f}'} |")
def ranks(n):  # the variant's test ranks, per sample, or None
    p = f"out/t4-{n}-s{seed}{tail}/rankings_test.jsonl"
    return [(r["dialog"], r["turn"], r["gold"], r["rank"]) for r in map(json.loads, open(p))] if os.path.isfile(p) else None
print("\ntest R@10, a - b, paired bootstrap 95% interval (the paper's order: the left one ahead):")
pairs = [("sid-3x64", "target-sid"), ("target-sid", "target-mode-resp"), ("target-mode-resp", "target-resp"),
         ("sid-3x64", "target-mode-resp"), ("sid-3x64", "target-resp")] + \
        [(f"sid-{s}", "sid-3x64") for s in ("4x64", "5x64", "4x32", "4x128")] + [("sid-4x64", "sid-5x64")]
for a, b in pairs:
    ra, rb = ranks(a), ranks(b)
    if ra is None or rb is None:
        continue
    assert [x[:3] for x in ra] == [x[:3] for x in rb], f"{a} and {b} scored other samples"
    d, lo, hi = paired_interval(np.array([[x[3] for x in ra]]), np.array([[x[3] for x in rb]]), 10, np.ones(len(ra), bool))
    print(f"{a} - {b}: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]" + ("" if lo > 0 or hi < 0 else "  (a tie)"))
PY
