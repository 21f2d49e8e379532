"""
The evaluation of a trained checkpoint: the recommendation eval and the dialog metrics (sample.py --eval).

    s = Session("out/synthetic", "cpu")
    res = evaluate(s, load_dataset("data/synthetic"), "test", beam=50)
    print_eval(res)

Evaluation follows the paper's protocol: one sample per (assistant turn, item it mentions); the mode
is forced from the gold turn, the context is followed by  Assistant:<MODE=REC><BOI>  and a
trie-constrained beam search (width beam, >= the largest k) gives the ranked list. Reported:
Recall@1/5/10/20/50, NDCG and MRR @5/10/20 on the standard protocol and on the fresh one (gold items
not mentioned earlier in the dialog), the free-mode intent accuracy (the greedy token after
"Assistant:" on every assistant turn), and the same metrics for the popularity and repeat-context
baselines and, on the synthetic world, the generator's oracle, all on the same samples.

evaluate() is three steps over the assistant turns:
    score_all     one teacher-forced forward per turn, batched (score_turns): the free-mode intent,
                  the gold response's log-probs and, on REC turns, the item beam search
    rank_pass     the model's and the baselines' ranked lists against the gold items
    dialog_pass   intent, perplexity, and responses generated on some turns (BLEU, Distinct-n, ...)
"""

import os
import re
import sys
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from nanocrs.data import DataError, Renderer, read_jsonl, rec_samples, training_dialogs, write_jsonl
from nanocrs.generate import beam_search_batch, sample
from nanocrs.metrics import (COPY_BIASES, RECENCY_DECAYS, TEXT_PRIORS, CoOccurrence, Popularity, calibrate_intent, choose_copy_bias,
                             choose_text_prior, corpus_bleu,
                             distinct_per_sentence, distinct_ratio, format_table, intent_metrics, perplexity, rank_metrics,
                             rank_of, repeat_context, repeat_then, replace_spans)
from nanocrs.session import Session
from nanocrs.tokenizer import MODE_CHAT, MODE_REC


@torch.no_grad()
def evaluate(s: Session, ds: dict, split: str, beam: int, max_dialogs: int = 0, max_gen: int = 200,
             max_new_tokens: int = 64, batch: int = 8, rankings: str | None = None, samples=None) -> dict:
    """The recommendation eval (paper protocol, both protocols, baselines) and the dialog metrics.

    Per assistant turn, ONE forward of  context + "Assistant:" + the gold structured turn  gives:
      - the free-mode intent: the greedy token right after "Assistant:";
      - the perplexity of the gold response (teacher-forced; each <BOI>..<EOI> span counts as one unit);
      - on REC turns, the start of the item beam search: the cache is rewound to just after
        <MODE=REC><BOI>, which is exactly how the gold REC turn begins.
    Turns go `batch` at a time (score_turns), left-padded. Ties between equal scores go by catalogue
    order (nanocrs.generate), so the batch size changes no ranking beyond float rounding.
    With `rankings`, one JSON line per sample: dialog, turn, gold, fresh, rank (1-based, 0 = not
    found) and the model's ranked [item, log-prob] list.
    On every k-th turn (about max_gen turns in all) a response is also generated greedily with the
    gold mode forced, for BLEU / Distinct-n and, on REC turns, the target-prediction accuracy (the
    item the model writes after <BOI>) and faithfulness (the response mentions that same item)."""
    dialogs = ds[split][:max_dialogs] if max_dialogs else ds[split]
    turns = [(d, t) for d in dialogs for t, turn in enumerate(d["turns"]) if turn["role"] == "assistant" and t > 0]
    if samples is not None:  # another protocol's samples (standardized_redial): their turns, even a first one
        keep = {d["id"] for d in dialogs}
        samples = [x for x in samples if x[0]["id"] in keep]
        turns = list({(d["id"], t): (d, t) for d, t, _, _ in samples}.values())
    scored = score_all(s, turns, beam, batch, split)
    res = {"split": split, **rank_pass(s, ds, dialogs, turns, scored, beam, rankings, samples)}
    if s.model.heads is not None:
        res.update(copy_bias=s.knobs.copy_bias, just_named_bias=s.knobs.just_named_bias, text_prior=s.knobs.text_prior)
    return {**res, **dialog_pass(s, turns, scored, max_gen, max_new_tokens, split)}


