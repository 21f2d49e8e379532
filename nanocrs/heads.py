"""
The recommendation slot's heads, all in one place: an opt-in hybrid beside the plain generative
recommender (GCRS), which is the language model alone writing an item's semantic ID.

The socket has three parts; nothing else in the codebase knows what the heads are:
    HeadsConfig                saved in the checkpoint's config.json ("heads"); train.py --heads SPEC
    Heads.loss                 the per-token loss of the model's final states (GPT.forward calls it)
    Heads.mixture(...)         the slot mixture the decoders ask for at a <MODE=REC><BOI> slot
                               (nanocrs/generate.py: beam search and the sampler take it as a callable)
The decoding knobs arrive as one value, Knobs (nanocrs/session.py); none is set on the model.

    heads = Heads(n_embd, HeadsConfig.parse("redial", ctrl, items=len(trie.item_ids)))
    model = GPT(cfg, heads=lambda n: heads)           # GPT.forward(idx, targets) then trains them
    top = beam_search_batch(model, prompts, trie, ctrl, 50, mixture=heads.mixture(trie, tt, knobs))

The copy head (the slot points back at an item the dialog named). Recommenders often name again an item
the dialog already named, and a model that writes IDs token by token copies a multi-token span only part
of the time: the copy head makes copying one decision. At the REC slot (the position of the <BOI> right
after <MODE=REC>, whose output predicts the first SID token) the item distribution is a mixture

    P(item) = (1 - g) P_gen(item) + g P_copy(item)
    P_gen   = the language model's own product of SID-token probabilities (what it was before)
    P_copy  = softmax over the context's item spans j of  q(h_slot) . k(h_eoi_j) / sqrt(d) + r[recency_j]
              summed over the spans that name that item
    g       = sigmoid(w . h_slot + b)

with h the final hidden states: h_slot at the slot, h_eoi_j at the <EOI> that closes context span j
(where the model has read the whole ID and everything said before it), and r one learned bias per
recency rank (0 = the latest span). It is a pointer network over item spans (as in pointer-generator
models), written as exact per-token conditionals so that the rest of the code stays token based:
with P_mix(prefix) = (1 - g) P_gen(prefix) + g P_copy(items under prefix),

    P(s_l | s_<l) = P_mix(s_1..s_l) / P_mix(s_1..s_l-1),    P_mix(empty prefix) = 1,

whose product over a span is P(item). Training minimises these per-token losses (they replace the
plain cross-entropy on the slot's SID tokens); beam search ranks by P_mix of the prefix (an upper
bound of every completion, so pruning stays sound, and exactly P(item) at a leaf); the sampler draws
the next SID token from the same conditionals. A context without item spans gives g = 0: the model
is then exactly the plain language model.

The association head (spec "items" = the catalogue size, --heads assoc=1) adds a third component:
one learned row per catalogue item, scored against the slot,

    P(item)   = w_gen P_gen(item) + w_copy P_copy(item) + w_assoc P_assoc(item)
    P_assoc   = softmax over all items n of  a(h_slot) . e_n / sqrt(d) + c_n
    w         = softmax(0, z_copy, z_assoc)       (z_copy = -inf when the context names no item)

Why: a row per item stores "seekers who name X get Y" directly, as co-occurrence counts do, where a
small model must spell each association out through shared SID tokens. It is the same mixture as above
with g = w_copy + w_assoc and P_copy replaced by (w_copy P_copy + w_assoc P_assoc) / g, so training,
beam search and the sampler need nothing new. One change to training: on the slot's SID tokens the plain
language model's own cross-entropy is added to the mixture's, because a head that fits the training set
closely otherwise takes the gate and the SID path stops learning (docs/results.md). Training needs the
catalogue (Heads.bind); decoding is handed it (mixture's trie), in the same order: the rows are
SIDTrie.item_ids.

With item_context (--heads assoc=2) the head's query also reads the items the dialog named:

    P_assoc   = softmax over all items n of  (a(h_slot) + sum_j u[item_j]) . e_n / sqrt(d) + c_n

one learned input row u per item (zero at the start, so the head begins as without), summed over the
context's item spans j. Why: co-occurrence adds up the evidence of every named item, while the
slot's state has to squeeze all of them through one vector; the sum gives each named item its own
say (u_j . e_n) beside what the words ask for (a(h_slot) . e_n). assoc-init=counts starts u, e and c
from the training co-occurrences: at step 0 the head is naive Bayes on the counts (init_from_counts).

Repeats are the copy head's (--heads assoc-fresh=1): P_assoc ranks only the items the context has not
named, in training and in decoding. Why: started from the counts, the head scores a named item through
its own row (a low-rank PMI gives an item a large association with itself) and through the other named
items, with no sense of which came last, while the copy head has recency (without the split the model's
top item was often a context item, seldom the latest one a repeat names). Split this way the gate learns
how often recommenders repeat, the copy head which item, and the association head which new item.

Item sequences name each item once (--heads distinct-sequences=1). An item-sequence dialog (ReDial's E19
lists, data.py "items_only") is a list of distinct items, so at its slots a repeat can not happen by
construction: scored plainly they teach the gate that recommenders never repeat (in ReDial they hold
most of the training slots and none of the repeats). Those slots are scored by the conditional given
"not an item of the context" instead: no copy component, and P_assoc renormalised over the items the
context did not name. The SID path's own mass on the context's items stays in. A slot is an item-
sequence slot when its <EOI> is not followed by <RESP> (Renderer.turn_ids renders an items-only
assistant turn so).

Turn-aware copying (--heads copy-turns=1): each context span gets a turn bucket, who named it
(seeker or recommender) and how many recommender turns lie between it and the slot (0, 1, 2 or more),
and the head learns one bias per bucket in two places: in the copy attention (beside the recency bias,
which counts spans, not turns) and in the copy gate, read off the latest span's bucket,

    z_copy = w . h_slot + b + t_gate[turn(latest span)],    s_j += t_attn[turn(span j)]

both zero at the start (the head begins as without). Why: in ReDial a recommender repeats the seeker's
latest item far more often when the seeker named it in the turn just before the slot, the one case
where putting the repeat first pays at R@1, and the slot's state does not carry "an item was just
named" (docs/results.md). The
buckets come from the token ids alone (turn_bucket: <MODE=...> opens a recommender turn, <EOT> closes
it), the same in training and decoding.

The decoding knobs (nanocrs/session.py Knobs, chosen on val by sample.py --calibrate, never seen in
training). copy_bias is added to the copy gate's logit z_copy: the copy head's odds against the other
components grow by exp(copy_bias) and nothing else moves. Why: the training loss spreads a turn's mass
over all its golds, while R@1 ranks the one item put first. just_named_bias (needs the turn buckets):
where the latest context item is the seeker's, named in the turn just before the slot (bucket 0), it is
added to z_copy and to the copy attention's scores of the bucket-0 spans; slots in any other bucket do
not move. Why: there the copy of that item is calibrated but the best new item's probability is well
above its hit rate, so the new item comes first although the repeat is the likelier gold; the gate alone
would spread its extra mass over every named item and push new ones out of the top ten.

A text prior (decoding only, sample.py --eval val --calibrate text): tau * cos(E(context), E(item)),
the frozen sentence encoder's match between the dialog's last turns and each item's text, is added to
the association head's scores (assoc_probs's prior; TextPrior below says why). The gate
and the other components do not move, so named items keep their copy mass (with assoc_fresh) and
beam search, the sampler and the exact conditionals need nothing new. tau = 0 is the model as trained.
"""

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanocrs.data import MENTION, DataError

