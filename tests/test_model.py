"""
Tests for nanocrs/model.py: KV-cache decoding equals the full forward, KVCache.expand/reorder, the
loss's ignore_index, the padded vocabulary, and llama3 RoPE scaling.

    python -m pytest tests/test_model.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nanocrs.model import GPT, GPTConfig, KVCache, rope_frequencies



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # (a module-level set_grad_enabled(False) would leak into other test files)
        yield


def make_model(seed=0, **kw):
    """A tiny random model whose weights are large enough that logits vary by O(1) between positions
    and contexts (with the default 0.02 init every logit is ~0 and a broken cache could hide under atol)."""
    base = dict(vocab_size=100, pad_vocab_to=64, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    base.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**base))
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() == 1:  # norm weights and biases
            p.copy_((1.0 if name.endswith("norm.weight") or "layernorm" in name else 0.0)
                    + 0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.eval()


CONFIGS = {
    "gqa": dict(n_head=4, n_kv_head=2),
    "qwen-like": dict(n_head=4, n_kv_head=2, head_dim=12, qkv_bias=True, qk_norm=True, tie_embeddings=False),
    "mha-llama3-rope": dict(n_head=4, n_kv_head=4, rope_scaling={"rope_type": "llama3", "factor": 4.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_matches_full_forward(name):
    model = make_model(**CONFIGS[name])
    cfg = model.config
    if name == "qwen-like":
        assert cfg.head_dim == 12 != cfg.n_embd // cfg.n_head
        assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
        assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.q_norm is not None
    B, T = 2, 20
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(3))
    full, _ = model(idx)  # (B, T, V)

    cache = model.new_cache(B, T)
    parts = []
    logits, _ = model(idx[:, :7], cache=cache)            # prefill a chunk
    parts.append(logits)
    assert cache.pos == 7
    logits, _ = model(idx[:, 7:12], cache=cache)          # a multi-token block on a filled cache
    parts.append(logits)
    assert cache.pos == 12
    for t in range(12, T):                                # then token by token
        logits, _ = model(idx[:, t:t + 1], cache=cache)
        parts.append(logits)
    assert cache.pos == T
    dec = torch.cat(parts, dim=1)
    assert dec.shape == full.shape == (B, T, cfg.vocab_size)
    torch.testing.assert_close(dec, full, atol=1e-5, rtol=0)

    # the check is sensitive: the same block decoded without its context gives different logits
    alone, _ = model(idx[:, 7:12])
    assert (alone - full[:, 7:12]).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_batch_equals_each_row_alone(name):
    """Prompts of different lengths, left-padded into one cache (prefill, a block, token steps, a
    reorder): every row's logits equal that row run alone without padding."""
    model = make_model(**CONFIGS[name])
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    lens = [9, 4, 13]
    prompts = [torch.randint(0, V, (n,), generator=g) for n in lens]
    L = max(lens)
    pad = torch.tensor([L - n for n in lens])
    ids = torch.stack([torch.cat([torch.full((L - len(p),), 5), p]) for p in prompts])  # (B, L); 5: any token
    block = torch.randint(0, V, (3, 3), generator=g)   # a 3-token block appended to every row
    steps = torch.randint(0, V, (3, 4), generator=g)   # then 4 single tokens
    cache = model.new_cache(3, L + 3 + 4, pad=pad)
    got = [model(ids, cache=cache)[0][:, -1:]]
    got.append(model(block, cache=cache)[0])
    for t in range(2):
        got.append(model(steps[:, t:t + 1], cache=cache)[0])
    # reorder: row 2 twice and row 0; the padding travels with its row
    rows = torch.tensor([2, 2, 0])
    cache.reorder(rows)
    assert cache.pad.tolist() == pad[rows].tolist()
    for t in range(2, 4):
        got.append(model(steps[rows, t:t + 1], cache=cache)[0])
    for r in range(3):
        alone, _ = model(torch.cat([prompts[r], block[r], steps[r, :2]])[None])  # (1, T, V)
        want = alone[0, len(prompts[r]) - 1:]                                   # the last prompt token on
        torch.testing.assert_close(torch.cat([x[r] for x in got[:4]]), want, atol=1e-5, rtol=0)
    for new, old in enumerate(rows.tolist()):
        seq = torch.cat([prompts[old], block[old], steps[old]])
        alone, _ = model(seq[None])
        torch.testing.assert_close(torch.cat([x[new] for x in got[4:]]), alone[0, -2:], atol=1e-5, rtol=0)
    # the padding is really masked: padding tokens of another value change nothing
    cache2 = model.new_cache(3, L, pad=pad)
    other = ids.clone()
    for r in range(3):
        other[r, :L - lens[r]] = 17
    torch.testing.assert_close(model(other, cache=cache2)[0][:, -1], got[0][:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beam_cache_over_a_padded_prefix_equals_each_sequence_alone(name):
    """A beam cache (prefix=) over left-padded prompts: beams grow 1 -> 3 per prompt, are reordered,
    and each decodes SID-like tokens; their logits equal each full sequence run alone."""
    model = make_model(**CONFIGS[name])
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(11)
    lens = [5, 11]
    prompts = [torch.randint(0, V, (n,), generator=g) for n in lens]
    L = max(lens)
    ids = torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts])
    prefix = model.new_cache(2, L, pad=torch.tensor([L - n for n in lens]))
    model(ids, cache=prefix)
    beams = model.new_cache(2, 3, prefix=prefix)
    hist = [[] for _ in range(2)]                        # tokens of each beam row
    for rows in (torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([2, 0, 0, 5, 3, 3]), torch.tensor([1, 1, 2, 4, 5, 3])):
        beams.reorder(rows)
        hist = [hist[r] for r in rows.tolist()]
        toks = torch.randint(0, V, (6, 1), generator=g)
        hist = [h + [int(t)] for h, t in zip(hist, toks[:, 0])]
        logits, _ = model(toks, cache=beams)
        assert prefix.pos == L and beams.pos == len(hist[0])
        for r in range(6):
            alone, _ = model(torch.cat([prompts[r // 3], torch.tensor(hist[r])])[None])
            torch.testing.assert_close(logits[r, -1], alone[0, -1], atol=1e-5, rtol=0)


def test_cache_overflow_is_refused():
    model = make_model()
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(AssertionError, match="KV cache full"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_kv_cache_expand_and_reorder():
    model = make_model()
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (1, 6), generator=g)
    cache = model.new_cache(1, 10)
    last, _ = model(prompt, cache=cache)

    beams = cache.expand(3)
    assert beams.pos == cache.pos == 6 and beams.k.shape[1] == 3
    for r in range(3):  # every row is a copy of the single prefilled row
        assert torch.equal(beams.k[:, r], cache.k[:, 0]) and torch.equal(beams.v[:, r], cache.v[:, 0])
    # the copy is independent storage: writing a beam must not touch the others or the source
    nxt = torch.tensor([[11], [22], [33]])
    model(nxt, cache=beams)
    assert not torch.equal(beams.k[:, 0, :, 6], beams.k[:, 1, :, 6])
    assert torch.equal(cache.k[:, 0, :, 6], torch.zeros_like(cache.k[:, 0, :, 6]))

    # survivors: row 2 twice and row 0 once, then one more token each
    rows = torch.tensor([2, 2, 0])
    k_before, v_before = beams.k.clone(), beams.v.clone()
    beams.reorder(rows)
    for new, old in enumerate(rows.tolist()):
        assert torch.equal(beams.k[:, new], k_before[:, old]) and torch.equal(beams.v[:, new], v_before[:, old])
    step2 = torch.tensor([[7], [8], [9]])
    logits, _ = model(step2, cache=beams)
    # reference: the full sequences prompt + (token of the surviving beam) + new token
    seqs = torch.cat([prompt.expand(3, -1), nxt[rows], step2], dim=1)  # (3, 8)
    full, _ = model(seqs)
    torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=0)

    # reorder also grows a batch-1 cache into n rows (beam search relies on it)
    c1 = model.new_cache(1, 10)
    model(prompt, cache=c1)
    c1.reorder(torch.tensor([0, 0]))
    assert c1.k.shape[1] == 2 and torch.equal(c1.k[:, 0], c1.k[:, 1])

    with pytest.raises(AssertionError):
        beams.expand(2)  # only a batch of one can be expanded


def test_loss_ignores_minus_one_targets():
    model = make_model()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, V, (3, 9), generator=g)
    targets = torch.randint(0, V, (3, 9), generator=g)
    targets[0, :4] = -1
    targets[1, 5:] = -1
    targets[2, ::2] = -1
    logits, loss = model(idx, targets)
    assert logits is None  # with targets the head runs only where there is a loss
    logits, _ = model(idx)
    keep = targets != -1
    logp = torch.log_softmax(logits.double(), -1)  # (B, T, V)
    manual = -logp[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    assert abs(loss.item() - manual.item()) < 1e-5
    # and the ignored positions really are ignored: changing their logits' targets does not matter
    t2 = targets.clone()
    t2[~keep] = -1
    assert model(idx, t2)[1].item() == loss.item()
    # a loss over all positions is a different number (so the test can fail)
    all_t = torch.where(keep, targets, torch.zeros_like(targets))
    assert abs(model(idx, all_t)[1].item() - loss.item()) > 1e-4
    _, none = model(idx)
    assert none is None
    # reduction="sum" (train.py's, for exact accumulation) is the mean times the count
    assert abs(model(idx, targets, reduction="sum")[1].item() - loss.item() * keep.sum().item()) < 1e-4
    # no supervised position at all: a zero sum (that still backpropagates), not a NaN
    with torch.enable_grad():
        s = model(idx, torch.full_like(targets, -1), reduction="sum")[1]
        s.backward()
    assert s.item() == 0.0


@pytest.mark.parametrize("tie", [True, False])
def test_padded_vocab_rows_never_in_logits(tie):
    model = make_model(vocab_size=100, pad_vocab_to=64, tie_embeddings=tie)
    cfg = model.config
    assert cfg.padded_vocab_size == 128
    assert model.embed_tokens.weight.shape[0] == 128 and model.lm_head.weight.shape[0] == 128
    idx = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    before, _ = model(idx)
    # huge padding rows in the head: if they leaked into the logits (or the softmax), results would change
    model.lm_head.weight[100:] = 1e4 * torch.randn(28, cfg.n_embd, generator=torch.Generator().manual_seed(2))
    logits, _ = model(idx)
    _, loss = model(idx, idx)
    assert logits.shape == (2, 5, 100)
    assert torch.equal(logits, before)
    assert loss.item() < 20  # log-softmax is over the 100 real tokens only
    exact = make_model(vocab_size=100, pad_vocab_to=1)
    assert exact.lm_head.weight.shape[0] == 100 and exact(idx)[0].shape == (2, 5, 100)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_changes_only_long_wavelengths():
    kw = dict(vocab_size=64, n_embd=128, n_head=2, n_kv_head=1, n_layer=1, rope_theta=500000.0)
    base = rope_frequencies(GPTConfig(**kw)).double()
    scaled = rope_frequencies(GPTConfig(**kw, rope_scaling=dict(LLAMA31))).double()
    assert base.shape == scaled.shape == (32,)
    wavelen = 2 * math.pi / base
    high, low = 8192 / 4.0, 8192 / 1.0  # wavelength bounds of the interpolated band
    short, long_ = wavelen < high, wavelen > low
    mid = ~short & ~long_
    assert short.any() and long_.any() and mid.any()  # every regime is exercised
    # short wavelengths (high frequencies) untouched
    torch.testing.assert_close(scaled[short], base[short], rtol=1e-6, atol=0)
    # long wavelengths slowed down by the factor
    torch.testing.assert_close(scaled[long_], base[long_] / 8.0, rtol=1e-6, atol=0)
    # the band in between: the reference formula, strictly between the two
    smooth = (8192 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    ref = (1 - smooth) * base[mid] / 8.0 + smooth * base[mid]
    torch.testing.assert_close(scaled[mid], ref, rtol=1e-5, atol=0)
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all()
    # the model uses the scaled table; the old "type" key is accepted too
    m = GPT(GPTConfig(**kw, rope_scaling=dict(LLAMA31)))
    torch.testing.assert_close(m.inv_freq.double(), scaled)
    alt = {k: v for k, v in LLAMA31.items() if k != "rope_type"} | {"type": "llama3"}
    torch.testing.assert_close(rope_frequencies(GPTConfig(**kw, rope_scaling=alt)).double(), scaled)


def test_unknown_rope_type_raises():
    with pytest.raises(ValueError, match="yarn"):
        rope_frequencies(GPTConfig(vocab_size=64, n_embd=32, n_head=2, n_kv_head=1, rope_scaling={"rope_type": "yarn"}))
    with pytest.raises(ValueError):
        GPT(GPTConfig(vocab_size=64, n_embd=32, n_head=2, n_kv_head=1, n_layer=1, rope_scaling={"type": "dynamic"}))


def test_config_dict_round_trip_and_unknown_fields():
    cfg = GPTConfig(vocab_size=77, n_embd=48, n_head=4, n_kv_head=2, head_dim=16, qk_norm=True)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@torch.enable_grad()
def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2))
    x = torch.randint(0, 300, (2, 16))
    _, loss = m(x, x)
    loss.backward()
    plain = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.grad_checkpointing = True
    _, loss2 = m(x, x)
    loss2.backward()
    assert torch.equal(loss, loss2)
    for a, b in zip(plain, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@torch.enable_grad()
@pytest.mark.parametrize("ckpt", [False, True])
def test_supervised_rows_shortcut_gives_the_full_models_loss_and_gradients(ckpt):
    # With targets, the head and the last block's o_proj and MLP run only where there is a loss. The reference is
    # the plain computation: logits everywhere, then a masked cross-entropy. Equal loss and gradients.
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, n_layer=3, n_embd=64, n_head=4, n_kv_head=2))
    m.grad_checkpointing = ckpt
    x = torch.randint(0, 300, (3, 20))
    y = torch.randint(0, 300, (3, 20))
    y[0, :7], y[1, 3:15], y[2, ::3] = -1, -1, -1
    logits, _ = m(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    ref.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    _, loss = m(x, y, reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-4, msg=n)
    # the last MLP's gradient really depends on the mask (so a wrong gather would show)
    m.zero_grad()
    m(x, torch.where(y == -1, 0, y), reduction="sum")[1].backward()
    assert not torch.allclose(m.layers[-1].mlp.up_proj.weight.grad, want["layers.2.mlp.up_proj.weight"])
