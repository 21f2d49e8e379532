"""
Decoding with a prefix trie of valid semantic IDs: the model can never name an item that does not exist.

    trie = SIDTrie.build(sids, tokenizer)
    out = sample(model, prompt_ids, trie, ctrl, n=4, temperature=0.8, top_k=50)     # text + items
    top = beam_search(model, prompt_ids_ending_in_BOI, trie, ctrl, beam_width=50)  # [(item, logprob)]
    tops = beam_search_batch(model, many_prompts, trie, ctrl, beam_width=50)      # one list per prompt

Outside an item span the sampler may write any text token or <BOI>, but never a bare SID token or
<EOI>. After <BOI> every step is restricted to the trie children of the span's prefix, and once the
prefix is a complete ID the only allowed token is <EOI>. So every span the sampler emits is exactly
one catalogue item.

Beam search starts right after <BOI>: the prompt is prefilled once, the beams keep a cache of only
their SID tokens and read the prompt's cache without copying it (KVCache prefix=), and each step keeps
the `beam_width` best (item prefix, summed log-probability) pairs among all trie children of all beams. Log-probabilities are the model's own (softmax over the whole
vocabulary), so with a beam at least as wide as the catalogue the ranking is exactly that of scoring
every item one by one (tests/test_generate.py checks this).

The trie exists twice. SIDTrie is nested dicts, the readable reference (beam_search_reference walks
it in Python). TrieTensors is the same trie as padded tables, built once per device: per node its
child tokens and child nodes. The decoders use that form: a step gathers the children's scores of
all rows in one op, so nothing of vocabulary size leaves the device and no Python runs per candidate.

Ties: a ranking is by score, best first, and items with exactly equal scores by their order in the
catalogue (SIDTrie.item_ids). Within the search, candidates of equal score are kept in the order
(beam rank, child order in the trie); both implementations do exactly this, so they agree on ties.
"""

import math
from dataclasses import dataclass

import torch

from nanocrs.tokenizer import Control


class SIDTrie:
    """Nested dicts over token ids; a complete ID maps to its item under the key LEAF."""
    LEAF = -1

    def __init__(self):
        self.root = {}
        self.sid_token_ids = set()
        self.depth = 0  # the longest SID, in tokens
        self.item_ids = []  # catalogue order: breaks ties between equal scores
        self.index = {}     # item id -> its position in item_ids
        self._tensors = {}  # (device, vocab size, control ids) -> TrieTensors, built on first use

    @classmethod
    def build(cls, sids, tokenizer) -> "SIDTrie":
        trie = cls()
        for item in sids.item_ids:
            ids = [tokenizer.id(t) for t in sids.tokens(item)]
            node = trie.root
            for i in ids:
                if cls.LEAF in node:
                    raise ValueError(f"SID of {item} extends the SID of {node[cls.LEAF]}: the table is not prefix-free")
                node = node.setdefault(i, {})
            if node:
                raise ValueError(f"SID of {item} is a prefix of another item's SID: the table is not prefix-free")
            node[cls.LEAF] = item
            trie.index[item] = len(trie.item_ids)
            trie.item_ids.append(item)
            trie.sid_token_ids.update(ids)
            trie.depth = max(trie.depth, len(ids))
        # every (level, code) token, even ones no item uses, is banned outside spans
        trie.sid_token_ids.update(tokenizer.id(t) for t in sids.all_token_strings())
        return trie

    def walk(self, ids):
        """The node reached from the root by ids, or None if they leave the trie."""
        node = self.root
        for i in ids:
            node = node.get(i)
            if node is None:
                return None
        return node

    def item_index(self, ids) -> int | None:
        """The catalogue index (into item_ids) of the item whose SID these token ids are, or None."""
        node = self.walk(ids)
        return self.index[node[self.LEAF]] if node is not None and self.LEAF in node else None

    def items(self):
        """All (token ids, item) pairs, depth first."""
        stack = [((), self.root)]
        while stack:
            prefix, node = stack.pop()
            for k, child in node.items():
                if k == self.LEAF:
                    yield list(prefix), child
                else:
                    stack.append((prefix + (k,), child))

    def tensors(self, ctrl: "Control", vocab_size: int, device) -> "TrieTensors":
        """The tensor form of this trie on a device, built on first use and kept."""
        key = (str(device), vocab_size, ctrl.boi, ctrl.eoi)
        if key not in self._tensors:
            self._tensors[key] = TrieTensors.build(self, ctrl, vocab_size, device)
        return self._tensors[key]


