"""
Use a trained nanocrs checkpoint: evaluate it, print sample replies, or chat with it.

    python sample.py --ckpt out/synthetic --eval test --json out/synthetic/eval_test.json
    python sample.py --ckpt out/synthetic --num-samples 3
    python sample.py --ckpt out/synthetic --chat                  # /reset starts over, /quit leaves
    python sample.py --ckpt out/inspired-s0 --eval val --calibrate threshold,text   # choices on val, saved beside it
    python sample.py --ckpt out/redial-heads-s0 --eval test --knob just-named=1.5   # a knob set for this run
    echo "I want a scary movie from the 80s" | python sample.py --ckpt out/synthetic --chat
    python sample.py --init-from smollm2 --prompt "The capital of France is" --greedy --max-new-tokens 20

The evaluation (paper protocol, baselines, dialog metrics) is nanocrs/evaluate.py; a checkpoint as a
Hugging Face folder: python -m nanocrs.checkpoint export --ckpt out/smol --out out/smol-hf
"""

import argparse
import os
import time
from dataclasses import replace

import torch

from nanocrs import checkpoint
from nanocrs.common import KNOBS, check_flags, check_output, flag_error, init_device, run_script
from nanocrs.data import DataError, load_dataset, write_json
from nanocrs.evaluate import CALIBRATION, calibrate, check_knobs, evaluate, print_eval, standardized_redial
from nanocrs.generate import sample
from nanocrs.heads import write_text_vectors
from nanocrs.session import CALIBRATION_FILE, Knobs, Session, chat, read_calibration, show_samples


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/synthetic", help="checkpoint folder written by train.py")
    p.add_argument("--eval", default=None, metavar="SPLIT", help="run the recommendation eval on val or test")
    p.add_argument("--chat", action="store_true", help="interactive chat (reads stdin, works with pipes)")
    p.add_argument("--num-samples", type=int, default=0, help="print this many test contexts with gold and generated replies")
    e = p.add_argument_group("evaluation")
    e.add_argument("--data", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    e.add_argument("--json", default=None, help="with --eval: also write the results here")
    e.add_argument("--rankings", default=None, metavar="FILE", help="with --eval: each sample's ranked items, one JSON line per sample")
    e.add_argument("--beam", type=int, default=50, help="beam width of the item search")
    e.add_argument("--eval-batch", type=int, default=8,
                   help="with --eval: turns per forward and beam search (memory: batch x block x vocab logits)")
    e.add_argument("--max-samples", type=int, default=0, help="with --eval: evaluate only the first N dialogs of the split (0: all)")
    e.add_argument("--protocol", choices=["paper", "standardized"], default="paper",
                   help="with --eval: paper (one sample per merged recommender turn and item) or standardized (ReDial "
                        "test only: Kostric & Balog's one instance per recommender message, read from the raw test file)")
    e.add_argument("--max-gen", type=int, default=200, help="with --eval: generate responses on about this many turns for BLEU/Distinct (0: none)")
    k = p.add_argument_group("decoding knobs (saved in CKPT/calibration.json)")
    k.add_argument("--calibrate", nargs="?", const="threshold", default=None, metavar="LIST",
                   help=f"with --eval val: choose these knobs on val and save them in CKPT/{CALIBRATION_FILE}; chat and "
                        f"later evals use them. LIST: {','.join(CALIBRATION)} (default threshold: the free-mode REC "
                        "threshold, best REC F1; the others need the heads and take a ranking pass per value tried)")
    k.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                   help=f"set a knob for this run (repeatable; NAME: {', '.join(Knobs.NAMES)}; default: the calibrated one, else 0)")
    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--init-from", default=None, help='plain text generation from an unmodified pretrained model ("smollm2" or a folder)')
    g.add_argument("--prompt", default=None, help="with --init-from: the prompt (raw text, no chat template added)")
    x = p.add_argument_group("system")
    x.add_argument("--device", default="auto")
    x.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 is faster on a busy machine)")
    x.add_argument("--quantize", choices=["none", "nf4"], default=None,
                   help="nf4: the backbone's block linears in 4 bits (nanocrs/nf4.py); default: the checkpoint's "
                        "setting, none with --init-from")
    a = p.parse_args(argv)
    a.calibrate = a.calibrate.split(",") if a.calibrate else []
    for name in a.calibrate:
        if name not in CALIBRATION:
            flag_error(f"--calibrate {name}: one of {', '.join(CALIBRATION)}")
    try:  # each --knob NAME=VALUE a known name and a finite number in its range
        Knobs().set(a.knob)
    except ValueError as e:
        flag_error(str(e))
    for kv in a.knob:
        if kv.partition("=")[0] in a.calibrate:
            flag_error(f"--knob {kv}: --calibrate {kv.partition('=')[0]} chooses that knob itself; give one or the other")
    for flag, low in (("top_k", 1), ("beam", 1), ("max_new_tokens", 1), ("max_samples", 0), ("max_gen", 0), ("num_samples", 0)):
        if getattr(a, flag) < low:
            flag_error(f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(a, flag)}")
    # every float flag finite, the rest in range (the knobs: Knobs, once)
    check_flags(a, {"temperature": (0, None, "(]"), "eval_batch": (1, None), "seed": (0, None), "threads": (0, None)})
    return a


