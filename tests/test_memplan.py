"""
Tests for nanocrs/memplan.py: the meta-device model has exactly the parameters of a real one, the
LoRA + new-row trainable count is the analytic r * (in + out) formula, and the per-layer activation
formula equals the bytes autograd really saves (measured with saved-tensor hooks on a tiny bf16 block).

    python -m pytest tests/test_memplan.py -q
"""

import json

import pytest
import torch

from nanocrs.hf import config_from_hf, resize_vocab
from nanocrs.lora import apply_lora, train_new_token_rows
from nanocrs.memplan import build_meta, count_params, layer_bytes_per_token, main
from nanocrs.model import GPT

TOK_LEN, N_NEW, RANK = 200, 12, 4


def tiny_hf(model_type="llama", tie=False):
    return {"model_type": model_type, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 208, "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": tie, "max_position_embeddings": 64}


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_meta_count_equals_real_model(model_type, tie):
    hf = tiny_hf(model_type, tie)
    # the plain backbone: meta (no new tokens, no LoRA) against a real GPT
    meta, _ = build_meta(hf, hf["vocab_size"], n_new=0, rank=0)
    real = GPT(config_from_hf(hf))
    assert sum(count_params(meta)) == real.num_params() == meta.num_params()
    # the prepared model: same steps on real tensors, same frozen and trainable counts
    meta, first_new = build_meta(hf, TOK_LEN, n_new=N_NEW, rank=RANK)
    resize_vocab(real, TOK_LEN)
    resize_vocab(real, TOK_LEN + N_NEW)
    apply_lora(real, RANK, 8.0)
    train_new_token_rows(real, TOK_LEN)
    assert first_new == TOK_LEN
    assert count_params(meta) == count_params(real)
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_count_is_analytic(tie):
    hf = tiny_hf("llama", tie)
    model, _ = build_meta(hf, TOK_LEN, n_new=N_NEW, rank=RANK)
    D, I, L = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    hd = D // hf["num_attention_heads"]
    Dq, Dkv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [(D, Dq), (D, Dkv), (D, Dkv), (Dq, D), (D, I), (D, I), (I, D)]
    lora = L * sum(RANK * (i + o) for i, o in shapes)
    new_rows = N_NEW * D * (1 if tie else 2)  # embedding rows, and the untied head's rows
    assert count_params(model)[1] == lora + new_rows


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_formula_matches_autograd(dropout):
    torch.manual_seed(0)
    hf = tiny_hf("llama")
    model = GPT(config_from_hf(hf)).to(torch.bfloat16)
    apply_lora(model, RANK, 8.0, dropout)
    model.train()
    B, T = 2, 24
    block = model.layers[0]
    x = torch.randn(B, T, hf["hidden_size"], dtype=torch.bfloat16, requires_grad=True)  # (B, T, D)
    cos, sin = model.rope(0, T, "cpu")
    # count every saved tensor's storage once, leaving out weights and the RoPE tables (not per token)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    saved = {}

    weight_shapes = {s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}

    def pack(t):
        s = t.untyped_storage()
        if t.dim() == 2 and tuple(t.shape) in weight_shapes:
            return t  # autocast's bf16 copy of an fp32 LoRA matrix (or its transpose): per layer, not per token
        if s.data_ptr() not in skip and t.dim() >= 2:  # dim 1: fp32 copies of norm weights (per layer)
            saved[s.data_ptr()] = s.nbytes()
        return t

    # under autocast, as train.py runs a bf16 backbone (without it LoRA computes in its fp32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cos, sin).sum().backward()
    # the CPU's dropout keeps its mask in the input's dtype (2 bytes); CUDA's fused kernel, a bool
    expected = layer_bytes_per_token(model.config, RANK, dropout, mask_bytes=2)
    assert sum(saved.values()) == expected * B * T


def test_main_with_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_hf("qwen2")))
    main(["--config", str(path)])
    out = capsys.readouterr().out
    assert "largest micro-batch" in out and "bytes per token per layer" in out
    with pytest.raises(ValueError, match="--config"):
        main(["--config", str(tmp_path / "missing.json")])