@dataclass
class TrieTensors:
    """SIDTrie as tables, one row per node (root = 0), plus one more row OUT = outside any span.

    A leaf's only child is <EOI>, which leads to OUT; OUT's only child is <BOI>, which leads to the
    root (for the sampler: every other token keeps a row OUT). Rows are padded to the widest node with
    copies of their first child, so a scatter of the padded row writes each value once, and
    child_ok says which entries are real. Beam search never expands a leaf or OUT (child_ok is
    False there: a leaf is a finished item)."""
    child_tok: torch.Tensor   # (N+1, C) int64  token of each child
    child_node: torch.Tensor  # (N+1, C) int64  node it leads to
    child_ok: torch.Tensor    # (N+1, C) bool   real trie children (not padding, not <EOI>/<BOI>)
    leaf_item: torch.Tensor   # (N+1,) int64    index into SIDTrie.item_ids, -1 for inner nodes
    item_path: torch.Tensor   # (items, depth) int64  the nodes from an item's first token to its leaf (OUT-padded)
    banned: torch.Tensor      # (V,) bool       tokens banned outside a span: SID tokens and <EOI>
    banned_late: torch.Tensor  # (V,) bool      the same and <BOI>: near the end of the block there is
    OUT: int                   #                too little room left to finish an item

    @classmethod
    def build(cls, trie: SIDTrie, ctrl: Control, vocab_size: int, device) -> "TrieTensors":
        nodes, kids = [trie.root], []
        for node in nodes:  # breadth first; nodes grows while we walk it
            row = []
            for tok, child in node.items():
                if tok != SIDTrie.LEAF:
                    row.append((tok, len(nodes)))
                    nodes.append(child)
            kids.append(row)
        OUT = len(nodes)
        C = max(1, max(len(r) for r in kids))
        tok = torch.full((OUT + 1, C), ctrl.boi, dtype=torch.long)
        nxt = torch.zeros((OUT + 1, C), dtype=torch.long)      # OUT -<BOI>-> root
        ok = torch.zeros((OUT + 1, C), dtype=torch.bool)
        leaf = torch.full((OUT + 1,), -1, dtype=torch.long)
        for n, (node, row) in enumerate(zip(nodes, kids)):
            if SIDTrie.LEAF in node:
                leaf[n] = trie.index[node[SIDTrie.LEAF]]
                row = [(ctrl.eoi, OUT)]  # a complete ID: only <EOI>, back outside
            else:
                ok[n, :len(row)] = True
            if row:
                row = row + [row[0]] * (C - len(row))
                tok[n], nxt[n] = torch.tensor([t for t, _ in row]), torch.tensor([c for _, c in row])
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[list(trie.sid_token_ids)] = True
        banned[ctrl.eoi] = True
        late = banned.clone()
        late[ctrl.boi] = True
        number = {id(node): n for n, node in enumerate(nodes)}
        path = torch.full((len(trie.item_ids), max(1, trie.depth)), OUT, dtype=torch.long)
        for ids, item in trie.items():
            node = trie.root
            for d, t in enumerate(ids):
                node = node[t]
                path[trie.index[item], d] = number[id(node)]
        return cls(*(t.to(device) for t in (tok, nxt, ok, leaf, path, banned, late)), OUT)


def _span_state(ids, trie: SIDTrie, ctrl: Control):
    """If ids end inside an open <BOI> span, the trie node reached so far, else None."""
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] == ctrl.eoi:
            return None
        if ids[j] == ctrl.boi:
            node = trie.walk(ids[j + 1:])
            assert node is not None, "the prompt's open item span is not a valid SID prefix"
            return node
    return None


def _state_index(ids, trie: SIDTrie, ctrl: Control, tt: TrieTensors) -> int:
    """The TrieTensors row that ids end in: OUT, or the node of an open span's prefix."""
    if _span_state(ids, trie, ctrl) is None:
        return tt.OUT
    j = len(ids) - 1 - ids[::-1].index(ctrl.boi)
    n = 0
    for t in ids[j + 1:]:
        n = int(tt.child_node[n][tt.child_tok[n] == t][0])
    return n


