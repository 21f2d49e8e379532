"""
The copy head: the recommendation slot can point back at an item the dialog already mentioned.

In ReDial about one recommended item in ten is one the seeker (or the recommender) named earlier,
and a model that writes IDs token by token copies a multi-token span only part of the time. The
copy head makes copying one decision instead of several. At the REC slot (the position of the <BOI>
right after <MODE=REC>, whose output predicts the first SID token) the item distribution is a mixture

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

    model.add_pointer(pointer_spec(ctrl, dim=64))   # GPT.forward(idx, targets) then trains it
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

RECENCY = 16      # context spans further back than this share the last recency bias
TINY = 1e-30      # floor of P_copy inside a log: log(0) would make the gradient NaN


def pointer_spec(ctrl, dim: int = 64) -> dict:
    """What GPTConfig.pointer holds: the copy head's size and the control tokens it reads."""
    return {"dim": dim, "boi": ctrl.boi, "eoi": ctrl.eoi, "mode_rec": ctrl.mode_rec}


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


class Pointer(nn.Module):
    def __init__(self, n_embd: int, spec: dict):
        super().__init__()
        self.boi, self.eoi, self.mode_rec, self.dim = spec["boi"], spec["eoi"], spec["mode_rec"], spec["dim"]
        self.q = nn.Linear(n_embd, self.dim, bias=False)
        self.k = nn.Linear(n_embd, self.dim, bias=False)
        self.gate = nn.Linear(n_embd, 1)
        self.recency = nn.Parameter(torch.zeros(RECENCY))

    def attend(self, h_slot, h_keys, valid):
        """h_slot (S, C) one query per slot, h_keys (S, J, C) its context spans' <EOI> states, the latest
        last, valid (S, J) bool (spans padded on the left) -> (log g (S,), log(1 - g) (S,), a (S, J)): the
        gate and the copy weights over the spans. A slot with no valid span gets g = 0."""
        S, J = valid.shape
        s = torch.einsum("sd,sjd->sj", self.q(h_slot).float(), self.k(h_keys).float()) / math.sqrt(self.dim)
        rank = (J - 1 - torch.arange(J, device=valid.device)).clamp(max=RECENCY - 1)  # (J,) 0 = latest
        s = (s + self.recency[rank]).masked_fill(~valid, float("-inf"))
        a = torch.softmax(s.masked_fill(~valid.any(1, keepdim=True), 0.0), -1) * valid  # no NaN rows
        z = self.gate(h_slot).float().squeeze(-1)
        any_ = valid.any(1)
        log_g = torch.where(any_, F.logsigmoid(z), float("-inf"))
        log_1mg = torch.where(any_, F.logsigmoid(-z), 0.0)
        return log_g, log_1mg, a

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
            for i, (s0, s1) in enumerate(spans):
                if i > 0 and s0 > 0 and ids[b][s0 - 1] == self.mode_rec and sup[b][s0]:
                    slots.append((b, s0, s1 - s0 - 1, spans[:i]))
        if not slots:  # every parameter still takes part in the graph (DDP waits for all gradients)
            anchor = sum(p.sum() for p in self.parameters()) * 0.0
            nll = nll + anchor
        else:
            nll = self._mix(x, ids, nll, row_of, slots, T)
        return nll.sum() if reduction == "sum" else nll.mean() if reduction == "mean" else nll

    def _mix(self, x, ids, nll, row_of, slots, T):
        S, dev = len(slots), x.device
        J = max(len(ctx) for *_, ctx in slots)
        D = max(max(L for _, _, L, _ in slots), max(e - s - 1 for *_, ctx in slots for s, e in ctx))  # longest ID
        key_pos = torch.zeros(S, J, dtype=torch.long)                 # flat positions of the <EOI>s
        valid = torch.zeros(S, J, dtype=torch.bool)
        ctx_tok = torch.full((S, J, D), -2, dtype=torch.long)         # -2 never equals a token
        tgt_tok = torch.full((S, D), -1, dtype=torch.long)
        tgt_row = torch.zeros(S, D, dtype=torch.long)                 # rows of nll of the slot's tokens
        length = torch.zeros(S, dtype=torch.long)
        for n, (b, s0, L, ctx) in enumerate(slots):
            for j, (cs, ce) in enumerate(ctx, start=J - len(ctx)):    # left-padded: the latest span last
                key_pos[n, j], valid[n, j] = b * T + ce, True
                ctx_tok[n, j, :ce - cs - 1] = torch.tensor(ids[b][cs + 1:ce])
            tgt_tok[n, :L] = torch.tensor(ids[b][s0 + 1:s0 + 1 + L])
            tgt_row[n, :L] = torch.tensor([b * T + s0 + l for l in range(L)])  # position p predicts p + 1
            length[n] = L
        key_pos, valid, ctx_tok, tgt_tok, length = (v.to(dev) for v in (key_pos, valid, ctx_tok, tgt_tok, length))
        rows = row_of[tgt_row.to(dev)]                                # (S, D)
        within = torch.arange(D, device=dev) < length[:, None]        # (S, D) real SID positions
        assert bool((rows[within] >= 0).all()), "a slot's SID tokens are supervised"
        xf = x.reshape(-1, x.shape[-1])
        log_g, log_1mg, a = self.attend(xf[torch.tensor([b * T + s0 for b, s0, _, _ in slots], device=dev)],
                                        xf[key_pos], valid)
        # P_copy of each prefix of the slot's ID: the weight of the context spans that start with it
        match = (ctx_tok == tgt_tok[:, None, :]).long().cumprod(-1).float()      # (S, J, D)
        p_copy = torch.einsum("sj,sjd->sd", a, match)                              # (S, D)
        gen = -torch.cumsum(nll[rows.clamp(min=0)] * within, -1)                  # (S, D) log P_gen(prefix)
        mix = torch.logaddexp(log_1mg[:, None] + gen, log_g[:, None] + p_copy.clamp(min=TINY).log())
        step = mix - F.pad(mix, (1, 0))[:, :-1]                                   # log P_mix(s_l | s_<l)
        return nll.index_put((rows[within],), -step[within])

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def copy_mass(self, h, ids: list[list[int]], slot: list[int], trie, tt):
        """For B prompts whose slot (the <BOI> after <MODE=REC>) is at position slot[b] of ids[b], with
        h (B, T, C) the hidden states over those positions: (log g (B,), log(1 - g) (B,), mass
        (B, N+1)), mass[b, node] = P_copy of the items under that trie node (0 at OUT)."""
        B, dev = len(ids), h.device
        # (<EOI> position, catalogue index) of every context span that names a catalogue item
        spans = [[(e, i) for s, e in find_spans(ids[b], self.boi, self.eoi, slot[b])
                  if (i := trie.item_index(ids[b][s + 1:e])) is not None] for b in range(B)]
        J = max(1, max(len(s) for s in spans))
        key = torch.zeros(B, J, dtype=torch.long)
        valid = torch.zeros(B, J, dtype=torch.bool)
        item = torch.zeros(B, J, dtype=torch.long)
        for b, sp in enumerate(spans):
            for j, (e, i) in enumerate(sp, start=J - len(sp)):  # left-padded: the latest span last
                key[b, j], valid[b, j], item[b, j] = e, True, i
        key, valid, item = key.to(dev), valid.to(dev), item.to(dev)
        rows = torch.arange(B, device=dev)
        log_g, log_1mg, a = self.attend(h[rows, torch.tensor(slot, device=dev)], h[rows[:, None], key], valid)
        paths = tt.item_path[item]                                            # (B, J, depth) nodes
        mass = torch.zeros(B, tt.child_tok.shape[0], device=dev, dtype=torch.float64)
        mass.scatter_add_(1, paths.flatten(1), a[..., None].expand_as(paths).flatten(1).double())
        mass[:, tt.OUT] = 0.0  # the paths' padding
        return log_g.double(), log_1mg.double(), mass