@dataclass(frozen=True)
class Knob:
    """A decoding knob sample.py --calibrate chooses on val: its Knobs field, what the checkpoint needs
    for it, the values tried (one ranking pass on val each; the first is 0, the model as trained) and
    the rule that picks one from the grid {value: {"recall@1", "recall@10", "fresh_recall@10"}}."""
    field: str
    needs: str      # "": any checkpoint; "heads", "copy-turns" or "assoc": that part of train.py --heads
    grid: tuple     # () for the threshold: read off the val eval itself, no extra pass
    choose: object
    rule: str


CALIBRATION = {  # in the order they are chosen: each choice stays set while the next is swept
    "threshold": Knob("rec_threshold", "", (), None, "best REC F1 on val"),
    "copy": Knob("copy_bias", "heads", COPY_BIASES, choose_copy_bias, "best R@1 on val, R@10 and fresh R@10 guarded"),
    "just-named": Knob("just_named_bias", "copy-turns", COPY_BIASES, choose_copy_bias,
                       "best R@1 on val, R@10 and fresh R@10 guarded"),
    "text": Knob("text_prior", "assoc", TEXT_PRIORS, choose_text_prior, "best R@10 on val, fresh R@10 guarded"),
}


def check_knobs(s: Session, names: list[str], assignments: list[str]):
    """The knobs to calibrate (names) or set (NAME=VALUE assignments) that need a part of the heads this
    checkpoint lacks: one line naming the flag."""
    heads = s.model.heads
    lacks = {"heads": heads is None, "copy-turns": not (heads is not None and heads.turns),
             "assoc": not (heads is not None and heads.items)}
    hint = {"heads": "no heads (train.py --heads)", "copy-turns": "no turn buckets in its copy head (train.py --heads "
            "copy-turns=1)", "assoc": "no association head (train.py --heads assoc=1)"}
    for name, knob in CALIBRATION.items():
        typed = [kv for kv in assignments if kv.partition("=")[0] == name]
        if lacks.get(knob.needs) and (name in names or typed):
            flag = f"--calibrate {name}" if name in names else f"--knob {typed[0]}"
            raise ValueError(f"{flag}: this checkpoint has {hint[knob.needs]}")


def calibrate(s: Session, ds: dict, names: list[str], res: dict, beam: int, max_dialogs: int = 0, batch: int = 8) -> dict:
    """Choose the knobs `names` (keys of CALIBRATION) on the validation split, res being the val eval
    at the session's knobs: the threshold is read off res, the others take one ranking pass on val per
    value of their grid. Each choice stays set on the session (s.use) for the next. Returns what
    calibration.json saves: each field, its grid (FIELD_grid), and for the threshold the val intent."""
    saved, base = {}, (s.knobs, res)  # base: an eval already run, and the knobs it ran with
    for name, knob in CALIBRATION.items():
        if name not in names:
            continue
        if not knob.grid:
            saved["rec_threshold"], saved["val"] = res["intent_best_threshold"], res["intent_at_best_threshold"]
            s.use(replace(s.knobs, rec_threshold=res["intent_best_threshold"]))
        else:
            grid = {}
            for v in knob.grid:
                knobs = replace(s.knobs, **{knob.field: v})
                s.use(knobs)
                r = base[1] if knobs == replace(base[0], rec_threshold=knobs.rec_threshold) else \
                    evaluate(s, ds, "val", beam, max_dialogs, 0, batch=batch)
                grid[v] = {"recall@1": r["model"]["recall@1"], "recall@10": r["model"]["recall@10"],
                           "fresh_recall@10": r["fresh"]["model"]["recall@10"]}
                print(f"{name} {v}: val R@1 {grid[v]['recall@1']:.4f} R@10 {grid[v]['recall@10']:.4f} "
                      f"fresh R@10 {grid[v]['fresh_recall@10']:.4f}")
            saved[knob.field], saved[knob.field + "_grid"] = knob.choose(grid), grid
            s.use(replace(s.knobs, **{knob.field: saved[knob.field]}))
        print(f"{knob.field} {saved[knob.field]} ({knob.rule})")
    return saved


def progress(it, desc: str):
    """A progress bar on stderr, redrawn rarely when stderr is a log file."""
    return tqdm(it, desc=desc, dynamic_ncols=True, file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 30)