RECENCY = 16      # context spans further back than this share the last recency bias
TINY = 1e-30      # floor of P_copy inside a log: log(0) would make the gradient NaN
TEXT_PRIOR_FILE = "text_prior.npz"  # beside a checkpoint: "items" the encoder's item vectors (catalogue order), "encoder"
LAST_TURNS = 2  # the turns the text prior reads: the request is in the latest ones, and older turns blur it


@dataclass
class HeadsConfig:
    """What the heads are, saved as config.json's "heads". train.py --heads takes the first six fields as
    a spec (pointer=64,assoc=2,...) or a preset name; the rest are bound from the tokenizer and catalogue."""
    pointer: int = 64                 # the copy head's attention size
    assoc: int = 0                    # 0: no association head, 1: one row per item, 2: its query reads the context's items
    assoc_init: str = "zero"          # "counts": start the association head from the co-occurrences (needs assoc=2)
    assoc_fresh: bool = False         # the association head ranks only the items the context has not named
    distinct_sequences: bool = False  # item-sequence slots scored given "no repeat"
    copy_turns: bool = False          # one copy bias per turn bucket, in the attention and the gate
    items: int = 0                    # the association head's rows: the catalogue size (0 without it)
    boi: int = -1                     # the control tokens' ids in the model's tokenizer
    eoi: int = -1
    mode_rec: int = -1
    mode_chat: int = -1
    eot: int = -1
    resp: int = -1

    SPEC = ("pointer", "assoc", "assoc_init", "assoc_fresh", "distinct_sequences", "copy_turns")

    def __post_init__(self):
        if self.pointer < 1:
            raise ValueError(f"--heads: pointer={self.pointer}: the copy head's size must be at least 1")
        if self.assoc not in (0, 1, 2):
            raise ValueError(f"--heads: assoc={self.assoc}: 0 (none), 1 (the association head) or 2 (reading the context's items)")
        if self.assoc_init not in ("zero", "counts"):
            raise ValueError(f"--heads: assoc-init={self.assoc_init}: zero or counts")
        if self.assoc_init == "counts" and self.assoc != 2:
            raise ValueError("--heads: assoc-init=counts factorises item-to-item counts: it needs assoc=2")
        if self.assoc_fresh and not self.assoc:
            raise ValueError("--heads: assoc-fresh=1 changes what the association head ranks: it needs assoc=1 or 2")

    @classmethod
    def parse(cls, spec: str, ctrl=None, items: int = 0) -> "HeadsConfig | None":
        """--heads: "" or "none" (no heads), a preset name, or key=value pairs (dashes or underscores);
        bound to the control ids of ctrl and, with the association head, to a catalogue of `items`."""
        spec = PRESETS.get(spec, spec)
        if spec in ("", "none"):
            return None
        kw = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in cls.SPEC or not value:
                raise ValueError(f"--heads: {part!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(k.replace('_', '-') for k in cls.SPEC)} (or a preset: {', '.join(PRESETS)})")
            try:
                kw[key] = value if key == "assoc_init" else int(value)
            except ValueError:
                raise ValueError(f"--heads: {part!r}: {key.replace('_', '-')} takes an integer") from None
        cfg = cls(**{k: bool(v) if isinstance(cls.__dataclass_fields__[k].default, bool) else v for k, v in kw.items()})
        return cfg.bind(ctrl, items) if ctrl is not None else cfg

    def bind(self, ctrl, items: int) -> "HeadsConfig":
        """This config with the control ids of `ctrl` and, with the association head, `items` rows."""
        ids = dict(boi=ctrl.boi, eoi=ctrl.eoi, mode_rec=ctrl.mode_rec, mode_chat=ctrl.mode_chat, eot=ctrl.eot, resp=ctrl.resp)
        return HeadsConfig(**{**asdict(self), **ids, "items": items if self.assoc else 0})

    def spec(self) -> str:  # the --heads spec of this config
        return ",".join(f"{k.replace('_', '-')}={int(getattr(self, k)) if k not in ('assoc_init',) else self.assoc_init}"
                        for k in self.SPEC)

    @classmethod
    def from_config(cls, config: dict) -> "HeadsConfig | None":
        """The heads of a checkpoint's config.json, or None; before issue 30 they were the model config's
        "pointer" spec (the copy head's size and control ids) and train.py's flags."""
        if config.get("heads"):
            return cls(**config["heads"])
        old = config.get("model", {}).get("pointer")
        if not old:
            return None
        turns = old.get("turns") or [-1, -1, -1]
        return cls(pointer=old["dim"], assoc=2 if old.get("item_context") else int(bool(old.get("items"))),
                   assoc_init=config.get("train", {}).get("assoc_init", "zero"), assoc_fresh=bool(old.get("assoc_fresh")),
                   distinct_sequences="distinct_sequences" in old, copy_turns="turns" in old, items=old.get("items", 0),
                   boi=old["boi"], eoi=old["eoi"], mode_rec=old["mode_rec"], mode_chat=turns[1], eot=turns[2],
                   resp=old.get("distinct_sequences", -1))


