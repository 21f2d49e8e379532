#!/usr/bin/env bash
# ReDial end to end on the CPU: data -> semantic IDs -> train GCRS -> calibrate the intent threshold on val -> test.
#   bash runs/redial.sh [SEED] [RAW]          the generative recommender alone, as the paper trains it
#   HEADS=1 bash runs/redial.sh [SEED] [RAW]  the hybrid: the same plus the heads of the redial preset (beyond the paper)
# RAW is the folder of ReDial files (default ../shared/data/redial). Three seeds, then the table with intervals:
#   for s in 0 1 2; do bash runs/redial.sh $s; done; python runs/table.py out/redial-s?/eval_test.json
# Everything lands in data/redial and out/redial-sSEED (out/redial-heads-sSEED with HEADS=1).
# Every item of a recommender turn is a slot target (train.py --slot-items all, the default; the paper's section 2.4).
# No --item-text: on ReDial the ID <-> title lines lowered val R@10 (docs/results.md). 3,000 steps: chosen on val.
set -euo pipefail
SEED=${1:-0}; RAW=${2:-../shared/data/redial}; THREADS=${THREADS:-2}; HEADS=${HEADS:-0}
DATA=data/redial; OUT=out/redial-s$SEED; RECIPE=(); CALIBRATE=threshold
if [ "$HEADS" = 1 ]; then  # the preset's heads (nanocrs/heads.py PRESETS), each chosen on val over three seeds
    OUT=out/redial-heads-s$SEED; RECIPE=(--heads redial); CALIBRATE=threshold,just-named
fi
[ -f $DATA/sids.json ] || python data_prep.py --dataset redial --raw "$RAW" --out $DATA \
    --encoder minilm --levels 3 --codebook-size 64 --item-features text+cooc
python train.py --data $DATA --out $OUT --seed $SEED --threads $THREADS --item-loss-weight 5 "${RECIPE[@]}" \
    --block-size 512 --batch-size 16 --max-steps 3000 --warmup 40 --dropout 0.1 --eval-interval 500 --save-interval 500
python sample.py --ckpt $OUT --eval val --calibrate $CALIBRATE --threads $THREADS --max-gen 0 --json $OUT/eval_val.json \
    --rankings $OUT/rankings_val.jsonl
python sample.py --ckpt $OUT --eval test --threads $THREADS --json $OUT/eval_test.json --rankings $OUT/rankings_test.jsonl