def score_all(s: Session, turns: list, beam: int, batch: int, split: str) -> dict:
    """(dialog id, turn) -> (p(REC) after "Assistant:", log-probs of the response, units, top) for
    every turn, `batch` at a time: REC and CHAT turns apart (only REC turns search items), each sorted
    by the length of its prompt so that little padding is needed."""
    examples = {}  # (dialog id, turn) -> (ids, P): P = tokens up to and including "Assistant:"
    contexts = {(d["id"], t): d["turns"][:t] for d, t in turns}
    for d, t in turns:
        ids, targets = s.rd.example(d["turns"][:t], d["turns"][t])
        examples[(d["id"], t)] = ids, next(i for i, x in enumerate(targets) if x != -1) + 1
    scored = {}
    for rec_turns in (True, False):
        keys = sorted(((d["id"], t) for d, t in turns if bool(d["turns"][t]["items"]) == rec_turns),
                      key=lambda k: examples[k][1])
        for a in progress(range(0, len(keys), batch), f"eval {split} ({'REC' if rec_turns else 'CHAT'} turns)"):
            chunk = keys[a:a + batch]
            mixture = s.mixture([contexts[k] for k in chunk]) if rec_turns else None
            scored.update(zip(chunk, score_turns(s, [examples[k] for k in chunk], beam if rec_turns else 0, mixture)))
    return scored


def rank_pass(s: Session, ds: dict, dialogs: list, turns: list, scored: dict, beam: int,
              rankings: str | None = None, samples=None) -> dict:
    """The ranking metrics of the model's beam lists and of the baselines, on the same samples: the
    standard and the fresh protocol, and diagnostics (cold items, distinct top-1s, coverage)."""
    catalogue = [it["id"] for it in ds["items"]]
    # the baselines count what the model was trained on (train, or train+val with --train-splits)
    splits, sequences = s.config["train"].get("train_splits", "train"), bool(s.config["train"].get("item_sequences", 1))
    seen = training_dialogs(ds, splits, sequences)
    pop, cooc = Popularity(seen, catalogue), CoOccurrence(seen, catalogue)
    # the decay depends only on the data: chosen once per dataset, not again on every calibration pass
    key = (ds["meta"].get("fingerprint"), splits, sequences)
    decay = _DECAYS[key] if key in _DECAYS else recency_decay(ds, seen, catalogue)
    if key[0] is not None:
        _DECAYS[key] = decay
    recent = CoOccurrence(seen, catalogue, decay)
    trained_targets = {i for d in seen for turn in d["turns"] if turn["role"] == "assistant" for i in turn["items"]}
    has_oracle = any("oracle" in t for d in dialogs for t in d["turns"])
    methods = ["model", "popularity", "repeat", "repeat+pop", "cooc", "repeat+cooc", "cooc-recency",
               "repeat+cooc-recency"] + (["oracle"] if has_oracle else [])
    golds_by_turn = {}
    for d, t, gold, fresh in (rec_samples(dialogs) if samples is None else samples):
        golds_by_turn.setdefault((d["id"], t), []).append((gold, fresh))
    ranks = {m: [] for m in methods}
    fresh_flags, cold_flags, top_lists, ranking_rows = [], [], {m: [] for m in methods}, []
    top1_in_context, gates = {m: [] for m in methods}, []
    for d, t in turns:
        turn, context = d["turns"][t], d["turns"][:t]
        if not turn["items"]:
            continue
        top, gate = scored[(d["id"], t)][3:]
        lists = {"model": [i for i, _ in top], "popularity": pop.rank(context), "repeat": repeat_context(context),
                 "repeat+pop": repeat_then(context, pop), "cooc": cooc.rank(context),
                 "repeat+cooc": repeat_then(context, cooc), "cooc-recency": recent.rank(context),
                 "repeat+cooc-recency": repeat_then(context, recent)}
        if has_oracle:
            lists["oracle"] = turn.get("oracle", [])
        for gold, fresh in golds_by_turn[(d["id"], t)]:
            for m in methods:
                ranks[m].append(rank_of(lists[m], gold))
            fresh_flags.append(fresh)
            cold_flags.append(gold not in trained_targets)
            ranking_rows.append({"dialog": d["id"], "turn": t, "gold": gold, "fresh": fresh,
                                 "rank": ranks["model"][-1], "top": [[i, lp] for i, lp in top],
                                 "baselines": {m: ranks[m][-1] for m in methods if m != "model"}})
        in_context = {i for turn in context for i in turn["items"]}
        for m in methods:
            top_lists[m].append(lists[m][:10])
            top1_in_context[m].append(bool(lists[m]) and lists[m][0] in in_context)
        if gate is not None:
            gates.append(gate)
    if rankings:
        os.makedirs(os.path.dirname(os.path.abspath(rankings)), exist_ok=True)
        write_jsonl(rankings, ranking_rows)
    res = {"n_samples": len(fresh_flags), "n_fresh": sum(fresh_flags), "beam": beam, "recency_decay": decay}
    for m in methods:
        res[m] = rank_metrics(ranks[m])
    res["fresh"] = {m: rank_metrics([r for r, f in zip(ranks[m], fresh_flags) if f]) for m in methods}
    # why a model wins or loses: can it recommend items it never saw as a target, and how many
    # different items does it recommend at all (a model stuck on a few popular IDs shows here)?
    res["diagnostics"] = {
        "cold_share": sum(cold_flags) / max(len(cold_flags), 1),
        "recall@10_cold": {m: rank_metrics([r for r, c in zip(ranks[m], cold_flags) if c])["recall@10"] for m in methods},
        "recall@10_warm": {m: rank_metrics([r for r, c in zip(ranks[m], cold_flags) if not c])["recall@10"] for m in methods},
        "top1_distinct": {m: len({x[0] for x in top_lists[m] if x}) for m in methods},
        "coverage@10": {m: len({i for x in top_lists[m] for i in x}) / len(catalogue) for m in methods},
        # how often the first item is one the dialog already named (per REC turn), and the copy head's gate
        "top1_in_context": {m: sum(v) / max(len(v), 1) for m, v in top1_in_context.items()},
        "copy_gate_mean": sum(gates) / len(gates) if gates else None}
    return res