@dataclass
class Sampling:
    """How the sampler picks a token: temperature and top-k, or greedy; generator seeds it; it stops
    after a token of `stop` (default: <EOT>)."""
    temperature: float = 1.0
    top_k: int | None = None
    greedy: bool = False
    generator: torch.Generator | None = None
    stop: set[int] | None = None


@torch.no_grad()
def sample(model, prompt: list[int], trie: SIDTrie | None, ctrl: Control | None, n: int = 1, max_new_tokens: int = 64,
           mixture=None, **how) -> list[list[int]]:
    """n continuations of one prompt (prefilled once, cache copied n times); how: Sampling's fields.
    A span open when max_new_tokens runs out is still completed, so no output holds half an item.
    trie=None samples with no constraint at all: a base model's plain text (sample.py --init-from,
    with ctrl=None and its own stop tokens) or bench.py's overhead baseline. mixture: None (the plain
    generative path) or the slot mixture to draw a REC slot's ID from (see SlotMixture)."""
    how = Sampling(**how)
    model.eval()
    device = model.norm.weight.device
    V = model.config.vocab_size
    max_len = min(len(prompt) + max_new_tokens + 8, model.config.block_size)
    assert len(prompt) < max_len, "prompt is too long for the model's block size: truncate it first"
    mixture = mixture if trie is not None else None
    cache = model.new_cache(1, max_len)
    logits, h = model(torch.tensor([prompt], device=device), cache=cache, return_hidden=mixture is not None)
    cache = cache.expand(n)
    logits = logits[:, -1].expand(n, -1)  # (n, V)
    if trie is not None:
        tt = trie.tensors(ctrl, V, device)
        state = torch.full((n,), _state_index(prompt, trie, ctrl, tt), device=device)  # (n,) TrieTensors rows
    slots = SlotMixture(mixture, prompt, h, max_len, (tt, ctrl), n) if mixture is not None else None
    stop = torch.tensor(sorted(how.stop if how.stop is not None else {ctrl.eot}), dtype=torch.long, device=device)
    out = torch.full((n, max_len), -1, dtype=torch.long, device=device)  # generated tokens, -1 = none
    length = torch.zeros(n, dtype=torch.long, device=device)               # (n,) tokens generated per row
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for step in range(max_len - cache.pos):
        x = logits.float()
        if trie is not None:
            # in a span: the node's children's logits scattered into -inf; outside: the fixed mask
            kids = tt.child_tok[state]                                   # (n, C)
            child = x.gather(1, kids)
            if slots is not None:  # inside a REC slot: the mixture's conditionals instead
                child = slots.children(x, kids, child, state, out[:, :step], cache.pos)
            inside = torch.full_like(x, float("-inf")).scatter_(1, kids, child)
            banned = tt.banned if max_len - cache.pos > trie.depth + 2 else tt.banned_late
            x = torch.where((state == tt.OUT)[:, None], x.masked_fill(banned, float("-inf")), inside)
        if how.greedy:
            nxt = x.argmax(-1)
        else:
            x = x / max(how.temperature, 1e-5)
            if how.top_k is not None:
                kth = torch.topk(x, min(how.top_k, V), dim=-1).values[:, -1:]
                x = x.masked_fill(x < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(x, -1), 1, generator=how.generator).squeeze(-1)  # (n,)
        out[:, step] = torch.where(done, -1, nxt)
        length += ~done
        if trie is not None:
            hit = kids == nxt[:, None]  # (n, C): which child was taken, if any
            state = torch.where(hit.any(-1), tt.child_node[state].gather(1, hit.int().argmax(-1, keepdim=True))[:, 0], tt.OUT)
            closed = state == tt.OUT
            if slots is not None:
                slots.took(nxt, closed)
        else:
            closed = torch.ones_like(done)
        done |= torch.isin(nxt, stop) | ((length >= max_new_tokens) & closed)
        if bool(done.all()):  # one host sync per step, of one value
            break
        logits, h = model(nxt.view(n, 1), cache=cache, return_hidden=slots is not None)
        if slots is not None:
            slots.hid[:, cache.pos - 1] = h[:, 0]
        logits = logits[:, -1]
    return [row[:k] for row, k in zip(out.tolist(), length.tolist())]


