"""
A trained checkpoint ready to talk: the model, its renderer, trie and catalogue, one reply at a time,
and generated ids shown as text for people. sample.py (samples, chat) and nanocrs/evaluate.py use it.

    s = Session("out/synthetic", "cpu")
    ids = s.reply([{"role": "user", "text": "a scary movie please", "items": []}], args, generator)
    mode, item, text = s.show(ids)    # ("REC", "m0042", "Try [Night Tide (1981)], it is ...")
"""

import json
import os

import numpy as np
import torch

from nanocrs import checkpoint
from nanocrs.common import check_knobs
from nanocrs.data import MENTION, DataError, Renderer, load_items
from nanocrs.encoder import TEXT_PRIOR_FILE, TextPrior
from nanocrs.generate import SIDTrie, sample

CALIBRATION_FILE = "calibration.json"  # chosen on val, beside the checkpoint: REC threshold, copy bias, text prior


def read_calibration(ckpt: str) -> dict:
    """What sample.py --calibrate saved beside a checkpoint ({} if nothing); intent.json is its older name."""
    for name in (CALIBRATION_FILE, "intent.json"):
        path = os.path.join(ckpt, name)
        if os.path.isfile(path):
            try:
                saved = json.load(open(path))
            except ValueError as e:
                raise DataError(f"{path}: not a JSON object ({e})") from None
            if not isinstance(saved, dict):
                raise DataError(f"{path}: not a JSON object")
            check_knobs(saved, path)
            return saved
    return {}


class Session:
    """Everything loaded from a checkpoint, plus the helpers that turn tokens into readable text."""

    def __init__(self, ckpt: str, device: str, copy_bias: float | None = None, text_prior: float | None = None,
                 just_named_bias: float | None = None, quantize: str | None = None):
        # quantize: the backbone's storage ("nf4", "none"); None = what the checkpoint was trained with
        self.model, self.config, self.tok, self.sids = checkpoint.load(ckpt, device, merge=True, quantize=quantize)
        self.model.eval()
        self.items = {it["id"]: it for it in load_items(os.path.join(ckpt, "items.jsonl"))}
        self.rd = Renderer(self.tok, self.sids, self.model.config.block_size, self.config["train"].get("target", "full"))
        self.trie = SIDTrie.build(self.sids, self.tok)
        self.ctrl = self.rd.ctrl
        self.device = device
        # what sample.py --eval val --calibrate chose on the validation split: the free-mode REC threshold
        # and, with --calibrate-copy, the copy gate's bias (nanocrs/pointer.py); copy_bias here overrides it
        saved = read_calibration(ckpt)
        self.rec_threshold = saved.get("rec_threshold")
        if self.model.pointer is not None:
            self.model.pointer.copy_bias = saved.get("copy_bias", 0.0) if copy_bias is None else copy_bias
            # with --calibrate-just-named, the same for the item the seeker just named; just_named_bias overrides it
            self.model.pointer.just_named_bias = (saved.get("just_named_bias", 0.0) if just_named_bias is None
                                                  else just_named_bias)
        # and, with --calibrate-text, the text prior's weight tau (nanocrs/encoder.py); text_prior overrides it
        self.ckpt, self.text_prior = ckpt, None
        self.set_text_prior(saved.get("text_prior", 0.0) if text_prior is None else text_prior)

    def set_text_prior(self, tau: float):
        """Use the text prior with weight tau at the REC slot (0: none). Its item vectors and encoder name
        are in text_prior.npz beside the checkpoint, written by sample.py --calibrate-text."""
        if not tau:
            self.text_prior = None
        elif self.text_prior is not None:
            self.text_prior.tau = tau
        else:
            path = os.path.join(self.ckpt, TEXT_PRIOR_FILE)
            if self.model.pointer is None or not self.model.pointer.items:
                raise ValueError("--text-prior: this checkpoint has no association head (train.py --assoc)")
            if not os.path.isfile(path):
                raise DataError(f"{path}: not found; sample.py --eval val --calibrate-text writes it")
            try:
                with np.load(path, allow_pickle=False) as f:
                    vecs, encoder = f["items"], f["encoder"]
            except Exception as e:  # a damaged zip, a missing array, an object array: the library's many errors
                raise DataError(f"{path}: not a readable text-prior file ({type(e).__name__}: {e}); "
                                "sample.py --eval val --calibrate-text writes it again") from None
            if encoder.ndim != 0 or encoder.dtype.kind != "U":
                raise DataError(f"{path}: encoder must be one string, got {encoder.dtype} {encoder.shape}")
            if vecs.ndim != 2 or vecs.shape[0] != len(self.trie.item_ids):
                raise DataError(f"{path}: {vecs.shape} item vectors for a catalogue of {len(self.trie.item_ids)}")
            if vecs.dtype.kind != "f" or not np.isfinite(vecs).all():  # one NaN row empties every beam list
                raise DataError(f"{path}: items must be finite floats ({vecs.dtype}, "
                                f"{int((~np.isfinite(vecs)).sum()) if vecs.dtype.kind == 'f' else 'not float'} non-finite)")
            encoder = str(encoder)
            self.text_prior = TextPrior(encoder, vecs, tau, lambda i: self.items[i]["title"], self.device)

    def prior(self, contexts: list[list[dict]]):
        """(B, items) text prior logits for B dialogs so far, or None without a text prior."""
        return None if self.text_prior is None else self.text_prior(contexts)

    def link(self, text: str) -> tuple[str, list[str]]:
        """Typed text with every catalogue title found in it written as an @{id} mention, the way the
        dataset readers link titles (nanocrs/datasets.py), so the model sees a typed title as the item
        it saw in training (a one-word title only with its capital, mid-sentence: link_titles' cased_words).
        Returns (text, linked item ids in order)."""
        from nanocrs.datasets import link_titles
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
                  prior=self.prior([context]))
        if self.rec_threshold is not None:  # choose the mode with the calibrated threshold, then go on
            logits, _ = self.model(torch.tensor([prompt], device=self.device))
            rec, chat = self.ctrl.mode_rec, self.ctrl.mode_chat
            p = logits[0, -1, [rec, chat]].float().softmax(-1)[0].item()
            mode = rec if p >= self.rec_threshold else chat
            return [mode] + sample(self.model, prompt + [mode], self.trie, self.ctrl,
                                   max_new_tokens=args.max_new_tokens - 1, **kw)[0]
        return sample(self.model, prompt, self.trie, self.ctrl, max_new_tokens=args.max_new_tokens, **kw)[0]
