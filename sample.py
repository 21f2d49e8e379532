"""
Use a trained nanocrs checkpoint: evaluate it, print sample replies, or chat with it.

    python sample.py --ckpt out/synthetic --eval test --json out/synthetic/eval_test.json
    python sample.py --ckpt out/synthetic --num-samples 3
    python sample.py --ckpt out/synthetic --chat                  # /reset starts over, /quit leaves
    python sample.py --ckpt out/inspired-s0 --eval val --calibrate --calibrate-text   # choices on val, saved beside it
    python sample.py --ckpt out/redial-s0 --eval val --calibrate --calibrate-just-named
    echo "I want a scary movie from the 80s" | python sample.py --ckpt out/synthetic --chat
    python sample.py --init-from smollm2 --prompt "The capital of France is" --greedy --max-new-tokens 20

The evaluation (paper protocol, baselines, dialog metrics) is nanocrs/evaluate.py; a checkpoint as a
Hugging Face folder: python -m nanocrs.hf export --ckpt out/smol --out out/smol-hf
"""

import argparse
import os
import sys
import time

import torch

from nanocrs import checkpoint
from nanocrs.common import KNOBS, check_flags, check_knobs, check_output, escape_terminal, flag_error, init_device, run_script
from nanocrs.data import MENTION, DataError, Renderer, load_dataset, write_json
from nanocrs.evaluate import (calibrate_copy, calibrate_just_named, calibrate_text, evaluate, print_eval, standardized_redial,
                              write_text_vectors)
