"""
Tests for the heads (nanocrs/heads.py): their training loss is the mixture's exact per-token
factorisation, beam search over it equals scoring every item by the mixture, the sampler draws from
the same mixture, and a checkpoint trained with --heads evaluates end to end.

    python -m pytest tests/test_heads.py -q
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from conftest import ENV, REPO, run_cli, run_train
from nanocrs import checkpoint
from nanocrs.data import MENTION, Renderer
from nanocrs.generate import SIDTrie, beam_search, beam_search_batch, beam_search_reference, sample
from nanocrs.metrics import COPY_BIASES, choose_copy_bias
from nanocrs.model import GPT, GPTConfig
from nanocrs.heads import Heads, HeadsConfig, find_spans, turn_bucket, turn_state
from nanocrs.session import Knobs
from nanocrs.tokenizer import BOI, MODE_REC, Control
from test_generate import SpanChecker, subset

BLOCK = 256


def heads_model(tok, seed=0, gate_bias=None, table=None, item_context=False, distinct=False, assoc_fresh=False,
                  turns=False):
    """An untrained tiny model with a copy head whose attention is far from uniform; with a table,
    also the association head over its items (bound to its trie), its scores far from uniform too,
    and with item_context its query reading the context's items (input rows random, not zero); with
    turns, random turn-bucket biases (not zero)."""
    torch.manual_seed(seed)
    items = len(table.item_ids) if table is not None else 0
    heads = HeadsConfig(pointer=16, assoc=2 if item_context else int(bool(items)), assoc_fresh=assoc_fresh,
                        distinct_sequences=distinct, copy_turns=turns).bind(Control.of(tok), items)
    m = GPT(GPTConfig(vocab_size=len(tok), block_size=BLOCK, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                      tie_embeddings=False), heads=lambda n: Heads(n, heads))
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
        m.heads.q.weight.mul_(30.0)
        m.heads.recency.normal_()
        if turns:
            m.heads.turn_attn.normal_(std=2.0)
            m.heads.turn_gate.normal_(std=2.0)
        if gate_bias is not None:  # a fixed gate: g = sigmoid(gate_bias)
            m.heads.gate.weight.zero_()
            m.heads.gate.bias.fill_(gate_bias)
        if items:
            m.heads.qa.weight.mul_(30.0)
            m.heads.item_bias.normal_()
            if item_context:
                m.heads.item_in.normal_(std=3.0)
            trie = SIDTrie.build(table, tok)
            m.heads.bind(trie, trie.tensors(Control.of(tok), len(tok), "cpu"))
    return m.eval()


def mix(model, trie, ctrl, knobs=None, prior=None):
    """The model's slot mixture over this catalogue, as a Session hands it to the decoders."""
    return model.heads.mixture(trie, trie.tensors(ctrl, model.config.vocab_size, "cpu"), knobs, prior)


def dialog_with_mentions(dataset, table, n_mentions=2):
    """(context turns, an item mentioned in them) from the first val dialog whose context mentions at
    least n_mentions catalogue items of `table`, all of them in it."""
    for d in dataset["val"]:
        for t in range(1, len(d["turns"])):
            ctx = d["turns"][:t]
            named = [i for turn in ctx for i in MENTION.findall(turn["text"])]
            if len(named) >= n_mentions and all(i in table.item_ids for i in named):
                return ctx, named[0]
    raise AssertionError("no dialog with enough mentions")


def slot_example(rd, ctx, item):
    """(x (1, T), y (1, T), slot position): context + a REC turn that recommends `item` again."""
    target = {"role": "assistant", "text": f"try @{{{item}}} again", "items": [item]}
    ids, targets = rd.example(ctx, target)
    s0 = max(p for p in range(1, len(ids)) if ids[p] == rd.ctrl.boi and ids[p - 1] == rd.ctrl.mode_rec)
    return torch.tensor([ids]), torch.tensor([targets]), s0


def test_loss_is_the_mixture_factorised_per_token(tok, sids, dataset):
    rd = Renderer(tok, sids, BLOCK)
    ctx, item = dialog_with_mentions(dataset, sids)
    x, y, s0 = slot_example(rd, ctx, item)
    model = heads_model(tok)
    with torch.no_grad():
        per = model(x, y, reduction="none")[1]                           # (N,) the supervised positions
        logits, h = model(x, return_hidden=True)
    rows = (y[0] != -1).nonzero().squeeze(1)
    plain = F.cross_entropy(logits[0, rows], y[0, rows], reduction="none")
    L = len(sids.tokens(item))
    slot = [(rows == s0 + l).nonzero().item() for l in range(L)]         # position s0 + l predicts s_(l+1)
    others = [r for r in range(len(rows)) if r not in slot]
    assert torch.allclose(per[others], plain[others], atol=1e-5)      # everywhere else: plain cross-entropy
    assert (per[slot] >= -1e-6).all()                                    # each is -log of a probability <= 1
    # the slot's tokens together: -log((1 - g) P_gen(item) + g P_copy(item)), from the definitions
    ids = x[0].tolist()
    spans = find_spans(ids, rd.ctrl.boi, rd.ctrl.eoi, s0)
    assert len(spans) >= 2
    with torch.no_grad():
        log_g, log_1mg, a, _ = model.heads.attend(h[0, [s0]], h[0, [[e for _, e in spans]]],
                                                 torch.ones(1, len(spans), dtype=torch.bool))
    p_copy = sum(float(a[0, j]) for j, (s, e) in enumerate(spans) if ids[s + 1:e] == ids[s0 + 1:s0 + 1 + L])
    assert p_copy > 0
    p_gen = math.exp(-float(plain[slot].sum()))
    g = math.exp(float(log_g))
    assert float(per[slot].sum()) == pytest.approx(-math.log((1 - g) * p_gen + g * p_copy), rel=1e-4)
    # the reductions agree, and a gradient reaches the copy head
    model.train()
    _, loss = model(x, y, reduction="sum")
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())


