"""
A trained checkpoint ready to talk: the model, its renderer, trie and catalogue, one reply at a time,
generated ids shown as text for people, the decoding knobs (Knobs), and the chat and printed samples
of sample.py. sample.py and nanocrs/evaluate.py use it.

    s = Session("out/synthetic", "cpu")
    ids = s.reply([{"role": "user", "text": "a scary movie please", "items": []}], args, generator)
    mode, item, text = s.show(ids)    # ("REC", "m0042", "Try [Night Tide (1981)], it is ...")
"""

import json
import os
import sys
from dataclasses import dataclass, fields, replace

import torch

from nanocrs import checkpoint
from nanocrs.common import KNOBS, check_knobs, escape_terminal, out_of_range
from nanocrs.data import MENTION, DataError, Renderer, load_items
from nanocrs.heads import TextPrior
from nanocrs.generate import SIDTrie, sample

CALIBRATION_FILE = "calibration.json"  # chosen on val, beside the checkpoint: the decoding knobs (Knobs)


@dataclass(frozen=True)
class Knobs:
    """The decoding knobs, one value: read from calibration.json (sample.py --eval val --calibrate chose
    them), or set on the command line (sample.py --knob NAME=VALUE), validated once, and handed to the
    decoders explicitly. rec_threshold: the free-mode REC threshold on p(REC) / (p(REC) + p(CHAT))
    (None: the plain argmax); the other three only move the heads (nanocrs/heads.py): the copy gate's
    bias, its bias where the seeker just named an item, and the text prior's weight. Zero: as trained."""
    rec_threshold: float | None = None
    copy_bias: float = 0.0
    just_named_bias: float = 0.0
    text_prior: float = 0.0

    # command-line name -> field
    NAMES = {"threshold": "rec_threshold", "copy": "copy_bias", "just-named": "just_named_bias", "text": "text_prior"}

    def __post_init__(self):
        for f in fields(self):  # the ranges are common.KNOBS's, which also checks calibration.json as it is read
            v = getattr(self, f.name)
            why = None if v is None and f.name == "rec_threshold" else out_of_range(v, *KNOBS[f.name])
            if why:
                raise ValueError(f"{f.name} {why}")
            if v is not None:
                object.__setattr__(self, f.name, float(v))

    @classmethod
    def read(cls, ckpt: str) -> "Knobs":
        """The knobs saved beside a checkpoint (all zero, no threshold, if none); one line if one is wrong."""
        saved, _ = read_calibration(ckpt)
        return cls(**{f.name: saved[f.name] for f in fields(cls) if saved.get(f.name) is not None})

    def set(self, assignments: list[str]) -> "Knobs":
        """These knobs with NAME=VALUE assignments (the command line's) applied; one line naming the
        assignment if one is wrong."""
        knobs = self
        for a in assignments:
            name, _, value = a.partition("=")
            if name not in self.NAMES:
                raise ValueError(f"--knob {a}: NAME is one of {', '.join(self.NAMES)}")
            try:
                knobs = replace(knobs, **{self.NAMES[name]: float(value)})
            except ValueError as e:  # not a number, or out of its range
                raise ValueError(f"--knob {a}: {e}") from None
        return knobs


def read_calibration(ckpt: str) -> tuple[dict, str]:
    """(what sample.py --calibrate saved beside a checkpoint ({} if nothing), its path); intent.json is
    its older name."""
    for name in (CALIBRATION_FILE, "intent.json"):
        path = os.path.join(ckpt, name)
        if os.path.isfile(path):
            try:
                saved = json.load(open(path))
            except ValueError as e:
                raise DataError(f"{path}: not a JSON object ({e})") from None
            if not isinstance(saved, dict):
                raise DataError(f"{path}: not a JSON object")
            check_knobs(saved, path)  # each knob it holds a finite number in its range, or one line naming it
            return saved, path
    return {}, os.path.join(ckpt, CALIBRATION_FILE)


