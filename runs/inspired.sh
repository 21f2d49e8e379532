#!/usr/bin/env bash
# INSPIRED end to end on the CPU: data -> IDs -> train (train split) -> calibrate on val -> test.
#   bash runs/inspired.sh [SEED] [RAW]      (RAW: the folder of INSPIRED files; default ../shared/data/inspired)
# Three seeds, then the mean ± std table: for s in 0 1 2; do bash runs/inspired.sh $s; done; python runs/table.py out/inspired-s?/eval_test.json
# No --item-text: without the ID <-> title lines val R@10 was higher over three seeds (docs/results.md).
# --assoc 1 (the association head): chosen on val over three seeds (docs/results.md, 2026-12-03).
# --calibrate-text (the item encoder's match with the dialog's last turns, its weight chosen on val): adopted on val over
# three seeds (docs/results.md, "A text prior from the item encoder").
set -euo pipefail
SEED=${1:-0}; RAW=${2:-../shared/data/inspired}; THREADS=${THREADS:-2}
DATA=data/inspired; OUT=out/inspired-s$SEED
[ -f $DATA/sids.json ] || python data_prep.py --dataset inspired --raw "$RAW" --out $DATA \
    --encoder minilm --levels 3 --codebook-size 32 --item-features text+cooc
python train.py --data $DATA --out $OUT --seed $SEED --threads $THREADS --item-loss-weight 5 --pointer 64 --assoc 1 \
    --block-size 512 --batch-size 16 --max-steps 400 --warmup 20 --dropout 0.1 --eval-interval 100 --save-interval 100
python sample.py --ckpt $OUT --eval val --calibrate --calibrate-text --threads $THREADS --max-gen 0 --json $OUT/eval_val.json
python sample.py --ckpt $OUT --eval test --threads $THREADS --json $OUT/eval_test.json --rankings $OUT/rankings_test.jsonl