def standardized_samples(ds: dict, args) -> list:
    """--protocol standardized: the instances built from the raw ReDial test file the dataset was prepared from."""
    info = ds["meta"].get("info", {})
    if ds["meta"].get("name") != "redial" or args.eval != "test" or args.calibrate:
        raise ValueError("--protocol standardized: ReDial's test split only (--eval test, no calibration)")
    raw = os.path.join(info.get("source", ""), info.get("test_file", ""))
    if not os.path.isfile(raw):
        raise DataError(f"{raw}: the raw ReDial test file data_prep.py read is not there (--protocol standardized reads it)")
    return standardized_redial(raw, ds["test"])


def main(argv=None):
    args = get_args(argv)
    for flag, path in (("--json", args.json), ("--rankings", args.rankings)):  # before any work is done
        if path:
            check_output(path, flag)
    if args.json and args.rankings and os.path.abspath(args.json) == os.path.abspath(args.rankings):
        raise ValueError(f"--json and --rankings both name {args.json}: one would overwrite the other")
    device = init_device(args.device, args.threads)
    if args.init_from:
        from nanocrs.backbone import load_base
        if args.prompt is None:
            raise ValueError("--init-from needs --prompt")
        model, tok = load_base(args.init_from, device, quantize=args.quantize or "none")
        ids = tok.encode(args.prompt)
        stop = {i for i in (tok.tk.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")) if i is not None}
        g = torch.Generator(device=device).manual_seed(args.seed)
        out = sample(model, ids, None, None, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, greedy=args.greedy, generator=g, stop=stop)[0]  # no trie: plain text
        print(f"prompt ids: {ids}\ngenerated ids: {out}\n{args.prompt}{tok.decode(out)}")
        return
    knobs = Knobs.read(args.ckpt).set(args.knob)  # a knob being calibrated starts at 0, the model as trained
    s = Session(args.ckpt, device, replace(knobs, **{CALIBRATION[n].field: 0.0 for n in args.calibrate if n != "threshold"}),
                quantize=args.quantize)
    check_knobs(s, args.calibrate, args.knob)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if not (args.eval or args.num_samples or args.chat):
        args.num_samples = 3
    ds = None
    if args.eval or args.num_samples:
        data_dir = args.data or s.config["data"]
        ds = load_dataset(data_dir)
        checkpoint.check_data(s.config, data_dir)
    if args.eval:
        if args.calibrate and args.eval != "val":
            raise ValueError("--calibrate: thresholds are chosen on the validation split (--eval val), never on test")
        if args.eval not in ("train", "val", "test"):
            raise DataError(f"--eval must be train, val or test, got {args.eval!r}")
        if not ds[args.eval]:
            raise DataError(f"{os.path.join(data_dir, args.eval + '.jsonl')}: no dialogs to evaluate")
        if args.eval_batch < 1:
            raise ValueError(f"--eval-batch must be >= 1, got {args.eval_batch}")
        if "text" in args.calibrate:  # first the encoder's item vectors beside the checkpoint (a TF-IDF dataset stops here)
            write_text_vectors(s.ckpt, s.trie.item_ids, ds, data_dir)
        if args.beam < 50:
            print(f"note: beam {args.beam} < 50, so recall@50 counts only the {args.beam} items returned")
        t0 = time.time()
        samples = standardized_samples(ds, args) if args.protocol == "standardized" else None
        res = evaluate(s, ds, args.eval, args.beam, args.max_samples, args.max_gen, args.max_new_tokens,
                       args.eval_batch, args.rankings, samples)
        res["protocol"] = args.protocol
        res["seconds"] = round(time.time() - t0, 1)
        print_eval(res)
        print(f"eval took {res['seconds']} s")
        if args.calibrate:  # added to CKPT/calibration.json: the file keeps what an earlier calibration chose
            saved = calibrate(s, ds, args.calibrate, res, args.beam, args.max_samples, args.eval_batch)
            res.update({k: v for k, v in saved.items() if k.endswith("_grid")})
            path = os.path.join(args.ckpt, CALIBRATION_FILE)
            write_json(path, {**read_calibration(args.ckpt)[0], "chosen_on": "val", **saved})
            print(f"saved to {path}")
        # where each decoding knob came from, so runs/table.py can tell one recipe's seeds from other settings
        saved, typed = read_calibration(args.ckpt)[0], {Knobs.NAMES[kv.partition("=")[0]] for kv in args.knob}
        res["knob_sources"] = {k: "flag" if k in typed else "calibration.json" if k in saved else "default" for k in KNOBS}
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, res)
            print(f"wrote {args.json}")
        if args.rankings:
            print(f"wrote {args.rankings}")
    if args.num_samples:
        show_samples(s, ds, args.num_samples, args, generator)
    if args.chat:
        chat(s, args, generator)


if __name__ == "__main__":
    run_script(main)