# each chosen on val over three seeds (docs/results.md)
PRESETS = {"redial": "pointer=64,assoc=2,assoc-init=counts,assoc-fresh=1,distinct-sequences=1,copy-turns=1",
           "inspired": "pointer=64,assoc=1"}


def find_spans(ids: list[int], boi: int, eoi: int, end: int | None = None) -> list[tuple[int, int]]:
    """(position of <BOI>, position of <EOI>) of every complete item span in ids[:end]. A span cut
    open by left truncation (an <EOI> with no <BOI>) or still open at `end` is not a span."""
    spans, start = [], None
    for p, t in enumerate(ids[:end]):
        if t == boi:
            start = p
        elif t == eoi and start is not None:
            spans.append((start, p))
            start = None
    return spans


TURN_BUCKETS = 6  # (seeker, recommender) x (0, 1, 2+ recommender turns between the span and the slot)


def turn_state(ids: list[int], opens: tuple[int, int], close: int) -> list[tuple[int, bool]]:
    """For every position p of ids: (the recommender turns opened in ids[:p], whether p is inside one),
    where a <MODE=...> in `opens` opens a recommender turn and the <EOT> `close` ends it."""
    count, inside, state = 0, False, []
    for t in ids:
        state.append((count, inside))
        if t in opens:
            count, inside = count + 1, True
        elif t == close:
            inside = False
    return state


def turn_bucket(state, start: int, slot: int) -> int:
    """The turn bucket of the span whose <BOI> is at `start`, seen from the REC slot whose <BOI> is at
    `slot` (state: turn_state of the ids): 3 * (the span is inside a recommender turn) + the recommender
    turns opened after it, capped at 2, not counting the slot's own <MODE=REC> at slot - 1. The seeker's
    item in the turn just before the slot is bucket 0; one of the recommender's own last turn is 3."""
    assert start < slot - 1, "a context span lies before the slot's <MODE=REC>"
    return 3 * state[start][1] + min(state[slot - 1][0] - state[start][0], 2)