class Session:
    """Everything loaded from a checkpoint, plus the helpers that turn tokens into readable text."""

    def __init__(self, ckpt: str, device: str, knobs: Knobs | None = None, quantize: str | None = None):
        # quantize: the backbone's storage ("nf4", "none"); None = what the checkpoint was trained with
        self.model, self.config, self.tok, self.sids = checkpoint.load(ckpt, device, merge=True, quantize=quantize)
        self.model.eval()
        self.items = {it["id"]: it for it in load_items(os.path.join(ckpt, "items.jsonl"))}
        self.rd = Renderer(self.tok, self.sids, self.model.config.block_size, self.config["train"].get("target", "full"))
        self.trie = SIDTrie.build(self.sids, self.tok)
        self.ctrl = self.rd.ctrl
        self.device = device
        self.ckpt, self.text_prior = ckpt, None
        self.use(Knobs.read(ckpt) if knobs is None else knobs)

    def use(self, knobs: Knobs):
        """Decode with these knobs from now on (the text prior's encoder is loaded once, when first needed)."""
        heads = self.model.heads
        if knobs.text_prior and not (heads is not None and heads.items):
            raise ValueError("text_prior: this checkpoint has no association head (train.py --heads assoc=1)")
        if knobs.text_prior and self.text_prior is None:
            self.text_prior = TextPrior.load(self.ckpt, len(self.trie.item_ids), knobs.text_prior,
                                             lambda i: self.items[i]["title"], self.device)
        if self.text_prior is not None:
            self.text_prior.tau = knobs.text_prior
        self.knobs = knobs

    def mixture(self, contexts: list[list[dict]] | None = None):
        """The slot mixture the decoders ask for at a REC slot, with this session's knobs and, given the
        B dialogs so far, their text prior; None without heads: the plain generative path."""
        if self.model.heads is None:
            return None
        prior = self.text_prior(contexts) if self.knobs.text_prior and contexts is not None else None
        tt = self.trie.tensors(self.ctrl, self.model.config.vocab_size, self.device)
        return self.model.heads.mixture(self.trie, tt, self.knobs, prior)

    def link(self, text: str) -> tuple[str, list[str]]:
        """Typed text with every catalogue title found in it written as an @{id} mention, the way the
        dataset readers link titles (nanocrs/inspired.py), so the model sees a typed title as the item
        it saw in training (a one-word title only with its capital, mid-sentence: link_titles' cased_words).
        Returns (text, linked item ids in order)."""
        from nanocrs.inspired import link_titles
        text, _ = link_titles(text, [(it["title"], i) for i, it in self.items.items()], cased_words=True)
        return text, list(dict.fromkeys(MENTION.findall(text)))

    def title(self, item_id: str) -> str:
        it = self.items[item_id]
        year = it.get("metadata", {}).get("year")
        return f"[{it['title']}{f' ({year})' if year else ''}]"

    def show_text(self, text: str) -> str:
        """Dialog text with @{id} mentions shown as titles."""
        return MENTION.sub(lambda m: self.title(m.group(1)), text)

    def show(self, ids: list[int]):
        """Generated ids after "Assistant:" -> (mode, slot item, response with item spans shown as titles)."""
        mode, slot, pieces = self.rd.parse(ids)
        return mode, slot, Renderer.join(pieces, self.title)

    def reply(self, context: list[dict], args, generator) -> list[int]:
        """The ids the model writes after "Assistant:"; args: max_new_tokens, temperature, top_k, greedy."""
        prompt = self.rd.prompt(context)
        kw = dict(n=1, temperature=args.temperature, top_k=args.top_k, greedy=args.greedy, generator=generator,
                  mixture=self.mixture([context]))
        if self.knobs.rec_threshold is not None:  # choose the mode with the calibrated threshold, then go on
            logits, _ = self.model(torch.tensor([prompt], device=self.device))
            rec, chat = self.ctrl.mode_rec, self.ctrl.mode_chat
            p = logits[0, -1, [rec, chat]].float().softmax(-1)[0].item()
            mode = rec if p >= self.knobs.rec_threshold else chat
            return [mode] + sample(self.model, prompt + [mode], self.trie, self.ctrl,
                                   max_new_tokens=args.max_new_tokens - 1, **kw)[0]
        return sample(self.model, prompt, self.trie, self.ctrl, max_new_tokens=args.max_new_tokens, **kw)[0]


# -----------------------------------------------------------------------------
# printed samples and the chat (sample.py --num-samples, --chat)

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
        text = reply_text(s, ids)
        items = ([item] if item else []) + MENTION.findall(text)
        context.append({"role": "assistant", "text": text, "items": list(dict.fromkeys(items))})


def reply_text(s: Session, ids: list[int]) -> str:
    """The response part of generated ids, written back in the schema's @{id} form."""
    _, _, pieces = s.rd.parse(ids)
    return Renderer.join([_escape(p) if isinstance(p, str) else p for p in pieces], lambda i: "@{" + i + "}")


def _escape(text: str) -> str:
    # "@{" in free text would read as an item mention when the turn is rendered again
    return text.replace("@{", "@ {")
