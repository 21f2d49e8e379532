"""
Tests for nanocrs/lora.py: after optimizer steps only the LoRA matrices and the new token rows have
moved (old rows bit-identical even under weight decay), merging gives the same logits and the base
state-dict names, rank 0 applies nothing.

    python -m pytest tests/test_lora.py -q
"""

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