class Heads(nn.Module):
    def __init__(self, n_embd: int, cfg: HeadsConfig):
        super().__init__()
        assert min(cfg.boi, cfg.eoi, cfg.mode_rec) >= 0, "the heads read control tokens: HeadsConfig.bind first"
        self.config = cfg
        self.boi, self.eoi, self.mode_rec, self.dim = cfg.boi, cfg.eoi, cfg.mode_rec, cfg.pointer
        self.q = nn.Linear(n_embd, self.dim, bias=False)
        self.k = nn.Linear(n_embd, self.dim, bias=False)
        self.gate = nn.Linear(n_embd, 1)
        self.recency = nn.Parameter(torch.zeros(RECENCY))
        self.items = cfg.items
        if self.items:  # the association head: a query, one row and one bias per item, its own gate
            self.qa = nn.Linear(n_embd, self.dim, bias=False)
            self.item_emb = nn.Embedding(self.items, self.dim)
            self.item_bias = nn.Parameter(torch.zeros(self.items))
            self.gate_assoc = nn.Linear(n_embd, 1)
        self.item_context = cfg.assoc == 2
        if self.item_context:  # one input row per item, summed over the context's items (zero: starts as without)
            self.item_in = nn.Parameter(torch.zeros(self.items, self.dim))
        self.resp = cfg.resp if cfg.distinct_sequences else None  # None: every slot scored plainly
        self.assoc_fresh = cfg.assoc_fresh  # P_assoc leaves out the context's items
        self.turns = [cfg.mode_rec, cfg.mode_chat, cfg.eot] if cfg.copy_turns else None  # the ids that open and close a turn
        if self.turns:  # one bias per turn bucket in the copy attention and in the gate (zero: starts as without)
            self.turn_attn = nn.Parameter(torch.zeros(TURN_BUCKETS))
            self.turn_gate = nn.Parameter(torch.zeros(TURN_BUCKETS))
        self.catalogue = None  # (SIDTrie, item_path (items, depth), nodes): what training needs (bind)

    def turn_state(self, ids: list[int]):
        """turn_state with this head's control ids."""
        return turn_state(ids, (self.turns[0], self.turns[1]), self.turns[2])

    def bind(self, trie, tt):
        """Give the association head the catalogue for training: trie (nanocrs.generate.SIDTrie) and its
        TrieTensors, whose item order is the order of the head's rows."""
        assert len(trie.item_ids) == self.items, f"the head has {self.items} item rows, the catalogue {len(trie.item_ids)}"
        self.catalogue = (trie, tt.item_path, tt.child_tok.shape[0])

    @torch.no_grad()
    def init_from_counts(self, warm, left, right, popularity):
        """Start the association head from the training co-occurrences (--heads assoc-init=counts):
        warm (W,) item rows, left and right (W, dim) a factorisation left @ right.T of their positive PMI
        (nanocrs.encoder.ppmi_factors), popularity (items,) how often each item was recommended. Then
        item_in[j] . item_emb[n] / sqrt(dim) = PMI(j, n) and item_bias = log(1 + popularity), so at
        step 0 (the query a(h_slot) starts near zero) the head scores item n after the context's items
        j as  log P(n) + sum_j PMI(j, n): naive Bayes on the counts, which training then corrects. Why:
        an item's input row learns only on the slots whose context names it, a few times per run, and
        stays near its zero start (docs/results.md); the counts already hold what it should learn.
        The rows of the items that co-occur with nothing keep their start (item_in's is zero)."""
        assert self.item_context, "the counts' factorisation needs the context rows (assoc=2)"
        scale = self.dim ** 0.25  # the scores divide by sqrt(dim): a quarter power on each side
        rows = torch.as_tensor(warm, dtype=torch.long, device=self.item_in.device)
        self.item_in[rows] = torch.as_tensor(left, dtype=torch.float32, device=rows.device) * scale
        self.item_emb.weight[rows] = torch.as_tensor(right, dtype=torch.float32, device=rows.device) * scale
        self.item_bias.copy_(torch.log1p(torch.as_tensor(popularity, dtype=torch.float32)))

    def count_rows(self) -> list:
        """The parameters assoc-init=counts starts from the counts: weight decay would pull them back
        toward no association at all, so the optimizer leaves them out of it."""
        return [self.item_in, self.item_emb.weight]

    def attend(self, h_slot, h_keys, valid, no_copy=None, turn=None, knobs=None):
        """h_slot (S, C) one query per slot, h_keys (S, J, C) its context spans' <EOI> states, the latest
        last, valid (S, J) bool (spans padded on the left) -> (log g (S,), log(1 - g) (S,), a (S, J),
        b (S,)): the gate, the copy weights over the spans and the association head's weight, as shares
        of g (a.sum(1) + b = 1 wherever g > 0). Without the association head b = 0, and a slot with no
        valid span gets g = 0; no_copy (S,) bool: slots whose copy component is off (the rest renormalises);
        turn (S, J) long: the spans' turn buckets (with copy-turns; padding any bucket); knobs (decoding
        only, nanocrs.session.Knobs; None in training): copy_bias is added to the copy logit z_copy, and
        where the latest span is in bucket 0 just_named_bias is added to z_copy and to the bucket-0
        spans' scores (the calibrated gate for the item the seeker just named)."""
        S, J = valid.shape
        copy_bias, just_named_bias = (knobs.copy_bias, knobs.just_named_bias) if knobs is not None else (0.0, 0.0)
        s = torch.einsum("sd,sjd->sj", self.q(h_slot).float(), self.k(h_keys).float()) / math.sqrt(self.dim)
        rank = (J - 1 - torch.arange(J, device=valid.device)).clamp(max=RECENCY - 1)  # (J,) 0 = latest
        s = s + self.recency[rank]
        if self.turns:
            just_named = turn == 0  # (S, J)
            s = s + self.turn_attn[turn] + just_named_bias * (just_named & just_named[:, -1:])
        s = s.masked_fill(~valid, float("-inf"))
        a = torch.softmax(s.masked_fill(~valid.any(1, keepdim=True), 0.0), -1) * valid  # no NaN rows
        no_copy = ~valid.any(1) if no_copy is None else no_copy | ~valid.any(1)
        z_copy = self.gate(h_slot).float().squeeze(-1) + copy_bias
        if self.turns:  # the latest span (the last column) says whether an item was just named, and by whom
            z_copy = z_copy + self.turn_gate[turn[:, -1]] + just_named_bias * just_named[:, -1]
        z_copy = z_copy.masked_fill(no_copy, float("-inf"))
        z_assoc = (self.gate_assoc(h_slot).float().squeeze(-1) if self.items
                   else torch.full_like(z_copy, float("-inf")))
        log_w = torch.log_softmax(torch.stack([torch.zeros_like(z_copy), z_copy, z_assoc], -1), -1)  # (S, 3)
        log_g = torch.logaddexp(log_w[:, 1], log_w[:, 2])
        ok = log_g > float("-inf")  # (S,); the masked_fill keeps -inf - -inf (NaN) out of the gradient
        share = torch.where(ok[:, None], (log_w[:, 1:] - log_g.masked_fill(~ok, 0.0)[:, None]).exp(), 0.0)  # (S, 2)
        return log_g, log_w[:, 0], a * share[:, :1], share[:, 1]

    def assoc_probs(self, h_slot, ctx_item=None, ctx_ok=None, exclude=None, prior=None):
        """h_slot (S, C) -> P_assoc (S, items), in float32. With item_context the query also sums the
        input rows of the items the context named: ctx_item (S, J) catalogue indices, ctx_ok (S, J)
        bool (False: padding, or a span that names no catalogue item). exclude (S,) bool: those slots'
        P_assoc is renormalised over the items their context did not name. prior (S, items): logits
        added to the scores (decoding's text prior, TextPrior)."""
        query = self.qa(h_slot).float()  # (S, dim)
        if self.item_context:  # every named item adds its own evidence, as each adds its counts to co-occurrence
            query = query + (self.item_in.float()[ctx_item] * ctx_ok[..., None]).sum(1)
        s = query @ self.item_emb.weight.float().T / math.sqrt(self.dim) + self.item_bias.float()
        if prior is not None:
            s = s + prior.to(s.dtype)
        if exclude is not None and bool(exclude.any()):
            named = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ctx_item, ctx_ok & exclude[:, None])
            s = s.masked_fill(named, float("-inf"))
        return torch.softmax(s, -1)

    def assoc_node_mass(self, p, item_path, nodes):
        """P_assoc (S, items) -> (S, nodes) the mass of the items under each trie node (0 at OUT, the
        paths' padding, the last row)."""
        S, (n, depth) = p.shape[0], item_path.shape
        mass = torch.zeros(S, nodes, dtype=p.dtype, device=p.device)
        mass.scatter_add_(1, item_path.reshape(1, -1).expand(S, -1), p[:, :, None].expand(S, n, depth).reshape(S, -1))
        mass[:, -1] = 0.0
        return mass

    # -- training ----------------------------------------------------------------------------------
    def loss(self, x, idx, targets, logits_fn, reduction: str):
        """The per-token losses of GPT.forward with the copy head: x (B, T, C) final hidden states,
        idx and targets (B, T). The plain cross-entropy everywhere, except on the SID tokens of every
        supervised REC slot (<MODE=REC><BOI>...) that has item spans before it, where it is the
        mixture's conditional -log P(s_l | s_<l). logits_fn: (N, C) -> (N, V) logits."""
        B, T, C = x.shape
        t = targets.view(-1)
        rows = (t != -1).nonzero().squeeze(1)                      # (N,) supervised positions, flat
        nll = F.cross_entropy(logits_fn(x.view(-1, C)[rows]).float(), t[rows], reduction="none")  # (N,)
        row_of = torch.full((B * T,), -1, dtype=torch.long, device=x.device)
        row_of[rows] = torch.arange(len(rows), device=x.device)
        ids, sup = idx.tolist(), (targets != -1).tolist()
        slots = []  # (b, slot position, its SID length, [context spans])
        for b in range(B):
            spans = find_spans(ids[b], self.boi, self.eoi)
            for i, (s0, s1) in enumerate(spans):  # without context items only the association head mixes in
                if (i > 0 or self.items) and s0 > 0 and ids[b][s0 - 1] == self.mode_rec and sup[b][s0]:
                    once = self.resp is not None and i > 0 and (s1 + 1 == len(ids[b]) or ids[b][s1 + 1] != self.resp)
                    slots.append((b, s0, s1 - s0 - 1, spans[:i], once))
        if not slots:  # every parameter still takes part in the graph (DDP waits for all gradients)
            anchor = sum(p.sum() for p in self.parameters()) * 0.0
            nll = nll + anchor
        else:
            nll = self._mix(x, ids, nll, row_of, slots, T)
        return nll.sum() if reduction == "sum" else nll.mean() if reduction == "mean" else nll

    def _mix(self, x, ids, nll, row_of, slots, T):
        S, dev = len(slots), x.device
        J = max(1, max(len(ctx) for *_, ctx, _ in slots))  # one padding column when no slot has a context span
        D = max(max(L for _, _, L, _, _ in slots), max((e - s - 1 for *_, ctx, _ in slots for s, e in ctx), default=0))  # longest ID
        key_pos = torch.zeros(S, J, dtype=torch.long)                 # flat positions of the <EOI>s
        valid = torch.zeros(S, J, dtype=torch.bool)
        ctx_tok = torch.full((S, J, D), -2, dtype=torch.long)         # -2 never equals a token
        tgt_tok = torch.full((S, D), -1, dtype=torch.long)
        tgt_row = torch.zeros(S, D, dtype=torch.long)                 # rows of nll of the slot's tokens
        length = torch.zeros(S, dtype=torch.long)
        turn = torch.zeros(S, J, dtype=torch.long)                    # the spans' turn buckets (copy-turns=1)
        states = {b: self.turn_state(ids[b]) for b in {b for b, *_ in slots}} if self.turns else {}
        for n, (b, s0, L, ctx, _) in enumerate(slots):
            for j, (cs, ce) in enumerate(ctx, start=J - len(ctx)):    # left-padded: the latest span last
                key_pos[n, j], valid[n, j] = b * T + ce, True
                ctx_tok[n, j, :ce - cs - 1] = torch.tensor(ids[b][cs + 1:ce])
                if self.turns:
                    turn[n, j] = turn_bucket(states[b], cs, s0)
            tgt_tok[n, :L] = torch.tensor(ids[b][s0 + 1:s0 + 1 + L])
            tgt_row[n, :L] = torch.tensor([b * T + s0 + l for l in range(L)])  # position p predicts p + 1
            length[n] = L
        key_pos, valid, ctx_tok, tgt_tok, length, turn = (v.to(dev) for v in (key_pos, valid, ctx_tok, tgt_tok, length, turn))
        rows = row_of[tgt_row.to(dev)]                                # (S, D)
        within = torch.arange(D, device=dev) < length[:, None]        # (S, D) real SID positions
        assert bool((rows[within] >= 0).all()), "a slot's SID tokens are supervised"
        xf = x.reshape(-1, x.shape[-1])
        h_slot = xf[torch.tensor([b * T + s0 for b, s0, *_ in slots], device=dev)]
        once = torch.tensor([o for *_, o in slots], dtype=torch.bool, device=dev)  # item-sequence slots: no repeat
        log_g, log_1mg, a, share = self.attend(h_slot, xf[key_pos], valid, once, turn=turn)
        # p_aux: the heads' mass of each prefix of the slot's ID, first the context spans that start with it
        match = (ctx_tok == tgt_tok[:, None, :]).long().cumprod(-1).float()      # (S, J, D)
        p_aux = torch.einsum("sj,sjd->sd", a, match)                              # (S, D)
        if self.items:  # and the association head's mass of the items under each prefix
            assert self.catalogue is not None, "the association head trains with its catalogue: Heads.bind"
            trie, item_path, nodes = self.catalogue
            target = [trie.item_index(ids[b][s0 + 1:s0 + 1 + L]) for b, s0, L, *_ in slots]
            assert None not in target, "a REC slot names an item outside the catalogue"
            ctx_item = ctx_ok = None
            if self.item_context or self.assoc_fresh or bool(once.any()):  # the context spans' catalogue indices, as key_pos (-1: none)
                ctx_item = torch.zeros(S, J, dtype=torch.long)
                index = {}  # (row, <BOI> position) -> catalogue index: slots of one dialog share their spans
                for n, (b, _, _, ctx, _) in enumerate(slots):
                    for j, (cs, ce) in enumerate(ctx, start=J - len(ctx)):
                        if (b, cs) not in index:
                            i = trie.item_index(ids[b][cs + 1:ce])
                            index[b, cs] = -1 if i is None else i
                        ctx_item[n, j] = index[b, cs]
                ctx_ok = valid & (ctx_item >= 0).to(dev)
                ctx_item = ctx_item.clamp(min=0).to(dev)
            path = item_path.to(dev)
            p_assoc = self.assoc_probs(h_slot, ctx_item, ctx_ok, torch.ones_like(once) if self.assoc_fresh else once)
            node_mass = self.assoc_node_mass(p_assoc, path, nodes)  # (S, nodes)
            at = path[torch.tensor(target, device=dev)]                              # (S, depth) the target's nodes
            at = F.pad(at, (0, max(0, D - at.shape[1])), value=nodes - 1)[:, :D]     # OUT (mass 0) past its end
            p_aux = p_aux + share[:, None] * node_mass.gather(1, at) * within
        gen = -torch.cumsum(nll[rows.clamp(min=0)] * within, -1)                  # (S, D) log P_gen(prefix)
        mix = torch.logaddexp(log_1mg[:, None] + gen, log_g[:, None] + p_aux.clamp(min=TINY).log())
        step = mix - F.pad(mix, (1, 0))[:, :-1]                                   # log P_mix(s_l | s_<l)
        loss = -step[within]
        if self.items:  # the SID path keeps its own loss too: the head, which fits the training
            loss = loss + nll[rows[within]]  # set closely, would otherwise take the gate and starve it
        return nll.index_put((rows[within],), loss)

    # -- decoding ----------------------------------------------------------------------------------
    def mixture(self, trie, tt, knobs=None, prior=None):
        """The slot mixture the decoders ask for (nanocrs/generate.py): a callable (h, ids, slot) ->
        slot_mass with this catalogue (trie and its TrieTensors tt), these decoding knobs
        (nanocrs.session.Knobs; None: all zero) and text prior logits (1 or B, items) or None."""
        return lambda h, ids, slot: self.slot_mass(h, ids, slot, (trie, tt), knobs, prior)

    @torch.no_grad()
    def slot_mass(self, h, ids: list[list[int]], slot: list[int], catalogue, knobs=None, prior=None):
        """For B prompts whose slot (the <BOI> after <MODE=REC>) is at position slot[b] of ids[b], with
        h (B, T, C) the hidden states over those positions: (log g (B,), log(1 - g) (B,), mass
        (B, N+1)), mass[b, node] = P_copy of the items under that trie node (0 at OUT). catalogue:
        (SIDTrie, TrieTensors); knobs: attend's; prior (1 or B, items) or None: the text prior's
        logits, added to the association head's scores."""
        (trie, tt), B, dev = catalogue, len(ids), h.device
        if prior is not None and prior.shape[0] != B:  # one prompt's prior for all its sampled rows
            prior = prior.expand(B, -1)
        # (<BOI> position, <EOI> position, catalogue index) of every context span that names a catalogue item
        spans = [[(s, e, i) for s, e in find_spans(ids[b], self.boi, self.eoi, slot[b])
                  if (i := trie.item_index(ids[b][s + 1:e])) is not None] for b in range(B)]
        J = max(1, max(len(s) for s in spans))
        key = torch.zeros(B, J, dtype=torch.long)
        valid = torch.zeros(B, J, dtype=torch.bool)
        item = torch.zeros(B, J, dtype=torch.long)
        turn = torch.zeros(B, J, dtype=torch.long)
        for b, sp in enumerate(spans):
            state = self.turn_state(ids[b][:slot[b]]) if self.turns and sp else None
            for j, (s, e, i) in enumerate(sp, start=J - len(sp)):  # left-padded: the latest span last
                key[b, j], valid[b, j], item[b, j] = e, True, i
                if state is not None:
                    turn[b, j] = turn_bucket(state, s, slot[b])
        key, valid, item, turn = key.to(dev), valid.to(dev), item.to(dev), turn.to(dev)
        rows = torch.arange(B, device=dev)
        h_slot = h[rows, torch.tensor(slot, device=dev)]
        log_g, log_1mg, a, share = self.attend(h_slot, h[rows[:, None], key], valid, turn=turn, knobs=knobs)
        paths = tt.item_path[item]                                            # (B, J, depth) nodes
        mass = torch.zeros(B, tt.child_tok.shape[0], device=dev, dtype=torch.float64)
        mass.scatter_add_(1, paths.flatten(1), a[..., None].expand_as(paths).flatten(1).double())
        mass[:, tt.OUT] = 0.0  # the paths' padding
        if self.items:
            assert len(trie.item_ids) == self.items, f"the head has {self.items} item rows, the catalogue {len(trie.item_ids)}"
            exclude = torch.full((B,), self.assoc_fresh, dtype=torch.bool, device=dev)
            p = self.assoc_probs(h_slot, item, valid, exclude, prior).double() * share.double()[:, None]
            mass += self.assoc_node_mass(p, tt.item_path, tt.child_tok.shape[0])
        return log_g.double(), log_1mg.double(), mass