class SlotMixture:
    """The sampler's side of a slot mixture. A mixture is a callable (h (B, T, C) hidden states, ids
    (B lists), slot (B positions of the slot's <BOI>)) -> (log g (B,), log(1 - g) (B,), mass (B, N+1)):
    at that slot the item distribution is  (1 - g) P_gen(item) + g P_aux(item),  P_gen the model's own
    product of SID-token probabilities and mass[b, node] the P_aux of the items under each trie node
    (nanocrs/heads.py makes one). Written as exact per-token conditionals,
        P(s_l | s_<l) = P_mix(s_1..s_l) / P_mix(s_1..s_l-1),   P_mix(prefix) = (1 - g) P_gen(prefix) + g mass(prefix),
    so a child's logit log P_mix(prefix + child) has exactly the mixture's conditional as its softmax.
    A row whose last two tokens are <MODE=REC><BOI> opens a slot (the mixture is asked once, from the
    states so far); the slot closes with its <EOI>."""

    def __init__(self, mixture, prompt: list[int], h, max_len: int, tables, n: int):
        self.mixture, self.prompt, (self.tt, self.ctrl) = mixture, prompt, tables
        device = h.device
        self.hid = torch.zeros(n, max_len, h.shape[-1], device=device, dtype=h.dtype)  # every position's state
        self.hid[:, :len(prompt)] = h[0]
        self.active = torch.zeros(n, dtype=torch.bool, device=device)  # (n,) inside a slot
        self.gen = torch.zeros(n, dtype=torch.float64, device=device)  # (n,) log P_gen of the slot's prefix
        self.log_g, self.log_1mg = torch.full_like(self.gen, float("-inf")), torch.zeros_like(self.gen)
        self.mass = torch.zeros(n, self.tt.child_tok.shape[0], dtype=torch.float64, device=device)
        self.lp = None

    def children(self, x, kids, child, state, generated, pos: int):
        """The children's logits (n, C) of this step: log P_mix(prefix + child) inside a slot, else `child`."""
        tt = self.tt
        self.lp = torch.log_softmax(x, -1)
        rows = ((state == 0) & ~self.active).nonzero().flatten().tolist()  # rows just past a <BOI>: a slot?
        if rows:
            seqs = {r: self.prompt + [t for t in generated[r].tolist() if t >= 0] for r in rows}
            opening = [r for r in rows if seqs[r][-2:] == [self.ctrl.mode_rec, self.ctrl.boi]]
            if opening:
                g, g1, m = self.mixture(self.hid[opening, :pos], [seqs[r] for r in opening],
                                        [len(seqs[r]) - 1 for r in opening])
                self.log_g[opening], self.log_1mg[opening], self.mass[opening] = g, g1, m
                self.active[opening], self.gen[opening] = True, 0.0
        mixing = self.active & (tt.leaf_item[state] < 0)  # at a leaf the only child is <EOI>
        if bool(mixing.any()):
            g_child = self.gen[:, None] + self.lp.gather(1, kids).double()                  # (n, C) log P_gen
            mixed = torch.logaddexp(self.log_1mg[:, None] + g_child,
                                    self.log_g[:, None] + self.mass.gather(1, tt.child_node[state]).log())
            child = torch.where(mixing[:, None], mixed.to(child.dtype), child)
        return child

    def took(self, nxt, closed):
        """The tokens nxt (n,) were drawn: a slot's prefix grows by them, and ends where its span closed."""
        self.gen += torch.where(self.active, self.lp.gather(1, nxt[:, None])[:, 0].double(), 0.0)
        self.active &= ~closed


# -----------------------------------------------------------------------------
# beam search

@torch.no_grad()
def beam_search(model, prompt: list[int], trie: SIDTrie, ctrl: Control, beam_width: int = 50,
                mixture=None, prefilled=None) -> list[tuple[str, float]]:
    """Top items after a prompt that ends with <BOI>, best first: [(item_id, log P(SID | prompt))].
    Returns up to beam_width items. mixture: None (the plain generative path) or, at a REC slot, the
    slot mixture to rank by (SlotMixture says what it is). prefilled: (cache, last_logits, the
    mixture's value or None) of an already-prefilled batch-1 prompt, to skip the prefill."""
    assert prompt[-1] == ctrl.boi, "beam search starts right after <BOI>"
    return beam_search_batch(model, [prompt], trie, ctrl, beam_width, mixture, prefilled)[0]