def test_closed_gate_or_no_context_item_is_the_plain_model(tok, sids, dataset):
    rd = Renderer(tok, sids, BLOCK)
    ctx, item = dialog_with_mentions(dataset, sids)
    x, y, _ = slot_example(rd, ctx, item)
    model = heads_model(tok, gate_bias=-60.0)
    with torch.no_grad():
        per = model(x, y, reduction="none")[1]
        logits, _ = model(x)
    rows = (y[0] != -1).nonzero().squeeze(1)
    assert torch.allclose(per, F.cross_entropy(logits[0, rows], y[0, rows], reduction="none"), atol=1e-5)
    # no item span before the slot: g = 0 whatever the gate says
    model = heads_model(tok, gate_bias=60.0)
    x, y, _ = slot_example(rd, [{"role": "user", "text": "any film will do", "items": []}], item)
    with torch.no_grad():
        per = model(x, y, reduction="none")[1]
        logits, _ = model(x)
    rows = (y[0] != -1).nonzero().squeeze(1)
    assert torch.allclose(per, F.cross_entropy(logits[0, rows], y[0, rows], reduction="none"), atol=1e-6)


@pytest.mark.parametrize("item_context,fresh", [(False, False), (True, False), (True, True)])
def test_association_head_loss_is_the_three_way_mixture(tok, sids, dataset, item_context, fresh):
    rd = Renderer(tok, sids, BLOCK)
    trie = SIDTrie.build(sids, tok)
    ctx, item = dialog_with_mentions(dataset, sids)  # the slot recommends `item` again: a repeat
    model = heads_model(tok, table=sids, item_context=item_context, assoc_fresh=fresh)
    for context in (ctx, [{"role": "user", "text": "any film will do", "items": []}]):  # with and without items
        x, y, s0 = slot_example(rd, context, item)
        with torch.no_grad():
            per = model(x, y, reduction="none")[1]
            logits, h = model(x, return_hidden=True)
        rows = (y[0] != -1).nonzero().squeeze(1)
        plain = F.cross_entropy(logits[0, rows], y[0, rows], reduction="none")
        L = len(sids.tokens(item))
        slot = [(rows == s0 + l).nonzero().item() for l in range(L)]
        others = [r for r in range(len(rows)) if r not in slot]
        assert torch.allclose(per[others], plain[others], atol=1e-5)
        # from the definitions: w = softmax(0, z_copy, z_assoc), P_assoc = softmax(a(h) . e / sqrt(d) + c)
        ids, ptr = x[0].tolist(), model.heads
        spans = find_spans(ids, rd.ctrl.boi, rd.ctrl.eoi, s0)
        with torch.no_grad():
            hs = h[0, s0]
            z_copy = float(ptr.gate(hs)) if spans else float("-inf")
            w = torch.softmax(torch.tensor([0.0, z_copy, float(ptr.gate_assoc(hs))]), 0).tolist()
            query = ptr.qa(hs)  # + with item_context, the input row of every item the context named
            if item_context:
                named = [trie.item_index(ids[s + 1:e]) for s, e in spans]
                assert None not in named and len(named) >= (2 if context is ctx else 0)
                query = query + sum((ptr.item_in[i] for i in named), torch.zeros_like(query))
            score = query @ ptr.item_emb.weight.T / 4.0 + ptr.item_bias
            if fresh:  # assoc-fresh=1: the head ranks only the items the context did not name
                score[[trie.item_index(ids[s + 1:e]) for s, e in spans]] = float("-inf")
            p_assoc = torch.softmax(score, 0)[trie.index[item]]
            assert (float(p_assoc) == 0.0) == (fresh and context is ctx)
            p_copy = 0.0
            if spans:
                _, _, a, share = ptr.attend(h[0, [s0]], h[0, [[e for _, e in spans]]], torch.ones(1, len(spans), dtype=torch.bool))
                a = a / (1 - share)  # attend gives the copy weights as shares of g
                p_copy = sum(float(a[0, j]) for j, (s, e) in enumerate(spans) if ids[s + 1:e] == ids[s0 + 1:s0 + 1 + L])
                assert p_copy > 0
        p_gen = math.exp(-float(plain[slot].sum()))
        want = -math.log(w[0] * p_gen + w[1] * p_copy + w[2] * float(p_assoc)) - math.log(p_gen)  # + the SID path's own
        assert float(per[slot].sum()) == pytest.approx(want, rel=1e-4)
    # a gradient reaches every parameter of both heads (with assoc-fresh=1, from a repeat and a target not
    # yet named together: a repeat's probability is the copy head's and the SID path's alone, a new one's
    # the association head's and the SID path's)
    model.train()
    named = {i for turn in ctx for i in MENTION.findall(turn["text"])}
    for target in [item] + ([next(i for i in sids.item_ids if i not in named)] if fresh else []):
        x, y, _ = slot_example(rd, ctx, target)
        model(x, y, reduction="sum")[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())
    # an unbound head refuses to train, in one line
    model = heads_model(tok)
    model.heads = Heads(32, HeadsConfig(pointer=16, assoc=1).bind(Control.of(tok), len(sids.item_ids)))
    with pytest.raises(AssertionError, match="bind"):
        model(x, y)