from nanocrs.generate import sample
from nanocrs.session import CALIBRATION_FILE, Session, read_calibration


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/synthetic", help="checkpoint folder written by train.py")
    p.add_argument("--data", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--eval", default=None, metavar="SPLIT", help="run the recommendation eval on val or test")
    p.add_argument("--json", default=None, help="with --eval: also write the results here")
    p.add_argument("--calibrate", action="store_true",
                   help=f"with --eval val: choose the free-mode REC threshold (best REC F1) and save it in "
                        f"CKPT/{CALIBRATION_FILE}; chat and later evals use it")
    p.add_argument("--calibrate-copy", action="store_true",
                   help=f"with --eval val and a copy head: also choose the copy gate's bias (best R@1, R@10 and "
                        f"fresh R@10 guarded; one more ranking pass per bias) and save it in CKPT/{CALIBRATION_FILE}")
    p.add_argument("--copy-bias", type=float, default=None,
                   help="the copy gate's bias for this run (default: the calibrated one, else 0)")
    p.add_argument("--calibrate-just-named", action="store_true",
                   help=f"with --eval val and --copy-turns: also choose the copy gate's bias where the seeker has just "
                        f"named an item (as --calibrate-copy: best R@1, guarded) and save it in CKPT/{CALIBRATION_FILE}")
    p.add_argument("--just-named-bias", type=float, default=None,
                   help="that bias for this run (default: the calibrated one, else 0)")
    p.add_argument("--calibrate-text", action="store_true",
                   help=f"with --eval val and an association head: also choose the text prior's weight (the item "
                        f"encoder matching the dialog's last turns; best R@10, fresh R@10 guarded) and save it in "
                        f"CKPT/{CALIBRATION_FILE}")
    p.add_argument("--text-prior", type=float, default=None,
                   help="the text prior's weight for this run (default: the calibrated one, else 0)")
    p.add_argument("--protocol", choices=["paper", "standardized"], default="paper",
                   help="with --eval: paper (one sample per merged recommender turn and item) or standardized (ReDial "
                        "test only: Kostric & Balog's one instance per recommender message, read from the raw test file)")
    p.add_argument("--beam", type=int, default=50, help="beam width of the item search")
    p.add_argument("--eval-batch", type=int, default=8,
                   help="with --eval: turns per forward and beam search (memory: batch x block x vocab logits)")
    p.add_argument("--rankings", default=None, metavar="FILE",
                   help="with --eval: write each sample's ranked items here, one JSON line per sample")
    p.add_argument("--max-samples", type=int, default=0, help="with --eval: evaluate only the first N dialogs of the split (0: all)")
    p.add_argument("--max-gen", type=int, default=200, help="with --eval: generate responses on about this many turns for BLEU/Distinct (0: none)")
    p.add_argument("--num-samples", type=int, default=0, help="print this many test contexts with gold and generated replies")
    p.add_argument("--chat", action="store_true", help="interactive chat (reads stdin, works with pipes)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 is faster on a busy machine)")
    p.add_argument("--init-from", default=None, help='plain text generation from an unmodified pretrained model ("smollm2" or a folder)')
    p.add_argument("--prompt", default=None, help="with --init-from: the prompt (raw text, no chat template added)")
    p.add_argument("--quantize", choices=["none", "nf4"], default=None,
                   help="nf4: the backbone's block linears in 4 bits (nanocrs/nf4.py); default: the checkpoint's "
                        "setting, none with --init-from")
    a = p.parse_args(argv)
    if a.calibrate_copy and a.copy_bias is not None:
        flag_error("--copy-bias: --calibrate-copy chooses the copy bias itself; give one or the other")
    if a.calibrate_just_named and a.just_named_bias is not None:
        flag_error("--just-named-bias: --calibrate-just-named chooses that bias itself; give one or the other")
    if a.calibrate_text and a.text_prior is not None:
        flag_error("--text-prior: --calibrate-text chooses the text prior's weight itself; give one or the other")
    if a.text_prior is not None and a.text_prior < 0:
        flag_error(f"--text-prior must be >= 0, got {a.text_prior}")
    for flag, low in (("top_k", 1), ("beam", 1), ("max_new_tokens", 1), ("max_samples", 0), ("max_gen", 0), ("num_samples", 0)):
        if getattr(a, flag) < low:
            flag_error(f"--{flag.replace('_', '-')} must be at least {low}, got {getattr(a, flag)}")
    # every float flag finite (a NaN copy bias empties every beam list: zeros, exit code 0), the rest in range
    check_flags(a, {"temperature": (0, None, "(]"), "eval_batch": (1, None), "seed": (0, None), "threads": (0, None)})
    check_knobs(vars(a), "", flags=True)
    return a


# -----------------------------------------------------------------------------
# samples and chat

def show_samples(s: Session, ds: dict, n: int, args, generator):
    dialogs = ds["test"]
    shown = 0
    for d in dialogs:
        # one assistant turn per dialog, the first recommendation if there is one
        turns = [t for t, turn in enumerate(d["turns"]) if turn["role"] == "assistant" and t > 0]
        if not turns:
            continue
        t = next((t for t in turns if d["turns"][t]["items"]), turns[0])
        print(f"=== {d['id']}, turn {t} " + "=" * 40)
        for turn in d["turns"][:t]:
            print(escape_terminal(f"{turn['role']:>9}: {s.show_text(turn['text'])}"))
        gold = d["turns"][t]
        print(escape_terminal(f"     gold: [{'REC' if gold['items'] else 'CHAT'}] {s.show_text(gold['text'])}"))
        mode, item, text = s.show(s.reply(d["turns"][:t], args, generator))
        rec = f" -> {s.title(item)}" if item else ""
        print(escape_terminal(f"    model: [{mode or '?'}{rec}] {text}") + "\n")
        shown += 1
        if shown >= n:
            break


def chat(s: Session, args, generator):
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not an error ending the chat
        sys.stdin.reconfigure(errors="replace")
    if interactive:
        print("nanocrs chat: tell it what you like. /reset starts over, /quit leaves.")
    context = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            context = []
            print("(new conversation)")
            continue
        if not line:
            print("(empty message: type something, /reset or /quit)")
            continue
        if not interactive:
            print(escape_terminal(f"you> {line}"))
        if "\ufffd" in line:
            print("(some of that was not UTF-8 text: shown as \ufffd)")
        text, linked = s.link(_escape(line))
        if linked:
            print(escape_terminal(f"(linked: {', '.join(s.title(i) for i in linked)})"))
        context.append({"role": "user", "text": text, "items": linked})
        ids = s.reply(context, args, generator)
        mode, item, text = s.show(ids)
        rec = f" recommends {s.title(item)}" if item else ""
        print(escape_terminal(f"bot> ({mode or '?'}{rec}) {text}"))
        # keep the reply in the context as a schema turn: its slot item first, then the items its text mentions,
        # so that it renders back into exactly the structured form the model wrote
        text = _reply_text(s, ids)
        items = ([item] if item else []) + MENTION.findall(text)
        context.append({"role": "assistant", "text": text, "items": list(dict.fromkeys(items))})


def _reply_text(s: Session, ids: list[int]) -> str:
    """The response part of generated ids, written back in the schema's @{id} form."""
    _, _, pieces = s.rd.parse(ids)
    return Renderer.join([_escape(p) if isinstance(p, str) else p for p in pieces], lambda i: "@{" + i + "}")


def _escape(text: str) -> str:
    # "@{" in free text would read as an item mention when the turn is rendered again
    return text.replace("@{", "@ {")


def check_heads(s: Session, args):
    """The decoding knobs that need a head this checkpoint may not have: one line if it has not."""
    ptr = s.model.pointer
    if (args.calibrate_copy or args.copy_bias is not None) and ptr is None:
        flag = "--calibrate-copy" if args.calibrate_copy else "--copy-bias"
        raise ValueError(f"{flag}: this checkpoint has no copy head (train.py --pointer)")
    if (args.calibrate_just_named or args.just_named_bias is not None) and not (ptr is not None and ptr.turns):
        flag = "--calibrate-just-named" if args.calibrate_just_named else "--just-named-bias"
        raise ValueError(f"{flag}: this checkpoint has no turn buckets in its copy head (train.py --copy-turns 1)")
    if args.calibrate_text and not (ptr is not None and ptr.items):
        raise ValueError("--calibrate-text: this checkpoint has no association head (train.py --assoc)")


def save_calibration(s: Session, ds: dict, res: dict, args):
    """What --calibrate, --calibrate-copy, --calibrate-just-named and --calibrate-text choose on val (res:
    the val eval), added to CKPT/calibration.json: the file keeps what an earlier calibration chose."""
    path = os.path.join(args.ckpt, CALIBRATION_FILE)
    saved = {**read_calibration(args.ckpt), "chosen_on": "val"}
    if args.calibrate:
        saved["rec_threshold"], saved["val"] = res["intent_best_threshold"], res["intent_at_best_threshold"]
        print(f"free-mode REC threshold {saved['rec_threshold']:.4f} (best REC F1 on val)")
    if args.calibrate_copy:
        saved["copy_bias"], saved["copy_bias_grid"] = calibrate_copy(s, ds, args.beam, args.max_samples, args.eval_batch, base=res)
        res["copy_bias_grid"] = saved["copy_bias_grid"]
        print(f"copy gate bias {saved['copy_bias']} (best R@1 on val, R@10 and fresh R@10 guarded)")
    if args.calibrate_just_named:
        saved["just_named_bias"], saved["just_named_bias_grid"] = calibrate_just_named(
            s, ds, args.beam, args.max_samples, args.eval_batch, base=res)
        res["just_named_bias_grid"] = saved["just_named_bias_grid"]
        print(f"just-named bias {saved['just_named_bias']} (best R@1 on val, R@10 and fresh R@10 guarded)")
    if args.calibrate_text:
        saved["text_prior"], saved["text_prior_grid"] = calibrate_text(s, ds, args.beam, args.max_samples, args.eval_batch, base=res)
        res["text_prior_grid"] = saved["text_prior_grid"]
        print(f"text prior weight {saved['text_prior']} (best R@10 on val, fresh R@10 guarded)")
    write_json(path, saved)
    print(f"saved to {path}")


def standardized_samples(ds: dict, args) -> list:
    """--protocol standardized: the instances built from the raw ReDial test file the dataset was prepared from."""
    info = ds["meta"].get("info", {})
    if ds["meta"].get("name") != "redial" or args.eval != "test" or calibrating(args):
        raise ValueError("--protocol standardized: ReDial's test split only (--eval test, no calibration)")
    raw = os.path.join(info.get("source", ""), info.get("test_file", ""))
    if not os.path.isfile(raw):
        raise DataError(f"{raw}: the raw ReDial test file data_prep.py read is not there (--protocol standardized reads it)")
    return standardized_redial(raw, ds["test"])


def calibrating(args) -> bool:
    return args.calibrate or args.calibrate_copy or args.calibrate_just_named or args.calibrate_text


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
    s = Session(args.ckpt, device, copy_bias=0.0 if args.calibrate_copy else args.copy_bias,  # calibration starts at 0
                text_prior=0.0 if args.calibrate_text else args.text_prior,
                just_named_bias=0.0 if args.calibrate_just_named else args.just_named_bias, quantize=args.quantize)
    check_heads(s, args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if not (args.eval or args.num_samples or args.chat):
        args.num_samples = 3
    ds = None
    if args.eval or args.num_samples:
        data_dir = args.data or s.config["data"]
        ds = load_dataset(data_dir)
        checkpoint.check_data(s.config, data_dir)
    if args.eval:
        if calibrating(args) and args.eval != "val":
            raise ValueError("--calibrate: thresholds are chosen on the validation split (--eval val), never on test")
        if args.eval not in ("train", "val", "test"):
            raise DataError(f"--eval must be train, val or test, got {args.eval!r}")
        if not ds[args.eval]:
            raise DataError(f"{os.path.join(data_dir, args.eval + '.jsonl')}: no dialogs to evaluate")
        if args.eval_batch < 1:
            raise ValueError(f"--eval-batch must be >= 1, got {args.eval_batch}")
        if args.calibrate_text:  # first the encoder's item vectors beside the checkpoint (a TF-IDF dataset stops here)
            write_text_vectors(s, ds, data_dir)
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
        if calibrating(args):
            save_calibration(s, ds, res, args)
        # where each decoding knob came from, so runs/table.py can tell one recipe's seeds from other settings
        saved = read_calibration(args.ckpt)
        res["knob_sources"] = {k: "flag" if getattr(args, k, None) is not None else
                               "calibration.json" if k in saved else "default" for k in KNOBS}
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