def standardized_redial(raw_test: str, dialogs: list[dict]) -> list[tuple]:
    """The standardized ReDial protocol (Kostric & Balog, SIGIR 2026) as eval samples (dialog, turn, gold,
    fresh): one instance per recommender *message* (consecutive messages not merged) that names a movie
    (an @ID of its conversation's movieMentions) and has an earlier message; its targets are the distinct
    movies it names, fresh = named in no earlier message. nanocrs merges consecutive messages into turns,
    so each target is ranked with the list of the merged turn that holds its message, from that turn's
    context: never more than the instance's own context, and so never a look at its own targets."""
    from nanocrs.datasets import Skip, clean
    by_id = {d["id"]: d for d in dialogs}
    samples = []
    for n, rec in read_jsonl(raw_test):
        where = f"{raw_test}:{n}"
        try:
            cid, msgs, recommender = str(rec["conversationId"]), rec["messages"], rec["respondentWorkerId"]
            mentions = rec.get("movieMentions") or {}
            mentions = mentions if isinstance(mentions, dict) else {}
            senders = [m["senderWorkerId"] for m in msgs]
            texts = [m["text"] for m in msgs]
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: not a raw ReDial record ({e})") from None
        d, named, turn, role = by_id.get(f"redial-{cid}"), set(), -1, None
        for k, (sender, text) in enumerate(zip(senders, texts)):
            movies = list(dict.fromkeys(i for i in re.findall(r"@(\d+)", text or "") if i in mentions))
            try:
                empty = not clean(text)
            except Skip:
                empty = True
            if not empty and sender != role:  # a new merged turn, counted as data_prep merges them
                turn, role = turn + 1, sender
            if sender == recommender and k > 0 and movies:
                if d is None or empty or d["turns"][turn]["role"] != "assistant" or \
                        not set(movies) <= set(d["turns"][turn]["items"]):
                    raise DataError(f"{where}: message {k} of conversation {cid} has no recommender turn in the "
                                    "prepared test split (prepare it again from this file)")
                samples += [(d, turn, m, m not in named) for m in movies]
            named.update(movies)
    return samples


_DECAYS = {}  # (dataset fingerprint, train splits, item sequences) -> the decay val chose


