"""
Decoding with a prefix trie of valid semantic IDs: the model can never name an item that does not exist.

    trie = SIDTrie.build(sids, tokenizer)
    out = sample(model, prompt_ids, trie, ctrl, n=4, temperature=0.8, top_k=50)     # text + items
    top = beam_search(model, prompt_ids_ending_in_BOI, trie, ctrl, beam_width=50)  # [(item, logprob)]

Outside an item span the sampler may write any text token or <BOI>, but never a bare SID token or
<EOI>. After <BOI> every step is restricted to the trie children of the span's prefix, and once the
prefix is a complete ID the only allowed token is <EOI>. So every span the sampler emits is exactly
one catalogue item.

Beam search starts right after <BOI>: the prompt is prefilled once, the KV cache is copied to the
beams, and each step keeps the `beam_width` best (item prefix, summed log-probability) pairs among
all trie children of all beams. Log-probabilities are the model's own (softmax over the whole
vocabulary), so with a beam at least as wide as the catalogue the ranking is exactly that of scoring
every item one by one (tests/test_generate.py checks this).
"""

from dataclasses import dataclass

import torch

from nanocrs.tokenizer import BOI, EOI, EOT


class SIDTrie:
    """Nested dicts over token ids; a complete ID maps to its item under the key LEAF."""
    LEAF = -1

    def __init__(self):
        self.root = {}
        self.sid_token_ids = set()
        self.depth = 0  # the longest SID, in tokens

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


@dataclass
class Control:
    """Token ids the decoder needs (from the tokenizer)."""
    boi: int
    eoi: int
    eot: int

    @classmethod
    def of(cls, tokenizer) -> "Control":
        return cls(tokenizer.id(BOI), tokenizer.id(EOI), tokenizer.id(EOT))


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


def allowed_mask(node, vocab_size: int, trie: SIDTrie, ctrl: Control, device) -> torch.Tensor:
    """(V,) bool: which tokens may come next, given the span state (None = outside a span)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    if node is None:
        mask[:] = True
        mask[list(trie.sid_token_ids)] = False
        mask[ctrl.eoi] = False
    elif SIDTrie.LEAF in node:
        mask[ctrl.eoi] = True
    else:
        mask[list(node.keys())] = True
    return mask


@torch.no_grad()
def sample(model, prompt: list[int], trie: SIDTrie, ctrl: Control, n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_k: int | None = None, greedy: bool = False,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """n continuations of one prompt (prefilled once, cache copied n times). Each stops after <EOT>;
    a span open when max_new_tokens runs out is still completed, so no output holds half an item."""
    model.eval()
    device = model.embed_tokens.weight.device
    V = model.config.vocab_size
    max_len = min(len(prompt) + max_new_tokens + 8, model.config.block_size)
    assert len(prompt) < max_len, "prompt is too long for the model's block size: truncate it first"
    cache = model.new_cache(1, max_len)
    logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
    cache = cache.expand(n)
    logits = logits[:, -1].expand(n, -1)  # (n, V)
    state = [_span_state(prompt, trie, ctrl)] * n
    done = [False] * n
    out = [[] for _ in range(n)]
    while not all(done):
        if cache.pos >= max_len:
            break
        mask = torch.stack([allowed_mask(s, V, trie, ctrl, device) for s in state])  # (n, V)
        if max_len - cache.pos <= trie.depth + 2:
            mask[:, ctrl.boi] = False  # too little room left to finish an item span: don't open one
        x = logits.float().masked_fill(~mask, float("-inf"))
        if greedy:
            nxt = x.argmax(-1)
        else:
            x = x / max(temperature, 1e-5)
            if top_k is not None:
                kth = torch.topk(x, min(top_k, V), dim=-1).values[:, -1:]
                x = x.masked_fill(x < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(x, -1), 1, generator=generator).squeeze(-1)  # (n,)
        for r, tok in enumerate(nxt.tolist()):
            if done[r]:
                continue
            out[r].append(tok)
            if state[r] is None:
                state[r] = trie.root if tok == ctrl.boi else None
            else:
                state[r] = None if tok == ctrl.eoi else state[r][tok]
            if tok == ctrl.eot or (len(out[r]) >= max_new_tokens and state[r] is None):
                done[r] = True
        if all(done):
            break
        logits, _ = model(nxt.view(n, 1), cache=cache)
        logits = logits[:, -1]
    return out


@torch.no_grad()
def beam_search(model, prompt: list[int], trie: SIDTrie, ctrl: Control, beam_width: int = 50,
                cache=None, last_logits=None) -> list[tuple[str, float]]:
    """Top items after a prompt that ends with <BOI>, best first: [(item_id, log P(SID | prompt))].
    Returns up to beam_width items. Pass (cache, last_logits) of an already-prefilled batch-1 prompt
    to skip the prefill."""
    assert prompt[-1] == ctrl.boi, "beam search starts right after <BOI>"
    model.eval()
    device = model.embed_tokens.weight.device
    if cache is None:
        cache = model.new_cache(1, len(prompt) + trie.depth + 1)
        logits, _ = model(torch.tensor([prompt], device=device), cache=cache)
        last_logits = logits[:, -1]
    logp = torch.log_softmax(last_logits.float(), -1)  # (1, V)
    beams = [(trie.root, 0.0)]   # (trie node, summed log-prob), one per cache row
    finished = []
    while beams:
        # every (beam, child) pair, scored
        cand = []
        lp = logp.tolist() if logp.shape[0] * logp.shape[1] < 4_000_000 else None
        for b, (node, score) in enumerate(beams):
            row = lp[b] if lp is not None else logp[b].tolist()
            for tok, child in node.items():
                if tok != SIDTrie.LEAF:
                    cand.append((score + row[tok], b, tok, child))
        cand.sort(key=lambda c: -c[0])
        cand = cand[:beam_width]
        live = []
        for score, b, tok, child in cand:
            if SIDTrie.LEAF in child:
                finished.append((child[SIDTrie.LEAF], score))
            if len(child) > (1 if SIDTrie.LEAF in child else 0):
                live.append((score, b, tok, child))
        if not live:
            break
        # the cache rows of the surviving beams (index_select also grows the batch-1 prefill to n rows)
        cache.reorder(torch.tensor([b for _, b, _, _ in live], device=device))
        toks = torch.tensor([[t] for _, _, t, _ in live], device=device)
        logits, _ = model(toks, cache=cache)
        logp = torch.log_softmax(logits[:, -1].float(), -1)  # (n_live, V)
        beams = [(child, score) for score, _, _, child in live]
    finished.sort(key=lambda f: -f[1])
    return finished[:beam_width]