# -----------------------------------------------------------------------------
# training's catalogue and the counts; decoding's text prior

def prepare_training(heads: Heads, trie, tt, dialogs: list[dict], seed: int, resume: bool):
    """The association head's rows are the trie's items: bind them and, with assoc-init=counts on a new
    run, start the head from the co-occurrences of the dialogs the model trains on (init_from_counts)."""
    from nanocrs.encoder import cooc_counts, ppmi_factors
    from nanocrs.metrics import recommended_counts
    heads.bind(trie, tt)
    if heads.config.assoc_init != "counts" or resume:
        return
    factors = ppmi_factors(cooc_counts(dialogs, trie.item_ids), heads.dim, seed)
    if factors is None:
        raise ValueError(f"--heads assoc-init=counts: no more than {heads.dim} items co-occur in the training "
                         f"dialogs, too few to factorise (train without it)")
    recommended = recommended_counts(dialogs)
    heads.init_from_counts(*factors, np.array([recommended[i] for i in trie.item_ids], dtype=np.float32))
    print(f"association head: started from the counts of {len(dialogs)} dialogs ({len(factors[0])} items co-occur)")


class TextPrior:
    """tau * cos(E(the dialog's last turns), E(item text)) for every catalogue item, with E the frozen
    sentence encoder that embedded the items for their IDs (data_prep.py --encoder minilm or a BERT
    folder). The association head adds it to its scores at decoding (slot_mass's prior), a product of
    experts: what the words of the request match, next to what the model learnt.
    Why: a small model trained from scratch can not read "a horror movie with Tom Hanks" well enough to
    find an item it seldom saw as a target; the encoder that placed the items by their text can."""

    def __init__(self, encoder: str, item_vecs: np.ndarray, tau: float, title, device: str = "cpu"):
        from nanocrs.encoder import find_minilm, load_bert
        self.model, self.tok = load_bert(find_minilm() if encoder == "minilm" else encoder, device)
        if item_vecs.shape[1] != self.model.tok_emb.embedding_dim:
            raise ValueError(f"text prior: {item_vecs.shape[1]}-dim item vectors, but {encoder} embeds in "
                             f"{self.model.tok_emb.embedding_dim} dims")
        self.items = torch.as_tensor(item_vecs, dtype=torch.float32, device=device)  # (N, H) unit rows
        self.tau, self.title = tau, title  # title: item id -> its title, for the mentions in the text

    @classmethod
    def load(cls, ckpt: str, n_items: int, tau: float, title, device: str) -> "TextPrior":
        """The text prior whose item vectors write_text_vectors left beside the checkpoint."""
        path = os.path.join(ckpt, TEXT_PRIOR_FILE)
        if not os.path.isfile(path):
            raise DataError(f"{path}: not found; sample.py --eval val --calibrate text writes it")
        try:
            with np.load(path, allow_pickle=False) as f:
                vecs, encoder = f["items"], f["encoder"]
        except Exception as e:  # a damaged zip, a missing array, an object array: the library's many errors
            raise DataError(f"{path}: not a readable text-prior file ({type(e).__name__}: {e}); "
                            "sample.py --eval val --calibrate text writes it again") from None
        if encoder.ndim != 0 or encoder.dtype.kind != "U":
            raise DataError(f"{path}: encoder must be one string, got {encoder.dtype} {encoder.shape}")
        if vecs.ndim != 2 or vecs.shape[0] != n_items:
            raise DataError(f"{path}: {vecs.shape} item vectors for a catalogue of {n_items}")
        if vecs.dtype.kind != "f" or not np.isfinite(vecs).all():  # one NaN row empties every beam list
            raise DataError(f"{path}: items must be finite floats ({vecs.dtype}, "
                            f"{int((~np.isfinite(vecs)).sum()) if vecs.dtype.kind == 'f' else 'not float'} non-finite)")
        return cls(str(encoder), vecs, tau, title, device)

    def text(self, context: list[dict]) -> str:
        return " ".join(f"{t['role']}: " + MENTION.sub(lambda m: self.title(m.group(1)), t["text"])
                        for t in context[-LAST_TURNS:])

    def __call__(self, contexts: list[list[dict]]) -> torch.Tensor:
        """contexts: B dialogs so far -> (B, N) float32 logits to add to the association head's scores."""
        from nanocrs.encoder import embed
        e = torch.as_tensor(embed(self.model, self.tok, [self.text(c) for c in contexts], keep="left",
                                  desc="text prior"), device=self.items.device)
        return self.tau * e @ self.items.T