@torch.no_grad()
def beam_search_batch(model, prompts: list[list[int]], trie: SIDTrie, ctrl: Control, beam_width: int = 50,
                      mixture=None, prefilled=None) -> list[list[tuple[str, float]]]:
    """beam_search for many prompts at once: left-padded into one prefill and one cache, each prompt
    with its own beam_width beams. The same lists as one prompt at a time (up to float rounding).
    prefilled: (cache, last_logits (B, V), the mixture's value at the slot or None) of the
    already-prefilled prompts, to skip the prefill."""
    assert all(p[-1] == ctrl.boi for p in prompts), "beam search starts right after <BOI>"
    if prefilled is not None:
        return _search(model, trie, ctrl, beam_width, *prefilled)
    model.eval()
    device = model.norm.weight.device
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)  # (B,)
    ids = torch.tensor([[ctrl.eot] * (L - len(p)) + p for p in prompts], device=device)  # (B, L); pads are masked
    cache = model.new_cache(len(prompts), L, pad=pad if int(pad.max()) > 0 else None)  # the beams' tokens go elsewhere
    logits, h = model(ids, cache=cache, return_hidden=mixture is not None)
    mix = None
    if mixture is not None and all(p[-2:] == [ctrl.mode_rec, ctrl.boi] for p in prompts):  # a REC slot
        mix = mixture(h, ids.tolist(), [L - 1] * len(prompts))
    return _search(model, trie, ctrl, beam_width, cache, logits[:, -1], mix)


