"""
dev/heads.py: each query term ranks the catalogue the way its logits say (a gold pushed to the top by
its bias is found by all three, pushed to the bottom by none), and the gate's shares sum to one.

    python -m pytest tests/test_heads.py -q
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dev"))
import heads  # noqa: E402
from nanocrs.data import Renderer, rec_samples  # noqa: E402
from nanocrs.generate import SIDTrie  # noqa: E402
from test_pointer import BLOCK, pointer_model  # noqa: E402


@pytest.mark.parametrize("bias", [1e4, -1e4])
def test_head_recalls_follow_the_logits(tok, sids, dataset, bias):
    model = pointer_model(tok, table=sids, item_context=True)
    trie = SIDTrie.build(sids, tok)
    dialogs = []  # as many val dialogs as keep the fresh golds within the top ten
    for d in dataset["val"]:
        if len({g for _, _, g, fresh in rec_samples(dialogs + [d]) if fresh}) > heads.TOP:
            break
        dialogs.append(d)
    golds = {gold for _, _, gold, fresh in rec_samples(dialogs) if fresh}
    with torch.no_grad():  # the fresh golds far above (or below) every other item, whatever the queries say
        for g in golds:
            model.pointer.item_bias[trie.index[g]] = bias
    recalls, shares, n = heads.head_recalls(model, Renderer(tok, sids, BLOCK), trie, dialogs)
    assert n == sum(1 for *_, fresh in rec_samples(dialogs) if fresh) > 1 and len(golds) > 1
    if bias > 0:
        assert recalls == {k: 1.0 for k in recalls}
    else:
        assert recalls == {k: 0.0 for k in recalls}
    assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