def write_text_vectors(ckpt: str, item_ids: list[str], ds: dict, data_dir: str):
    """The dataset's item embeddings (data_prep.py's item_embeddings.npy), in the catalogue order of the
    association head (item_ids: the trie's), and the encoder that made them, saved beside the checkpoint."""
    import json
    from nanocrs.common import atomic_path
    meta_path = os.path.join(data_dir, "dataset.json")
    encoder = json.load(open(meta_path)).get("encoder", "tfidf")
    if encoder.startswith("tfidf"):
        raise DataError(f"{meta_path}: items embedded by tfidf, which can not embed a dialog; the text prior needs "
                        "a sentence encoder (data_prep.py --encoder minilm or a BERT folder)")
    path = os.path.join(data_dir, "item_embeddings.npy")
    try:
        emb = np.load(path, allow_pickle=False)
    except Exception as e:  # damaged or not an array file
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from None
    row = {it["id"]: n for n, it in enumerate(ds["items"])}
    if emb.ndim != 2 or emb.shape[0] != len(row) or emb.dtype.kind != "f" or not np.isfinite(emb).all():
        raise DataError(f"{path}: expected one finite float vector per item ({len(row)}), got {emb.dtype} {emb.shape}"
                        f"{'' if emb.dtype.kind != 'f' or np.isfinite(emb).all() else ' with NaN or inf'}")
    with atomic_path(os.path.join(ckpt, TEXT_PRIOR_FILE)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, items=emb[[row[i] for i in item_ids]], encoder=np.array(encoder))