@pytest.mark.parametrize("item_context", [False, True])
def test_item_sequence_slots_are_scored_given_no_repeat(tok, sids, dataset, item_context):
    """distinct-sequences=1: at the slot of an items-only turn (no <RESP> after its ID) the mixture has
    no copy component and P_assoc is renormalised over the items the context did not name; a text
    turn's slot is scored as without the option, and so is everything with it off."""
    rd = Renderer(tok, sids, BLOCK)
    trie = SIDTrie.build(sids, tok)
    a, b, c = sids.item_ids[:3]
    seq = [{"role": "user", "text": f"@{{{a}}}", "items": [a]}, {"role": "assistant", "text": f"@{{{b}}}", "items": [b]}]
    (ids, targets), = rd.dialog_windows({"items_only": True, "turns": seq + [{"role": "assistant", "text": f"@{{{c}}}", "items": [c]}]})
    x, y = torch.tensor([ids]), torch.tensor([targets])
    s0 = max(p for p in range(1, x.shape[1]) if x[0, p] == rd.ctrl.boi and x[0, p - 1] == rd.ctrl.mode_rec)
    assert x[0, -1] == rd.ctrl.eoi  # the rendering the option keys on: no <RESP> after the ID
    plain_model = heads_model(tok, table=sids, item_context=item_context)
    model = heads_model(tok, table=sids, item_context=item_context, distinct=True)
    model.load_state_dict(plain_model.state_dict())
    with torch.no_grad():
        per, base = model(x, y, reduction="none")[1], plain_model(x, y, reduction="none")[1]
        logits, h = model(x, return_hidden=True)
    rows = (y[0] != -1).nonzero().squeeze(1)
    plain = F.cross_entropy(logits[0, rows], y[0, rows], reduction="none")
    L = len(sids.tokens(c))
    slot = [(rows == s0 + l).nonzero().item() for l in range(L)]
    ptr, ids = model.heads, x[0].tolist()
    with torch.no_grad():
        hs = h[0, s0]
        w = torch.softmax(torch.tensor([0.0, float(ptr.gate_assoc(hs))]), 0).tolist()  # no copy weight
        named = [trie.item_index(ids[s + 1:e]) for s, e in find_spans(ids, rd.ctrl.boi, rd.ctrl.eoi, s0)]
        assert sorted(named) == sorted([trie.index[a], trie.index[b]])
        query = ptr.qa(hs) + (sum(ptr.item_in[i] for i in named) if item_context else 0.0)
        score = query @ ptr.item_emb.weight.T / 4.0 + ptr.item_bias
        score[named] = float("-inf")
        p_assoc = torch.softmax(score, 0)[trie.index[c]]
    p_gen = math.exp(-float(plain[slot].sum()))
    want = -math.log(w[0] * p_gen + w[1] * float(p_assoc)) - math.log(p_gen)
    assert float(per[slot].sum()) == pytest.approx(want, rel=1e-4)
    assert abs(float(per[slot].sum()) - float(base[slot].sum())) > 1e-3  # the option changed this slot
    # a text turn's slot (its ID followed by <RESP>) is scored as without the option
    ctx, item = dialog_with_mentions(dataset, sids)
    x, y, _ = slot_example(rd, ctx, item)
    with torch.no_grad():
        assert torch.equal(model(x, y, reduction="none")[1], plain_model(x, y, reduction="none")[1])
    # and a gradient still reaches every parameter of the head from an items-only slot alone
    model.train()
    model(torch.tensor([ids]), torch.tensor([targets]), reduction="sum")[1].backward()
    assert all(p.grad is not None for n, p in model.heads.named_parameters())


def exhaustive_mixture(model, prompt, trie, log_g: float, leaf_mass) -> list:
    """Every item scored by teacher forcing, mixed with its copy-and-association mass leaf_mass[item
    index]: [(item, log P_mix(item))], best first."""
    want = []
    for ids, item in trie.items():
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + ids[:-1]]))
        logp = torch.log_softmax(logits[0, len(prompt) - 1:].float(), -1)
        gen = sum(float(logp[k, t]) for k, t in enumerate(ids))
        p = float(leaf_mass[trie.item_index(ids)])
        want.append((item, math.log((1 - math.exp(log_g)) * math.exp(gen) + math.exp(log_g) * p)))
    return sorted(want, key=lambda w: -w[1])


@pytest.mark.parametrize("seed,assoc", [(0, False), (1, False), (0, True), (0, "item_context"), (0, "fresh"), (0, "fresh+bias"),
                                        (0, "fresh+turns"), (0, "fresh+named")])
