"""
dev/heads.py: each query term ranks the catalogue the way its logits say (a gold pushed to the top by
its bias is found by all three, pushed to the bottom by none), with turn buckets too, a head trained with assoc-fresh=1
leaves the context's items out of its ranking, and the gate's shares sum to one.

    python -m pytest tests/dev/test_dev_heads.py -q
"""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(REPO, "dev"), os.path.join(REPO, "tests")]
import heads  # noqa: E402
from nanocrs.data import MENTION, Renderer, rec_samples  # noqa: E402
from nanocrs.generate import SIDTrie  # noqa: E402
from test_heads import BLOCK, heads_model  # noqa: E402


@pytest.mark.parametrize("bias,turns", [(1e4, False), (-1e4, False), (1e4, True)])
def test_head_recalls_follow_the_logits(tok, sids, dataset, bias, turns):
    """turns: a head with turn buckets (the ReDial recipe's copy-turns=1), whose gate reads them."""
    model = heads_model(tok, table=sids, item_context=True, turns=turns)
    trie = SIDTrie.build(sids, tok)
    dialogs = []  # as many val dialogs as keep the fresh golds within the top ten
    for d in dataset["val"]:
        if len({g for _, _, g, fresh in rec_samples(dialogs + [d]) if fresh}) > heads.TOP:
            break
        dialogs.append(d)
    golds = {gold for _, _, gold, fresh in rec_samples(dialogs) if fresh}
    with torch.no_grad():  # the fresh golds far above (or below) every other item, whatever the queries say
        for g in golds:
            model.heads.item_bias[trie.index[g]] = bias
    recalls, shares, n = heads.head_recalls(model, Renderer(tok, sids, BLOCK), trie, dialogs)
    assert n["fresh"] == sum(1 for *_, fresh in rec_samples(dialogs) if fresh) > 1 and len(golds) > 1
    assert n["repeat"] == sum(1 for *_, fresh in rec_samples(dialogs) if not fresh)
    if bias > 0:
        assert recalls == {k: 1.0 for k in recalls}
    else:
        assert recalls == {k: 0.0 for k in recalls}
    for k in shares:
        if n[k]:
            assert sum(shares[k]) == pytest.approx(1.0) and min(shares[k]) >= 0


@pytest.mark.parametrize("fresh", [False, True])
def test_head_recalls_leave_out_named_items_with_assoc_fresh(tok, sids, fresh, monkeypatch):
    model = heads_model(tok, table=sids, item_context=True, assoc_fresh=fresh)
    trie = SIDTrie.build(sids, tok)
    a, b, c = sids.item_ids[:3]  # the seeker names a and b, the recommender c: one fresh sample
    dialog = {"id": "d", "turns": [{"role": "user", "text": f"I liked @{{{a}}} and @{{{b}}}", "items": [a, b]},
                                   {"role": "assistant", "text": f"then @{{{c}}}", "items": [c]}]}
    with torch.no_grad():  # scores = the biases: the named items above the gold, the gold above the rest
        model.heads.qa.weight.zero_()
        model.heads.item_in.zero_()
        model.heads.item_bias[[trie.index[a], trie.index[b]]] = 2e4
        model.heads.item_bias[trie.index[c]] = 1e4
    monkeypatch.setattr(heads, "TOP", 1)
    recalls, _, n = heads.head_recalls(model, Renderer(tok, sids, BLOCK), trie, [dialog])
    assert n == {"fresh": 1, "repeat": 0}
    assert recalls == {k: float(fresh) for k in recalls}  # the gold is first only once the named items are out