def recency_decay(ds: dict, seen: list[dict], catalogue: list[str]) -> float:
    """The recency-weighted co-occurrence baseline's decay: the grid value with the best fresh R@10 on
    the val split (ties: the larger decay, the plainer ranker), whatever split is being evaluated."""
    samples = [(d["turns"][:t], gold) for d, t, gold, fresh in rec_samples(ds.get("val", [])) if fresh]
    if not samples:
        return 1.0
    best = (-1.0, 0.0)
    for decay in RECENCY_DECAYS:
        ranker = CoOccurrence(seen, catalogue, decay)
        r10 = sum(0 < rank_of(ranker.rank(ctx, 10), gold) for ctx, gold in samples) / len(samples)
        best = max(best, (r10, decay))
    return best[1]


@torch.no_grad()
def dialog_pass(s: Session, turns: list, scored: dict, max_gen: int, max_new_tokens: int, split: str) -> dict:
    """The free-mode intent, the gold responses' perplexity, and on every k-th turn (about max_gen in
    all) a response generated greedily with the gold mode forced: BLEU, Distinct-n and, on REC turns,
    target-prediction accuracy and faithfulness."""
    gen_every = max(1, len(turns) // max_gen) if max_gen else 0
    p_rec, is_rec = [], []  # free-mode intent: p(REC) / (p(REC) + p(CHAT)) after "Assistant:", and the gold
    nll_total, nll_units, nll_tokens = 0.0, 0, 0
    hyps, refs = [], []
    gen = {"rec_turns": 0, "target_hits": 0, "top1_hits": 0, "faithful": 0}
    for j, (d, t) in enumerate(progress(turns, f"eval {split} (metrics, responses)")):
        turn, context = d["turns"][t], d["turns"][:t]
        rec_p, logps, units, top, _ = scored[(d["id"], t)]
        p_rec.append(rec_p)
        is_rec.append(bool(turn["items"]))
        for lp in logps:  # perplexity of the response: the tokens after <RESP>, an item span one unit
            nll_total -= lp
        nll_units += units
        nll_tokens += len(logps)
        if gen_every and j % gen_every == 0:
            # the gold mode forced, where the training target has one (not under --target resp)
            head = [] if s.rd.target == "resp" else [s.ctrl.mode_rec if turn["items"] else s.ctrl.mode_chat]
            prompt = s.rd.prompt(context, forced=(MODE_REC if turn["items"] else MODE_CHAT) if head else "")
            out = sample(s.model, prompt, s.trie, s.ctrl, max_new_tokens=max_new_tokens, greedy=True, mixture=s.mixture())[0]
            _, target, pieces = s.rd.parse(head + out)
            hyps.append(Renderer.join(pieces, lambda i: " <movie> "))  # each item span one "<movie>" token
            refs.append(replace_spans(turn["text"]))
            if turn["items"]:
                top1 = top[0][0] if top else None
                gen["rec_turns"] += 1
                gen["target_hits"] += int(target in turn["items"])
                gen["top1_hits"] += int(top1 in turn["items"])
                gen["faithful"] += int(target is not None and target in [p[1] for p in pieces if not isinstance(p, str)])
    res = {"intent": intent_metrics(p_rec, is_rec)}  # the plain argmax between the two modes
    if s.knobs.rec_threshold is not None:
        res["intent_calibrated"] = intent_metrics(p_rec, is_rec, s.knobs.rec_threshold)
    res["intent_best_threshold"] = calibrate_intent(p_rec, is_rec)  # on THIS split: only --calibrate on val uses it
    res["intent_at_best_threshold"] = intent_metrics(p_rec, is_rec, res["intent_best_threshold"])
    res["intent_accuracy"] = res["intent"]["accuracy"]
    res["n_intent_turns"] = len(turns)
    n_rec = max(gen["rec_turns"], 1)
    res["dialog"] = {
        # None under --target sid: no response was trained, none is scored
        "perplexity": perplexity(nll_total, nll_units) if nll_units else None, "ppl_units": nll_units,
        "perplexity_per_token": perplexity(nll_total, nll_tokens) if nll_tokens else None, "ppl_tokens": nll_tokens,
        "bleu": corpus_bleu(hyps, refs) if hyps else 0.0, "n_generated": len(hyps),
        "distinct_ratio": {n: distinct_ratio(hyps, n) for n in (1, 2, 3, 4)},
        "distinct_per_sentence": {n: distinct_per_sentence(hyps, n) for n in (1, 2, 3, 4)},
        # Distinct-n grows as the corpus shrinks: the gold responses of the same turns are the yardstick
        "gold_distinct_ratio": {n: distinct_ratio(refs, n) for n in (1, 2, 3, 4)},
        "target_accuracy": gen["target_hits"] / n_rec, "beam_top1_accuracy": gen["top1_hits"] / n_rec,
        "faithfulness": gen["faithful"] / n_rec, "n_generated_rec_turns": gen["rec_turns"]}
    return res


@torch.no_grad()
def score_turns(s: Session, examples: list, beam: int = 0, mixture=None) -> list:
    """One left-padded forward of several turns, each (ids of context + "Assistant:" + the gold turn,
    P = tokens up to and including "Assistant:") -> per turn (p(REC) / (p(REC) + p(CHAT)) after "Assistant:",
    log-probs of the response tokens after <RESP>, the response's units with each item span one
    unit, and with beam > 0, REC turns only, the ranked [(item, log-prob)] of the beam search and,
    with heads, their gate g at the slot). mixture: the slot mixture of these turns (Session.mixture), or None.
    The rows are padded so that every <BOI> (token P + 1) is at the same slot: rewound to just after
    it, the cache holds each row's prompt up to <MODE=REC><BOI>, exactly how the gold REC turn begins,
    and the beam search continues all rows at once. The gold tokens after that slot are simply
    forgotten; causal attention kept them out of everything before it."""
    device, resp = s.device, s.ctrl.resp
    A = max(P for _, P in examples) + 1                # the shared slot of <BOI>
    pads = [A - (P + 1) for _, P in examples]
    T = max(p + len(ids) for p, (ids, _) in zip(pads, examples))
    # (B, T); filler on the left is masked (pad), on the right it comes after the row's last token
    x = torch.full((len(examples), T), s.ctrl.eot, dtype=torch.long)
    for r, (p, (ids, _)) in enumerate(zip(pads, examples)):
        x[r, p:p + len(ids)] = torch.tensor(ids)
    pad = torch.tensor(pads, device=device)
    cache = s.model.new_cache(len(examples), T, pad=pad if max(pads) else None)
    logits, h = s.model(x.to(device), cache=cache, return_hidden=mixture is not None)  # (B, T, V), (B, T, C)
    out = []
    for r, (p, (ids, P)) in enumerate(zip(pads, examples)):
        row = logits[r, p:p + len(ids)]               # (len(ids), V): this turn's own positions
        k = ids.index(resp, P) + 1 if resp in ids[P:] else len(ids)  # --target sid: no response to score
        logps = torch.log_softmax(row[k - 1:-1].float(), -1).gather(
            1, torch.tensor(ids[k:], device=device)[:, None])[:, 0].tolist()
        units, in_span = 0, False
        for tok in ids[k:]:
            in_span = in_span or tok == s.ctrl.boi
            if not in_span or tok == s.ctrl.eoi:
                units += 1
                in_span = False
        two = row[P - 1, [s.ctrl.mode_rec, s.ctrl.mode_chat]].float().softmax(-1)  # free-mode intent
        out.append([two[0].item(), logps, units, None, None])
    if beam and s.rd.target in ("mode-resp", "resp"):  # no item slot: the first <BOI> the model writes
        for o, top in zip(out, rank_from_text(s, [ids[:P] for ids, P in examples], beam)):
            o[3] = top
    elif beam:
        for ids, P in examples:
            assert ids[P:P + 2] == [s.ctrl.mode_rec, s.ctrl.boi]
        cache.pos = A + 1  # rewind to just after <MODE=REC><BOI>
        # the mixture reads the states up to the slot, <BOI> at slot A of every row
        mix = mixture(h, x.tolist(), [A] * len(examples)) if mixture is not None else None
        tops = beam_search_batch(s.model, [ids[:P + 2] for ids, P in examples], s.trie, s.ctrl, beam,
                                 prefilled=(cache, logits[:, A], mix))
        for r, (o, top) in enumerate(zip(out, tops)):
            o[3] = top
            if mix is not None:
                o[4] = float(mix[0][r].exp())  # the heads' gate g at the slot (0: no item in the context)
    return out


def rank_from_text(s: Session, prompts: list[list[int]], beam: int, max_text: int = 48) -> list:
    """The ranked lists of a model trained without the item slot (train.py --target mode-resp or resp, the
    paper's Table 4): after "Assistant:" and the head that target always writes (<MODE=REC><RESP>, or
    <RESP>), the model writes its response greedily until it opens an item span, and the trie's beam
    search ranks from that <BOI>. A response that ends, or runs max_text tokens, without one gets <BOI>
    where it stopped, so every sample has a list."""
    c = s.ctrl
    head = [c.mode_rec, c.resp] if s.rd.target == "mode-resp" else [c.resp]
    keep = s.model.config.block_size - max_text - 16  # room for the response and the item's tokens
    starts = []
    for p in prompts:
        p = (p + head)[-keep:]
        out = sample(s.model, p, s.trie, c, max_new_tokens=max_text, greedy=True, stop={c.boi, c.eot})[0]
        out = out[:-1] if out and out[-1] in (c.boi, c.eot) else out
        starts.append(p + out + [c.boi])
    return beam_search_batch(s.model, starts, s.trie, c, beam)


def print_eval(res: dict):
    keys = ["recall@1", "recall@5", "recall@10", "recall@20", "recall@50", "ndcg@10", "mrr@10"]
    methods = [m for m in ("model", "popularity", "repeat", "repeat+pop", "cooc", "repeat+cooc", "cooc-recency",
                           "repeat+cooc-recency", "oracle") if m in res]
    name = "standardized protocol (one instance per recommender message)" if res.get("protocol") == "standardized" \
        else "standard protocol"
    print(f"\n{name}: {res['n_samples']} samples ({res['split']}), beam {res['beam']}")
    print(format_table({m: res[m] for m in methods}, keys))
    print(f"\nfresh protocol (gold not mentioned earlier): {res['n_fresh']} samples")
    print(format_table({m: res["fresh"][m] for m in methods}, keys))
    dg = res["diagnostics"]
    print(f"\ngold items never a training target: {dg['cold_share']:.1%} of samples. "
          "recall@10 on those / on the others, distinct top-1 items, share of the catalogue in some top-10, "
          "share of REC turns whose top-1 the dialog already named:")
    for m in methods:
        print(f"  {m:<13} {dg['recall@10_cold'][m]:.4f} / {dg['recall@10_warm'][m]:.4f}   "
              f"{dg['top1_distinct'][m]:5d}   {dg['coverage@10'][m]:.4f}   {dg['top1_in_context'][m]:.4f}")
    if dg.get("copy_gate_mean") is not None:
        print(f"copy head: mean gate g {dg['copy_gate_mean']:.4f} at the REC slot (copy bias {res.get('copy_bias', 0.0)}, "
              f"just-named bias {res.get('just_named_bias', 0.0)}, text prior {res.get('text_prior', 0.0)})")
    dm = res["dialog"]
    for key, what in (("intent", "argmax"), ("intent_calibrated", "threshold from val")):
        if key in res:
            im = res[key]
            print(f"\nfree-mode intent ({what}, p(REC) >= {im['threshold']:.3f}): accuracy {im['accuracy']:.4f}, "
                  f"REC precision {im['rec_precision']:.4f} recall {im['rec_recall']:.4f} "
                  f"over {im['n_turns']} assistant turns ({im['n_rec']} REC)")
    if dm["perplexity"] is not None:
        print(f"dialog: perplexity {dm['perplexity']:.3f} with each item span as one unit ({dm['ppl_units']} units), "
              f"{dm['perplexity_per_token']:.3f} per token ({dm['ppl_tokens']} tokens), gold responses")
    print(f"BLEU {dm['bleu']:.2f} (SacreBLEU-compatible, {dm['n_generated']} generated responses, mode forced)")
    print(f"distinct-1..4 ratio (paper) on those {dm['n_generated']} responses: "
          + " ".join(f"{dm['distinct_ratio'][n]:.4f}" for n in (1, 2, 3, 4))
          + " | the gold responses of the same turns: " + " ".join(f"{dm['gold_distinct_ratio'][n]:.4f}" for n in (1, 2, 3, 4))
          + " | per sentence (CRSLab): " + " ".join(f"{dm['distinct_per_sentence'][n]:.3f}" for n in (1, 2, 3, 4)))
    print(f"on {dm['n_generated_rec_turns']} generated REC turns: target-prediction accuracy {dm['target_accuracy']:.4f} "
          f"(greedy item after <BOI>) vs beam top-1 {dm['beam_top1_accuracy']:.4f}; "
          f"faithfulness {dm['faithfulness']:.4f} (response mentions the predicted item)")
