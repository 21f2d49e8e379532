"""
Tests for nanocrs/generate.py: trie-constrained sampling never emits an invalid item span (checked on
>= 10,000 spans from an untrained model), beam search over the trie equals exhaustive scoring of
every item, and SIDTrie.build refuses a table where one SID is a prefix of another.

    python -m pytest tests/test_generate.py -q
"""

import math

import pytest
import torch

from nanocrs.data import Renderer
from nanocrs.generate import Control, SIDTrie, beam_search, sample
from nanocrs.model import GPT, GPTConfig
from nanocrs.quantizer import SemanticIDs
from nanocrs.tokenizer import MODE_REC, BOI

BLOCK = 256


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def random_model(vocab_size, seed=0, head_scale=1.0, tie=False):
    """An untrained tiny model; head_scale > 1 spreads the logits (fewer near-ties in rankings)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      tie_embeddings=tie)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)
    return m


def bias_towards_boi(model, boi, strength):
    """Keep the model random but make <BOI> likely everywhere: a constant component on embedding
    dimension 0 survives the RMSNorms, and the <BOI> row of the (untied) head reads it."""
    assert not model.config.tie_embeddings
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] += 1.0
        model.lm_head.weight[boi, 0] = strength


class SpanChecker:
    """Parses generated ids independently of SIDTrie: every <BOI> ... <EOI> must be a catalogue SID,
    no SID token outside a span, no stray <EOI>, no <BOI> inside a span, no span left open."""

    def __init__(self, tok, sids):
        self.valid = {tuple(tok.id(t) for t in sids.tokens(i)): i for i in sids.item_ids}
        self.sid_tokens = {tok.id(t) for t in sids.all_token_strings()}
        self.ctrl = Control.of(tok)
        self.spans = 0
        self.items = set()

    def check(self, ids, in_span=False):
        span = [] if in_span else None
        for k, i in enumerate(ids):
            if span is None:
                assert i not in self.sid_tokens, f"SID token outside a span at {k}: {ids}"
                assert i != self.ctrl.eoi, f"stray <EOI> at {k}: {ids}"
                if i == self.ctrl.boi:
                    span = []
            else:
                assert i != self.ctrl.boi, f"<BOI> inside a span at {k}: {ids}"
                if i == self.ctrl.eoi:
                    assert tuple(span) in self.valid, f"invalid item span {span}: {ids}"
                    self.items.add(self.valid[tuple(span)])
                    self.spans += 1
                    span = None
                else:
                    assert i in self.sid_tokens, f"non-SID token inside a span at {k}: {ids}"
                    span.append(i)
            if i == self.ctrl.eot:
                assert k == len(ids) - 1, "generation continues after <EOT>"
        assert span is None, f"output ends inside an item span: {ids}"


def test_constrained_sampling_never_emits_invalid_items(tok, sids, dataset):
    trie, ctrl = SIDTrie.build(sids, tok), Control.of(tok)
    rd = Renderer(tok, sids, BLOCK)
    checker = SpanChecker(tok, sids)
    depth = trie.depth
    contexts = [d["turns"][:t] for d in dataset["test"] for t in (1, 3, 5) if t < len(d["turns"])]
    contexts = [c for c in contexts if len(rd.prompt(c)) <= BLOCK - 64]  # room for the whole budget
    assert len(contexts) >= 20
    gen = torch.Generator().manual_seed(0)

    # 1. forced recommendations: prompt ends with <MODE=REC><BOI>, the output starts inside a span
    model = random_model(len(tok), seed=1)
    settings = [dict(temperature=1.0), dict(temperature=2.0), dict(temperature=0.5, top_k=5), dict(top_k=50)]
    forced_spans = 0
    for b in range(12):
        prompt = rd.prompt(contexts[b], forced=MODE_REC + BOI)
        max_new = 10
        assert len(prompt) + max_new + 8 <= BLOCK
        outs = sample(model, prompt, trie, ctrl, n=500, max_new_tokens=max_new, generator=gen, **settings[b % 4])
        assert len(outs) == 500
        before = checker.spans
        for o in outs:
            checker.check(o, in_span=True)
            # the budget is respected, except to finish an open span
            assert len(o) <= max_new + depth + 1
            assert o[-1] == ctrl.eot or len(o) >= max_new
        assert checker.spans - before >= 500  # every output names at least the forced item
        forced_spans += checker.spans - before

    # 2. free generation after "Assistant:", from a model nudged towards <BOI> (still untrained)
    free = random_model(len(tok), seed=2)
    bias_towards_boi(free, ctrl.boi, 0.8)
    free_spans = 0
    for b in range(8):
        prompt = rd.prompt(contexts[12 + b])
        max_new = 40
        assert len(prompt) + max_new + 8 <= BLOCK
        before = checker.spans
        for o in sample(free, prompt, trie, ctrl, n=200, max_new_tokens=max_new, generator=gen, **settings[b % 4]):
            checker.check(o, in_span=False)
            assert len(o) <= max_new + depth + 1
        free_spans += checker.spans - before

    assert forced_spans >= 6000 and free_spans >= 1000, (forced_spans, free_spans)
    assert checker.spans >= 10_000
    assert len(checker.items) > len(sids) // 2  # the sampler explores the catalogue, not one item


def test_sampling_completes_spans_when_the_block_is_nearly_full(tok, sids, dataset):
    """sample() promises "no output holds half an item". Chat and show_samples use Renderer.prompt,
    which leaves only 16 tokens of room in a long conversation; the span must still be closed."""
    trie, ctrl = SIDTrie.build(sids, tok), Control.of(tok)
    block = 128
    rd = Renderer(tok, sids, block)
    long_ctx = [{"role": "user", "text": "I like scary movies from the 80s. " * 100, "items": []}]
    prompt = rd.prompt(long_ctx)  # what chat() does with a long message
    assert len(prompt) == block - 16
    model = random_model(len(tok), seed=3)
    model.config.block_size = block
    bias_towards_boi(model, ctrl.boi, 0.8)
    checker = SpanChecker(tok, sids)
    outs = sample(model, prompt, trie, ctrl, n=200, max_new_tokens=64, generator=torch.Generator().manual_seed(0))
    for o in outs:
        checker.check(o)


# -----------------------------------------------------------------------------
# beam search

def exhaustive_scores(model, prompt, tok, sids, items):
    """log P(SID | prompt) of every item by teacher forcing: {item: summed log-prob}."""
    seqs = [[tok.id(t) for t in sids.tokens(i)] for i in items]
    L = len(seqs[0])
    assert all(len(s) == L for s in seqs)
    x = torch.tensor([prompt + s for s in seqs])  # (N, P + L)
    logits, _ = model(x)
    logp = torch.log_softmax(logits.double(), -1)[:, len(prompt) - 1:len(prompt) - 1 + L]  # (N, L, V)
    tgt = torch.tensor(seqs)  # (N, L)
    s = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1)
    return dict(zip(items, s.tolist()))


def subset(sids, n):
    return SemanticIDs(item_ids=sids.item_ids[:n], codes=sids.codes[:n], level_sizes=sids.level_sizes)


def assert_same_ranking(top, scores, atol=1e-4):
    got = [i for i, _ in top]
    assert len(got) == len(set(got)) == len(scores) and set(got) == set(scores)
    for item, lp in top:
        assert abs(lp - scores[item]) < atol, (item, lp, scores[item])
    want = sorted(scores, key=lambda i: -scores[i])
    # identical order; two items may only swap when their exact scores tie to float noise
    for a, b in zip(got, got[1:]):
        assert scores[a] >= scores[b] - 1e-5, (a, b, scores[a], scores[b])
    gaps = [scores[want[k]] - scores[want[k + 1]] for k in range(len(want) - 1)]
    if min(gaps) > 1e-4:
        assert got == want


@pytest.mark.parametrize("n_items", [40, None])
def test_beam_search_equals_exhaustive_scoring(tok, sids, dataset, n_items):
    table = subset(sids, n_items) if n_items else sids
    trie, ctrl = SIDTrie.build(table, tok), Control.of(tok)
    rd = Renderer(tok, sids, BLOCK)  # the context may mention any item; the search runs over `table`
    model = random_model(len(tok), seed=4, head_scale=20.0)
    for d in dataset["val"][:4]:
        prompt = rd.prompt(d["turns"][:3], forced=MODE_REC + BOI)
        scores = exhaustive_scores(model, prompt, tok, table, table.item_ids)
        top = beam_search(model, prompt, trie, ctrl, beam_width=len(table))
        assert_same_ranking(top, scores)
        # a wider beam changes nothing
        assert [i for i, _ in beam_search(model, prompt, trie, ctrl, beam_width=len(table) + 7)] == [i for i, _ in top]


def test_beam_search_with_prefilled_cache(tok, sids, dataset):
    """The eval path: prefill the context, append <MODE=REC><BOI> as a block, then search."""
    trie, ctrl = SIDTrie.build(sids, tok), Control.of(tok)
    rd = Renderer(tok, sids, BLOCK)
    model = random_model(len(tok), seed=5, head_scale=20.0)
    forced = tok.encode(MODE_REC + BOI)
    d = dataset["val"][5]
    prompt = rd.prompt(d["turns"][:5])
    cache = model.new_cache(1, len(prompt) + len(forced) + trie.depth + 1)
    model(torch.tensor([prompt]), cache=cache)
    logits, _ = model(torch.tensor([forced]), cache=cache)
    top = beam_search(model, prompt + forced, trie, ctrl, 30, cache=cache, last_logits=logits[:, -1])
    ref = beam_search(model, prompt + forced, trie, ctrl, 30)
    assert [i for i, _ in top] == [i for i, _ in ref]
    assert max(abs(a - b) for (_, a), (_, b) in zip(top, ref)) < 1e-4


def test_narrow_beam_returns_valid_sorted_items(tok, sids, dataset):
    trie, ctrl = SIDTrie.build(sids, tok), Control.of(tok)
    rd = Renderer(tok, sids, BLOCK)
    model = random_model(len(tok), seed=6, head_scale=20.0)
    agree = 0
    prompts = [rd.prompt(d["turns"][:3], forced=MODE_REC + BOI) for d in dataset["val"][:10]]
    for prompt in prompts:
        scores = exhaustive_scores(model, prompt, tok, sids, sids.item_ids)
        top = beam_search(model, prompt, trie, ctrl, beam_width=10)
        items = [i for i, _ in top]
        lps = [lp for _, lp in top]
        assert len(items) == 10 == len(set(items)) and set(items) <= set(sids.item_ids)
        assert all(a >= b for a, b in zip(lps, lps[1:]))
        assert all(lp <= 0 for lp in lps)
        for item, lp in top:  # the scores are the model's true log-probs of those SIDs
            assert abs(lp - scores[item]) < 1e-4
        agree += items[0] == max(scores, key=scores.get)
    assert agree >= len(prompts) // 2, f"top-1 matched exhaustive search in only {agree}/{len(prompts)} prompts"


def test_beam_search_requires_boi(tok, sids):
    trie, ctrl = SIDTrie.build(sids, tok), Control.of(tok)
    model = random_model(len(tok))
    with pytest.raises(AssertionError):
        beam_search(model, tok.encode("Assistant:"), trie, ctrl, 5)


# -----------------------------------------------------------------------------
# the trie

class FakeSIDs:
    """Just what SIDTrie.build reads; SemanticIDs itself can not hold SIDs of different lengths."""

    def __init__(self, table, all_tokens):
        self.table, self.item_ids, self.all = table, list(table), all_tokens

    def tokens(self, item):
        return self.table[item]

    def all_token_strings(self):
        return self.all


def test_trie_build_and_walk(tok, sids):
    trie = SIDTrie.build(sids, tok)
    pairs = list(trie.items())
    assert len(pairs) == len(sids)
    assert {item: tuple(ids) for ids, item in pairs} == {i: tuple(tok.id(t) for t in sids.tokens(i)) for i in sids.item_ids}
    assert trie.depth == len(sids.level_sizes)
    assert trie.sid_token_ids == {tok.id(t) for t in sids.all_token_strings()}
    ids = [tok.id(t) for t in sids.tokens(sids.item_ids[3])]
    assert trie.walk(ids)[SIDTrie.LEAF] == sids.item_ids[3]
    assert trie.walk([tok.id("<EOT>")]) is None


@pytest.mark.parametrize("order", [("short", "long"), ("long", "short")])
def test_trie_rejects_prefix_sids(tok, order):
    table = {"short": ["<a_0>", "<b_1>"], "long": ["<a_0>", "<b_1>", "<c_0>"], "other": ["<a_1>", "<b_0>", "<c_0>"]}
    fake = FakeSIDs({k: table[k] for k in order + ("other",)}, ["<a_0>", "<a_1>", "<b_0>", "<b_1>", "<c_0>"])
    with pytest.raises((AssertionError, ValueError), match="prefix|extends"):
        SIDTrie.build(fake, tok)
    # without the offending pair the same table is fine
    ok = SIDTrie.build(FakeSIDs({"long": table["long"], "other": table["other"]}, fake.all), tok)
    assert len(list(ok.items())) == 2