def _search(model, trie: SIDTrie, ctrl: Control, W: int, cache, last_logits, mix=None):
    """The beam search proper, on a prefilled cache of B prompts (B rows) and their last logits (B, V).
    Every tensor below stays on the model's device; the host sees only the final (B, W) lists.
    With mix = (log g, log(1 - g), mass) a beam is ranked by log P_mix of its prefix (SlotMixture)
    and `gen` carries its plain log P_gen; without, the two are the same."""
    model.eval()
    B, V = last_logits.shape
    device = last_logits.device
    tt = trie.tensors(ctrl, V, device)
    C = tt.child_tok.shape[1]
    logp = torch.log_softmax(last_logits.float(), -1)             # (B*K, V), K = 1 beam per prompt at first
    node = torch.zeros(B, 1, dtype=torch.long, device=device)     # (B, K) trie node of each beam
    # (B, K) summed log-prob, -inf = no beam; float64 like the reference's Python floats (MPS has none)
    score = torch.zeros(B, 1, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    gen = score                                                   # (B, K) log P_gen of each beam's prefix
    if mix is not None:
        log_g, log_1mg, mass = (c.to(score.dtype) for c in mix)
        log_mass = mass.log()                                     # (B, N+1), -inf off the context's items
    fin_score, fin_item = [], []
    # the beams' own cache holds only the SID tokens; they read their prompt from `cache`, uncopied
    beams = model.new_cache(B, trie.depth, prefix=cache)
    for step in range(trie.depth):
        K = node.shape[1]
        # every (beam, child) pair, scored: only the children's columns of the vocabulary are read
        kids = tt.child_tok[node]                                           # (B, K, C)
        cand_gen = gen[..., None] + logp.view(B, K, V).gather(2, kids).to(score.dtype)
        cand = cand_gen
        if mix is not None:  # log P_mix = log((1 - g) P_gen + g P_aux) of each child prefix
            cm = log_mass.gather(1, tt.child_node[node].view(B, K * C)).view(B, K, C)
            cand = torch.logaddexp(log_1mg[:, None, None] + cand_gen, log_g[:, None, None] + cm)
        cand = cand.masked_fill(~tt.child_ok[node], float("-inf")).view(B, K * C)
        # the W best per prompt; a stable sort keeps equal scores in (beam, child) order
        top, idx = cand.sort(dim=1, descending=True, stable=True)
        top, idx = top[:, :W], idx[:, :W]                                   # (B, W'), W' = min(W, K*C)
        beam, c = idx // C, idx % C
        parent = node.gather(1, beam)
        child = tt.child_node[parent, c]                                     # (B, W)
        real = top > float("-inf")
        leaf = real & (tt.leaf_item[child] >= 0)
        fin_score.append(top.masked_fill(~leaf, float("-inf")))
        fin_item.append(tt.leaf_item[child])
        if step == trie.depth - 1:
            break  # no ID is longer: nothing left to expand
        # the surviving beams' cache rows (index_select also grows B rows to B*W' at the first step)
        beams.reorder((torch.arange(B, device=device)[:, None] * K + beam).view(-1))
        logits, _ = model(tt.child_tok[parent, c].view(-1, 1), cache=beams)
        logp = torch.log_softmax(logits[:, -1].float(), -1)                 # (B*W', V)
        live = real & ~leaf
        node = torch.where(live, child, tt.OUT)    # a finished or missing beam has no children
        score = top.masked_fill(~live, float("-inf"))
        gen = cand_gen.view(B, K * C).gather(1, idx).masked_fill(~live, float("-inf"))
    # the finished items: by score, equal scores in catalogue order (sort by item, then stably by score)
    s, it = torch.cat(fin_score, 1), torch.cat(fin_item, 1)                # (B, W * depth)
    order = it.argsort(dim=1, stable=True)
    order = order.gather(1, s.gather(1, order).argsort(dim=1, descending=True, stable=True))[:, :W]
    s, it = s.gather(1, order).tolist(), it.gather(1, order).tolist()
    return [[(trie.item_ids[i], v) for i, v in zip(ri, rs) if v > float("-inf")] for ri, rs in zip(it, s)]


@torch.no_grad()
def beam_search_reference(model, prompt: list[int], trie: SIDTrie, ctrl: Control,
                          beam_width: int = 50, mixture=None) -> list[tuple[str, float]]:
    """beam_search on the nested-dict trie, one Python tuple per (beam, child) candidate: slow, but
    the algorithm in plain sight. The tests check the tensor version against it, ties included."""
    assert prompt[-1] == ctrl.boi, "beam search starts right after <BOI>"
    model.eval()
    device = model.norm.weight.device
    cache = model.new_cache(1, len(prompt) + trie.depth + 1)
    logits, h = model(torch.tensor([prompt], device=device), cache=cache, return_hidden=True)
    logp = torch.log_softmax(logits[:, -1].float(), -1)  # (1, V)
    # the slot mixture (if any): log g, log(1 - g) and P_aux of every prefix of the catalogue's items
    log_g, log_1mg, prefix_mass = float("-inf"), 0.0, {}
    if mixture is not None and prompt[-2:] == [ctrl.mode_rec, ctrl.boi]:
        tt = trie.tensors(ctrl, logits.shape[-1], device)
        g, g1, mass = mixture(h, [prompt], [len(prompt) - 1])
        log_g, log_1mg = float(g[0]), float(g1[0])
        for ids, item in trie.items():
            p = float(mass[0, tt.item_path[trie.item_index(ids), len(ids) - 1]])
            for k in range(1, len(ids) + 1):
                prefix_mass[tuple(ids[:k])] = prefix_mass.get(tuple(ids[:k]), 0.0) + p

    def mix(gen: float, prefix: tuple) -> float:  # log((1 - g) exp(gen) + g P_aux(prefix))
        a, b = log_1mg + gen, log_g + math.log(prefix_mass[prefix]) if prefix_mass.get(prefix) else float("-inf")
        return a if b == float("-inf") else max(a, b) + math.log1p(math.exp(-abs(a - b)))

    beams = [(trie.root, 0.0, ())]   # (trie node, log P_gen of the prefix, prefix), one per cache row
    finished = []
    while beams:
        # every (beam, child) pair, scored, in (beam, child) order; a stable sort keeps that order on ties
        cand = []
        for b, (node, gen, prefix) in enumerate(beams):
            row = logp[b]
            for tok, child in node.items():
                if tok != SIDTrie.LEAF:
                    g = gen + float(row[tok])
                    cand.append((mix(g, prefix + (tok,)), b, tok, child, g))
        cand.sort(key=lambda c: -c[0])
        cand = cand[:beam_width]
        live = []
        for score, b, tok, child, g in cand:
            if SIDTrie.LEAF in child:
                finished.append((child[SIDTrie.LEAF], score))
            else:
                live.append((score, b, tok, child, g))
        if not live:
            break
        cache.reorder(torch.tensor([b for _, b, _, _, _ in live], device=device))
        logits, _ = model(torch.tensor([[t] for _, _, t, _, _ in live], device=device), cache=cache)
        logp = torch.log_softmax(logits[:, -1].float(), -1)  # (n_live, V)
        beams = [(child, g, beams[b][2] + (tok,)) for _, b, tok, child, g in live]
    order = {item: i for i, item in enumerate(trie.item_ids)}
    finished.sort(key=lambda f: (-f[1], order[f[0]]))
    return finished[:beam_width]