def test_beam_with_copy_equals_exhaustive_mixture(tok, sids, dataset, seed, assoc):
    table = subset(sids, 60)
    trie, ctrl = SIDTrie.build(table, tok), Control.of(tok)
    rd = Renderer(tok, table, BLOCK)
    ctx, _ = dialog_with_mentions(dataset, table)
    prompt = rd.prompt(ctx, forced=MODE_REC + BOI)
    option = assoc.split("+")[1] if isinstance(assoc, str) and "+" in assoc else None
    assoc, bias = (assoc.split("+")[0] if option else assoc), (1.5 if option == "bias" else 0.0)
    model = heads_model(tok, seed=seed, gate_bias=0.5, table=table if assoc else None, item_context=assoc in ("item_context", "fresh"),
                          assoc_fresh=assoc == "fresh", turns=option in ("turns", "named"))
    knobs = Knobs(copy_bias=bias)  # the calibrated gates: decoding's mixture is still exactly the one ranked
    if option == "named":  # (the context must end with the seeker's item for this bias to act)
        knobs = Knobs(copy_bias=bias, just_named_bias=1.5)
        ctx = ctx + [{"role": "user", "text": f"and @{{{table.item_ids[5]}}}", "items": [table.item_ids[5]]}]
        prompt = rd.prompt(ctx, forced=MODE_REC + BOI)
    with torch.no_grad():
        _, h = model(torch.tensor([prompt]), return_hidden=True)
    tt = trie.tensors(ctrl, len(tok), "cpu")
    log_g, log_1mg, mass = model.heads.slot_mass(h, [prompt], [len(prompt) - 1], (trie, tt), knobs)
    leaf_mass = mass[0, tt.item_path[torch.arange(len(trie.item_ids)), [len(ids) - 1 for ids, _ in
                                                  sorted(trie.items(), key=lambda p: trie.item_index(p[0]))]]]
    assert float(leaf_mass.sum()) == pytest.approx(1.0) and (leaf_mass > 0).sum() >= (len(trie.item_ids) if assoc else 2)
    if assoc == "fresh":  # a named item's mass is the copy head's alone: its spans' copy weights
        spans = find_spans(prompt, ctrl.boi, ctrl.eoi)
        named = [trie.item_index(prompt[s + 1:e]) for s, e in spans]
        state, slot = turn_state(prompt, (ctrl.mode_rec, ctrl.mode_chat), ctrl.eot), len(prompt) - 1
        turn = torch.tensor([[turn_bucket(state, s, slot) for s, _ in spans]])
        with torch.no_grad():
            _, _, a, _ = model.heads.attend(h[0, [slot]], h[0, [[e for _, e in spans]]],
                                            torch.ones(1, len(spans), dtype=torch.bool), turn=turn, knobs=knobs)
        for i in set(named):
            assert float(leaf_mass[i]) == pytest.approx(sum(float(a[0, j]) for j, n in enumerate(named) if n == i), rel=1e-5)
    want = exhaustive_mixture(model, prompt, trie, float(log_g), leaf_mass)
    n = len(trie.item_ids)
    got = beam_search(model, prompt, trie, ctrl, n, mix(model, trie, ctrl, knobs))
    assert [i for i, _ in got] == [i for i, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-5
    if not assoc:
        copied = {trie.item_ids[i] for i in (leaf_mass > 0).nonzero().squeeze(1).tolist()}
        assert got[0][0] in copied  # the open gate puts them first
    for W in (n, 10, 3):
        ref = beam_search_reference(model, prompt, trie, ctrl, W, mix(model, trie, ctrl, knobs))
        tens = beam_search(model, prompt, trie, ctrl, W, mix(model, trie, ctrl, knobs))
        assert [i for i, _ in tens] == [i for i, _ in ref]
        assert max(abs(a - b) for (_, a), (_, b) in zip(tens, ref)) < 1e-5
    # in a left-padded batch, the same lists
    other = rd.prompt(ctx[:1], forced=MODE_REC + BOI)
    batched = beam_search_batch(model, [prompt, other], trie, ctrl, 10, mix(model, trie, ctrl, knobs))
    assert [i for i, _ in batched[0]] == [i for i, _ in beam_search(model, prompt, trie, ctrl, 10, mix(model, trie, ctrl, knobs))]
    assert [i for i, _ in batched[1]] == [i for i, _ in beam_search(model, other, trie, ctrl, 10, mix(model, trie, ctrl, knobs))]


def test_turn_buckets_say_who_named_an_item_and_how_many_turns_ago(tok, sids, dataset):
    """The buckets from the token ids (the seeker's item just before the slot is 0, the recommender's
    last turn 3, capped at 2 turns), and with copy-turns=1 the loss and the decoding mixture both use them."""
    table = subset(sids, 60)
    A, B, C = table.item_ids[:3]
    user = lambda text, *items: {"role": "user", "text": text, "items": list(items)}
    bot = lambda text, *items: {"role": "assistant", "text": text, "items": list(items)}
    ctx = [user(f"I loved @{{{A}}}", A), bot("what else?"), user("hm"), bot(f"then @{{{B}}}", B), user("ok"),
           bot("anything?"), user(f"and @{{{C}}} too", C)]
    rd, ctrl = Renderer(tok, table, BLOCK), Control.of(tok)
    prompt = rd.prompt(ctx, forced=MODE_REC + BOI)
    slot, spans = len(prompt) - 1, find_spans(prompt, ctrl.boi, ctrl.eoi)
    state = turn_state(prompt, (ctrl.mode_rec, ctrl.mode_chat), ctrl.eot)
    assert [turn_bucket(state, s, slot) for s, _ in spans] == [2, 4, 4, 0]  # A: 3 turns ago, capped; B (slot and text): 1
    prompt2 = rd.prompt(ctx[:3], forced=MODE_REC + BOI)  # A, one recommender turn ago
    state2 = turn_state(prompt2, (ctrl.mode_rec, ctrl.mode_chat), ctrl.eot)
    assert [turn_bucket(state2, s, len(prompt2) - 1) for s, _ in find_spans(prompt2, ctrl.boi, ctrl.eoi)] == [1]
    # training: the slot's loss is the mixture with the buckets' biases, and they get a gradient
    model = heads_model(tok, table=table, item_context=True, assoc_fresh=True, turns=True)
    ptr = model.heads
    x, y, s0 = slot_example(rd, ctx, A)
    ids = x[0].tolist()
    with torch.no_grad():
        per = model(x, y, reduction="none")[1]
        _, h = model(x, return_hidden=True)
        turn = torch.tensor([[turn_bucket(turn_state(ids, (ctrl.mode_rec, ctrl.mode_chat), ctrl.eot), s, s0)
                              for s, _ in find_spans(ids, ctrl.boi, ctrl.eoi, s0)]])
        assert turn.tolist() == [[2, 4, 4, 0]]
        keys, valid = h[0, [[e for _, e in find_spans(ids, ctrl.boi, ctrl.eoi, s0)]]], torch.ones(1, 4, dtype=torch.bool)
        log_g, _, a, _ = ptr.attend(h[0, [s0]], keys, valid, turn=turn)
        log_g0, _, a0, _ = ptr.attend(h[0, [s0]], keys, valid, turn=torch.full_like(turn, 5))
        # decoding: the same gate and weights as training's, which the biases move
        _, hp = model(torch.tensor([rd.prompt(ctx, forced=MODE_REC + BOI)]), return_hidden=True)
    assert torch.allclose(hp[0], h[0, :s0 + 1], atol=1e-5)
    trie = SIDTrie.build(table, tok)
    g_dec, _, _ = ptr.slot_mass(hp, [prompt], [slot], (trie, trie.tensors(ctrl, len(tok), "cpu")))
    assert float(g_dec) == pytest.approx(float(log_g), abs=1e-5) and abs(float(log_g) - float(log_g0)) > 1e-3
    assert not torch.allclose(a, a0)
    model.train()
    _, loss = model(x, y, reduction="sum")
    loss.backward()
    assert ptr.turn_gate.grad[0] != 0 and (ptr.turn_attn.grad[[0, 2, 4]] != 0).all()
    assert (ptr.turn_gate.grad[[1, 2, 3, 4, 5]] == 0).all()  # only the latest span's bucket feeds the gate
    assert torch.isfinite(per).all()


def test_copy_bias_multiplies_the_copy_odds_alone(tok, sids, dataset):
    """The calibrated gate: the copy component's odds against each other component grow by exp(bias),
    the others' odds against each other stay, and so does the order of the items the context did not name."""
    table = subset(sids, 60)
    trie, ctrl = SIDTrie.build(table, tok), Control.of(tok)
    ctx, _ = dialog_with_mentions(dataset, table)
    prompt = Renderer(tok, table, BLOCK).prompt(ctx, forced=MODE_REC + BOI)
    model = heads_model(tok, gate_bias=-1.0, table=table, item_context=True, assoc_fresh=True)
    with torch.no_grad():
        _, h = model(torch.tensor([prompt]), return_hidden=True)
    spans = find_spans(prompt, ctrl.boi, ctrl.eoi)
    keys, valid = h[0, [[e for _, e in spans]]], torch.ones(1, len(spans), dtype=torch.bool)
    weights = []  # (w_gen, w_copy, w_assoc) at bias 0 and 2
    for b in (0.0, 2.0):
        with torch.no_grad():
            log_g, log_1mg, a, share = model.heads.attend(h[0, [len(prompt) - 1]], keys, valid, knobs=Knobs(copy_bias=b))
        g = float(log_g.exp())
        weights.append((float(log_1mg.exp()), g * float(a.sum()), g * float(share)))
    (g0, c0, s0), (g2, c2, s2) = weights
    assert c2 / g2 == pytest.approx(math.exp(2.0) * c0 / g0, rel=1e-4) and s2 / g2 == pytest.approx(s0 / g0, rel=1e-4)
    named = {trie.item_ids[trie.item_index(prompt[s + 1:e])] for s, e in spans}
    lists = []
    for b in (0.0, 2.0):
        lists.append(beam_search(model, prompt, trie, ctrl, len(trie.item_ids), mix(model, trie, ctrl, Knobs(copy_bias=b))))
    assert [i for i, _ in lists[0] if i not in named] == [i for i, _ in lists[1] if i not in named]
    place = [{i: r for r, (i, _) in enumerate(lst)} for lst in lists]
    assert all(place[1][i] <= place[0][i] for i in named)


def test_just_named_bias_moves_only_the_slots_after_the_seekers_item(tok, sids, dataset):
    """The calibrated gate for the item the seeker just named: where the latest span is in bucket 0 the
    copy odds grow by exp(bias) and, within the copy, so do the bucket-0 spans' odds against the others;
    where it is in any other bucket nothing moves."""
    table = subset(sids, 60)
    A, B = table.item_ids[:2]
    ctx = [{"role": "user", "text": f"I loved @{{{A}}}", "items": [A]}, {"role": "assistant", "text": f"try @{{{B}}}", "items": [B]},
           {"role": "user", "text": f"seen @{{{B}}} and @{{{A}}}", "items": [B, A]}]
    rd, ctrl, trie = Renderer(tok, table, BLOCK), Control.of(tok), SIDTrie.build(table, tok)
    tt = trie.tensors(ctrl, len(tok), "cpu")
    model = heads_model(tok, gate_bias=-1.0, table=table, item_context=True, assoc_fresh=True, turns=True)
    ptr = model.heads
    for context, bucket in ((ctx, 0), (ctx[:2], 3)):  # the seeker's item just named; the recommender's own last turn
        prompt = rd.prompt(context, forced=MODE_REC + BOI)
        slot, spans = len(prompt) - 1, find_spans(prompt, ctrl.boi, ctrl.eoi)
        turn = torch.tensor([[turn_bucket(turn_state(prompt, (ctrl.mode_rec, ctrl.mode_chat), ctrl.eot), s, slot) for s, _ in spans]])
        assert int(turn[0, -1]) == bucket
        with torch.no_grad():
            _, h = model(torch.tensor([prompt]), return_hidden=True)
            keys, valid = h[0, [[e for _, e in spans]]], torch.ones(1, len(spans), dtype=torch.bool)
            (lg0, l1m0, a0, _), (lg2, l1m2, a2, _) = (ptr.attend(h[0, [slot]], keys, valid, turn=turn,
                                                                 knobs=Knobs(just_named_bias=b)) for b in (0.0, 2.0))
        # the copy component's weight against the plain model's: odds0 -> odds2
        odds0, odds2 = (float(lg.exp() * a.sum() / l1m.exp()) for lg, a, l1m in ((lg0, a0, l1m0), (lg2, a2, l1m2)))
        odds_in = [a[0] / a[0, ~(turn[0] == 0)].sum() for a in (a0, a2)]  # each span against the other buckets' spans
        lift = torch.where(turn[0] == 0, math.exp(2.0), 1.0) if bucket == 0 else torch.ones(len(spans))
        assert torch.allclose(odds_in[1], lift * odds_in[0], rtol=1e-4)
        masses = [ptr.slot_mass(h, [prompt], [slot], (trie, tt), Knobs(just_named_bias=b)) for b in (0.0, 2.0)]
        if bucket == 0:
            assert odds2 == pytest.approx(math.exp(2.0) * odds0, rel=1e-4)
            assert float(masses[1][0]) > float(masses[0][0])  # more of the mass goes to the two heads
        else:
            assert odds2 == pytest.approx(odds0, rel=1e-6)
            assert all(torch.equal(x, y) for x, y in zip(*masses))


def test_text_prior_reweights_the_association_head_alone(tok, sids, dataset):
    """The text prior's logits multiply P_assoc (renormalised) and move nothing else: the gate, the copy
    weights and the named items' copy mass stay; beam search over the mixture with the prior is still
    exactly every item scored by it; a zero prior is no prior, in the sampler too."""
    table = subset(sids, 60)
    trie, ctrl = SIDTrie.build(table, tok), Control.of(tok)
    ctx, _ = dialog_with_mentions(dataset, table)
    prompt = Renderer(tok, table, BLOCK).prompt(ctx, forced=MODE_REC + BOI)
    model = heads_model(tok, gate_bias=-1.0, table=table, item_context=True, assoc_fresh=True)
    tt, n = trie.tensors(ctrl, len(tok), "cpu"), len(trie.item_ids)
    prior = torch.randn(1, n, generator=torch.Generator().manual_seed(0)) * 3.0
    cache = model.new_cache(1, len(prompt) + trie.depth + 1)
    with torch.no_grad():
        logits, h = model(torch.tensor([prompt]), cache=cache, return_hidden=True)
    spans = find_spans(prompt, ctrl.boi, ctrl.eoi)
    item = torch.tensor([[trie.item_index(prompt[s + 1:e]) for s, e in spans]])
    ok, exclude = torch.ones_like(item, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        p0 = model.heads.assoc_probs(h[0, [len(prompt) - 1]], item, ok, exclude)
        p1 = model.heads.assoc_probs(h[0, [len(prompt) - 1]], item, ok, exclude, prior)
    unnamed = p0 > 0
    assert torch.allclose(p1[unnamed], (p0 * prior.exp())[unnamed] / (p0 * prior.exp())[unnamed].sum(), rtol=1e-4)
    assert float(p1[~unnamed].sum()) == 0.0  # with assoc_fresh the named items stay the copy head's
    g0, g10, m0 = model.heads.slot_mass(h, [prompt], [len(prompt) - 1], (trie, tt))
    g1, g11, m1 = model.heads.slot_mass(h, [prompt], [len(prompt) - 1], (trie, tt), None, prior)
    assert float(g0) == float(g1) and float(g10) == float(g11)
    depth = [len(ids) - 1 for ids, _ in sorted(trie.items(), key=lambda p: trie.item_index(p[0]))]
    leaf = m1[0, tt.item_path[torch.arange(n), depth]]
    named = item[0].unique()
    assert torch.allclose(leaf[named], m0[0, tt.item_path[named, torch.tensor(depth)[named]]])
    want = exhaustive_mixture(model, prompt, trie, float(g1), leaf)
    got = beam_search(model, prompt, trie, ctrl, n, prefilled=(cache, logits[:, -1], (g1, g11, m1)))
    assert [i for i, _ in got] == [i for i, _ in want]
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < 1e-5
    plain = sample(model, prompt, trie, ctrl, max_new_tokens=12, greedy=True, mixture=mix(model, trie, ctrl))[0]
    with_zero = mix(model, trie, ctrl, prior=torch.zeros(1, n))
    assert sample(model, prompt, trie, ctrl, max_new_tokens=12, greedy=True, mixture=with_zero)[0] == plain


def test_sampler_draws_from_the_mixture(tok, sids, dataset):
    rd = Renderer(tok, sids, BLOCK)
    trie, ctrl = SIDTrie.build(sids, tok), Control.of(tok)
    ctx, _ = dialog_with_mentions(dataset, sids)
    prompt = rd.prompt(ctx, forced=MODE_REC + BOI)
    named = set(MENTION.findall(" ".join(t["text"] for t in ctx)))
    # the gate wide open: greedy decoding writes the copy head's favourite, a context item
    model = heads_model(tok, gate_bias=60.0)
    out = sample(model, prompt, trie, ctrl, max_new_tokens=12, greedy=True, mixture=mix(model, trie, ctrl))[0]
    first = rd.item_of(out[:out.index(ctrl.eoi)])
    assert first in named
    assert first == beam_search(model, prompt, trie, ctrl, 5, mix(model, trie, ctrl))[0][0]
    # the gate shut: exactly the plain model's greedy output
    model = heads_model(tok, gate_bias=-60.0)
    want = sample(model, prompt, trie, ctrl, max_new_tokens=12, greedy=True, mixture=mix(model, trie, ctrl))[0]
    assert sample(model, prompt, trie, ctrl, max_new_tokens=12, greedy=True)[0] == want
    # sampled free-mode turns name only catalogue items, copy head or not
    model = heads_model(tok, gate_bias=0.0)
    checker = SpanChecker(tok, sids)
    g = torch.Generator().manual_seed(0)
    for row in sample(model, rd.prompt(ctx), trie, ctrl, n=16, max_new_tokens=24, generator=g, mixture=mix(model, trie, ctrl)):
        checker.check(row)


def test_train_and_evaluate_with_pointer(dataset_dir, tmp_path):
    out = run_train(dataset_dir, str(tmp_path / "P"), ["--heads", "pointer=8", "--max-steps", "3"])
    model, config, tok, sids = checkpoint.load(out)
    assert config["heads"]["pointer"] == 8 and model.heads is not None and config["train"]["heads"] == model.heads.config.spec()
    assert model.heads.boi == Control.of(tok).boi
    r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "20", "--max-gen", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "standard protocol" in r.stdout
    # --calibrate copy on val chooses the copy gate's bias, saves it beside the REC threshold that
    # --calibrate chose, and later evals use it (--knob copy=B overrides it; both at once: one line)
    r = run_cli("sample.py", "--ckpt", out, "--eval", "val", "--max-samples", "6", "--max-gen", "0", "--calibrate")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.load(open(os.path.join(out, "calibration.json")))
    assert "copy_bias" not in saved and 0 <= saved["rec_threshold"] <= 1
    r = run_cli("sample.py", "--ckpt", out, "--eval", "val", "--max-samples", "6", "--max-gen", "0", "--calibrate", "copy")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = {**saved, **json.load(open(os.path.join(out, "calibration.json")))}
    assert saved == json.load(open(os.path.join(out, "calibration.json")))  # the threshold kept
    assert saved["copy_bias"] in COPY_BIASES and len(saved["copy_bias_grid"]) == len(COPY_BIASES)
    assert saved["copy_bias"] == choose_copy_bias({float(b): m for b, m in saved["copy_bias_grid"].items()})
    r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "6", "--max-gen", "0")
    assert f"(copy bias {saved['copy_bias']}," in r.stdout
    r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "6", "--max-gen", "0", "--knob", "copy=0.25")
    assert "(copy bias 0.25," in r.stdout
    r = run_cli("sample.py", "--ckpt", out, "--eval", "val", "--calibrate", "copy", "--knob", "copy=1")
    assert r.returncode != 0 and "--knob copy=1" in r.stderr.strip().splitlines()[-1]
    for bad in ("copy=nan", "text=-1", "threshold=2", "gate=1"):  # validated once, one line naming the flag
        r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--knob", bad)
        assert r.returncode != 0 and "--knob" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    json.dump({**saved, "copy_bias": "high"}, open(os.path.join(out, "calibration.json"), "w"))
    r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "2")
    assert r.returncode != 0 and "calibration.json: copy_bias" in r.stderr.strip().splitlines()[-1]
    json.dump(saved, open(os.path.join(out, "calibration.json"), "w"))
    # the Hugging Face export is the plain language model: no copy head weights, and it says so
    r = subprocess.run([sys.executable, "-m", "nanocrs.checkpoint", "export", "--ckpt", out, "--out", str(tmp_path / "hf")],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "heads" in r.stdout
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.keys() and not [k for k in f.keys() if "heads" in k]
    # --resume can not add or drop the heads
    r = run_cli("train.py", "--data", dataset_dir, "--out", out, "--resume", "--heads", "none", "--max-steps", "4")
    assert r.returncode != 0 and "--heads" in r.stderr


def test_count_init_is_naive_bayes_on_the_counts(tok, sids, dataset):
    """assoc-init=counts: with the query at zero the head scores item n after context items j as
    log(1 + popularity_n) + sum_j left_j . right_n, the factorised PMI, whatever the head's size."""
    table = subset(sids, 12)
    model = heads_model(tok, table=table, item_context=True)
    ptr, g = model.heads, torch.Generator().manual_seed(0)
    warm = torch.tensor([0, 2, 3, 5, 7, 8, 11])  # the items that co-occur; the rest keep their start
    left, right = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    popularity = torch.randint(0, 9, (12,), generator=g).float()
    cold = [1, 4, 6, 9, 10]
    with torch.no_grad():
        ptr.qa.weight.zero_()
        ptr.item_in.zero_()  # as train.py starts it
    cold_rows = ptr.item_emb.weight[cold].clone()
    ptr.init_from_counts(warm.numpy(), left.numpy(), right.numpy(), popularity.numpy())
    assert torch.equal(ptr.item_emb.weight[cold], cold_rows) and not ptr.item_in[cold].any()
    ctx_item, ctx_ok = torch.tensor([[0, 3, 1, 6], [5, 5, 2, 0]]), torch.tensor([[True, True, False, True], [False, True, True, True]])
    got = ptr.assoc_probs(torch.randn(2, 32, generator=g), ctx_item, ctx_ok)
    pmi = torch.zeros(12, 12)
    pmi[warm[:, None], warm[None, :]] = left @ right.T
    pmi[warm[:, None], torch.tensor(cold)[None, :]] = left @ cold_rows.T / 16 ** 0.25  # their start, scaled as the rows
    for s in range(2):
        named = [int(j) for j, ok in zip(ctx_item[s], ctx_ok[s]) if ok]
        want = torch.softmax(torch.log1p(popularity) + sum(pmi[j] for j in named), 0)
        assert torch.allclose(got[s], want, atol=1e-6)
    assert {id(p) for p in ptr.count_rows()} == {id(ptr.item_in), id(ptr.item_emb.weight)}
    opt = model.configure_optimizer(1e-3, 0.1, keep=ptr.count_rows())
    no_decay = {id(p) for p in next(grp for grp in opt.param_groups if grp["weight_decay"] == 0.0)["params"]}
    assert {id(ptr.item_in), id(ptr.item_emb.weight)} <= no_decay and id(ptr.qa.weight) not in no_decay


@pytest.mark.parametrize("assoc", ["1", "2", "2+counts+distinct+turns"])
def test_train_and_evaluate_with_association_head(dataset_dir, tmp_path, assoc):
    assoc, *options = assoc.split("+")
    extra = (",assoc-init=counts" if "counts" in options else "") + (",distinct-sequences=1" if "distinct" in options else "") + \
            (",copy-turns=1" if "turns" in options else "")
    out = run_train(dataset_dir, str(tmp_path / "A"), ["--heads", f"pointer=8,assoc={assoc}" + extra, "--max-steps", "3"])
    model, config, tok, sids = checkpoint.load(out)
    assert config["heads"]["assoc_init"] == ("counts" if extra else "zero")
    # distinct-sequences is part of the heads' config (how their slots are scored), read back with it
    assert model.heads.resp == (Control.of(tok).resp if "distinct" in options else None)
    assert config["heads"]["distinct_sequences"] == ("distinct" in options)
    assert model.heads.items == len(sids.item_ids) == config["heads"]["items"]
    assert (model.heads.turns is not None) == ("turns" in options) == config["heads"]["copy_turns"]
    assert model.heads.item_emb.weight.shape == (len(sids.item_ids), 8)
    assert model.heads.item_context == (assoc == "2") == (config["heads"]["assoc"] == 2)
    if assoc == "2":  # trained: the input rows of the items named in training contexts moved off zero
        assert model.heads.item_in.shape == (len(sids.item_ids), 8) and model.heads.item_in.abs().sum() > 0
    r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "20", "--max-gen", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "standard protocol" in r.stdout
    # --calibrate just-named: chosen on val as the copy bias, saved, used by later evals; it needs the turn buckets
    r = run_cli("sample.py", "--ckpt", out, "--eval", "val", "--max-samples", "6", "--max-gen", "0", "--calibrate", "just-named")
    if "turns" in options:
        assert r.returncode == 0, r.stderr[-2000:]
        saved = json.load(open(os.path.join(out, "calibration.json")))
        assert saved["just_named_bias"] == choose_copy_bias({float(b): m for b, m in saved["just_named_bias_grid"].items()})
        r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "6", "--max-gen", "0")
        assert f"just-named bias {saved['just_named_bias']}," in r.stdout
        r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "6", "--max-gen", "0", "--knob", "just-named=0.75")
        assert r.returncode == 0 and "just-named bias 0.75," in r.stdout
    else:
        assert r.returncode != 0 and "copy-turns=1" in r.stderr.strip().splitlines()[-1]
    # --resume continues it (the head is rebound to the catalogue), and a malformed spec is refused in one line
    r = run_cli("train.py", "--data", dataset_dir, "--out", out, "--resume", "--max-steps", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    for spec, says in (("assoc=3", "assoc=3"), ("pointer=8,copy=1", "'copy=1'"), ("assoc=1,assoc-init=counts", "assoc=2")):
        r = run_cli("train.py", "--data", dataset_dir, "--out", str(tmp_path / "B"), "--heads", spec, "--max-steps", "2")
        assert r.returncode != 0 and says in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
        assert not (tmp_path / "B" / "config.json").exists()


def test_calibrate_text_prior_end_to_end(dataset_dir, tmp_path):
    """sample.py --calibrate text on a dataset whose items a sentence encoder embedded (here: the real
    MiniLM over the tiny catalogue): the grid on val, tau and the item vectors saved beside the
    checkpoint, later evals and --chat use it, --knob text=T overrides; a TF-IDF dataset is refused in one line."""
    import shutil
    import numpy as np
    from nanocrs.encoder import encode_texts
    from nanocrs.heads import TEXT_PRIOR_FILE
    from nanocrs.metrics import TEXT_PRIORS, choose_text_prior
    out = run_train(dataset_dir, str(tmp_path / "T"), ["--heads", "pointer=8,assoc=1", "--max-steps", "3"])
    r = run_cli("sample.py", "--ckpt", out, "--eval", "val", "--max-samples", "4", "--max-gen", "0", "--calibrate", "text")
    assert r.returncode != 0 and "tfidf" in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(out, TEXT_PRIOR_FILE))
    data = str(tmp_path / "syn-minilm")  # the same catalogue, IDs and tokenizer; item vectors from MiniLM
    shutil.copytree(dataset_dir, data)
    items = [json.loads(line) for line in open(os.path.join(data, "items.jsonl"))]
    np.save(os.path.join(data, "item_embeddings.npy"), encode_texts([it["text"] for it in items], "minilm"))
    meta = json.load(open(os.path.join(data, "dataset.json")))
    json.dump({**meta, "encoder": "minilm"}, open(os.path.join(data, "dataset.json"), "w"))
    r = run_cli("sample.py", "--ckpt", out, "--data", data, "--eval", "val", "--max-samples", "6", "--max-gen", "0",
                "--calibrate", "text", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.load(open(os.path.join(out, "calibration.json")))
    grid = {float(t): m for t, m in saved["text_prior_grid"].items()}
    assert sorted(grid) == sorted(TEXT_PRIORS) and saved["text_prior"] == choose_text_prior(grid)
    with np.load(os.path.join(out, TEXT_PRIOR_FILE), allow_pickle=False) as f:
        assert f["items"].shape == (len(items), 384) and str(f["encoder"]) == "minilm"
    tops = []
    for tau in ("0", "7"):  # the prior moves the ranking
        r = run_cli("sample.py", "--ckpt", out, "--data", data, "--eval", "test", "--max-samples", "4", "--max-gen", "0",
                    "--knob", f"text={tau}", "--rankings", str(tmp_path / f"r{tau}.jsonl"))
        assert r.returncode == 0 and f"text prior {float(tau)})" in r.stdout, r.stderr[-2000:]
        tops.append([json.loads(line)["top"] for line in open(tmp_path / f"r{tau}.jsonl")])
    assert len(tops[0]) == len(tops[1]) > 0 and tops[0] != tops[1]
    r = run_cli("sample.py", "--ckpt", out, "--chat", "--knob", "text=7", "--greedy", stdin="I want a scary movie\n")
    assert r.returncode == 0 and "bot>" in r.stdout, r.stderr[-2000:]
    r = run_cli("sample.py", "--ckpt", out, "--eval", "val", "--calibrate", "text", "--knob", "text=1")
    assert r.returncode != 0 and "--knob text=1" in r.stderr.strip().splitlines()[-1]


def test_backbone_with_copy_and_association_heads(dataset_dir, tmp_path):
    """--init-from a (tiny, locally written) Hugging Face backbone with LoRA and both heads: the heads
    are built for the backbone's own tokenizer, train (they are saved with the adapter, and move), and
    the checkpoint evaluates end to end."""
    from test_precision import dialog_texts, write_backbone
    backbone = write_backbone(str(tmp_path / "qwen2"), dialog_texts(dataset_dir))
    heads = ["--heads", "pointer=8,assoc=2,assoc-init=counts,assoc-fresh=1"]
    lora = ["--init-from", backbone, "--lora-rank", "2", "--lr", "1e-2"] + heads
    early = run_train(dataset_dir, str(tmp_path / "early"), lora + ["--max-steps", "1"])
    out = run_train(dataset_dir, str(tmp_path / "L"), lora + ["--max-steps", "3"])
    model, config, tok, sids = checkpoint.load(out)
    ctrl = Control.of(tok)
    assert model.heads is not None and (model.heads.boi, model.heads.mode_rec) == (ctrl.boi, ctrl.mode_rec)
    assert model.heads.items == len(sids.item_ids) and model.heads.assoc_fresh

    def saved(ckpt):
        path = os.path.join(ckpt, json.load(open(os.path.join(ckpt, "config.json")))["files"]["model"])
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    a, b = saved(early), saved(out)
    assert all(k.startswith("heads.") or "lora" in k or "new_rows" in k for k in b)  # the adapter, not the backbone
    heads_saved = [k for k in b if k.startswith("heads.")]
    assert {"heads.gate.weight", "heads.q.weight", "heads.item_in", "heads.qa.weight"} <= set(heads_saved)
    assert not torch.equal(a["heads.q.weight"], b["heads.q.weight"])  # the heads train with the adapter
    assert not torch.equal(a["heads.qa.weight"], b["heads.qa.weight"])
    r = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "6", "--max-gen", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "standard protocol" in r.stdout and "copy head: mean gate" in r.stdout


def test_checkpoint_from_before_the_socket_loads_evaluates_and_resumes(dataset_dir, tmp_path):
    """A checkpoint written before issue 30 (the heads as the model config's "pointer" spec, their
    weights as pointer.*, seven train.py flags) ranks exactly as the same checkpoint in today's form,
    and --resume continues it, writing today's form."""
    import shutil
    from safetensors.torch import load_file, save_file
    spec = "pointer=8,assoc=2,assoc-init=counts,assoc-fresh=1,distinct-sequences=1,copy-turns=1"
    new = run_train(dataset_dir, str(tmp_path / "new"), ["--heads", spec, "--max-steps", "3"])
    old = str(tmp_path / "old")
    shutil.copytree(new, old)
    config = json.load(open(os.path.join(old, "config.json")))
    h = config.pop("heads")
    config["model"]["pointer"] = {"dim": 8, "boi": h["boi"], "eoi": h["eoi"], "mode_rec": h["mode_rec"], "item_context": True,
                                  "distinct_sequences": h["resp"], "assoc_fresh": True,
                                  "turns": [h["mode_rec"], h["mode_chat"], h["eot"]], "items": h["items"]}
    train = config["train"]
    del train["heads"]
    train.update(pointer=8, assoc=2, assoc_init="counts", assoc_fresh=1, distinct_sequences=1, copy_turns=1)
    json.dump(config, open(os.path.join(old, "config.json"), "w"))
    path = os.path.join(old, config["files"]["model"])
    sd = {k.replace("heads.", "pointer.", 1): v for k, v in load_file(path).items()}
    save_file(sd, path, metadata={"step": str(config["step"])})
    for ckpt in (new, old):
        r = run_cli("sample.py", "--ckpt", ckpt, "--eval", "test", "--max-samples", "6", "--max-gen", "0",
                    "--rankings", os.path.join(ckpt, "r.jsonl"))
        assert r.returncode == 0, r.stderr[-2000:]
    assert open(os.path.join(new, "r.jsonl")).read() == open(os.path.join(old, "r.jsonl")).read()
    r = run_cli("train.py", "--data", dataset_dir, "--out", old, "--resume", "--heads", "pointer=4", "--max-steps", "4")
    assert r.returncode != 0 and "--heads" in r.stderr.strip().splitlines()[-1]  # the saved flags say pointer=8
    for ckpt in (new, old):
        r = run_cli("train.py", "--data", dataset_dir, "--out", ckpt, "--resume", "--max-steps", "4")
        assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line) for line in open(os.path.join(new, "log.jsonl"))] == \
        [json.loads(line) for line in open(os.path.join(old, "log.jsonl"))]
    config = json.load(open(os.path.join(old, "config.json")))
    assert config["heads"]["copy_turns"] and config["train"]["heads"] == spec and "pointer" not in config["model"]
