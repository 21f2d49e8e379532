"""
Tests for nanocrs/memplan.py: the meta-device model has exactly the parameters of a real one, the
LoRA + new-row trainable count is the analytic r * (in + out) formula, and the per-layer activation
formula equals the bytes autograd really saves (measured with saved-tensor hooks on a tiny bf16 block),
over a 16-bit and over a 4-bit NF4 base; the NF4 weight bytes equal a quantized model's buffers; and
Llama-3.1-8B with QLoRA fits a 24 GB card at micro-batch >= 4.

    python -m pytest tests/test_memplan.py -q
"""

import json

import pytest
import torch

from nanocrs.hf import config_from_hf, resize_vocab
from nanocrs.lora import apply_lora, train_new_token_rows
from nanocrs import memplan
from nanocrs.memplan import build_meta, count_params, layer_bytes_per_token, main
from nanocrs.model import GPT
from nanocrs.nf4 import quantize_model

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


@pytest.mark.parametrize("dropout,quantize", [(0.0, "none"), (0.1, "none"), (0.0, "nf4"), (0.1, "nf4")])
def test_activation_formula_matches_autograd(dropout, quantize):
    torch.manual_seed(0)
    hf = tiny_hf("llama")
    model = GPT(config_from_hf(hf)).to(torch.bfloat16)
    if quantize == "nf4":  # the 4-bit matmul saves only its (per-layer) codes and scales, no activation
        quantize_model(model)
    apply_lora(model, RANK, 8.0, dropout)
    model.train()
    B, T = 2, 24
    block = model.layers[0]
    x = torch.randn(B, T, hf["hidden_size"], dtype=torch.bfloat16, requires_grad=True)  # (B, T, D)
    cos, sin = model.rope(0, T, "cpu")
    # count every saved tensor's storage once, leaving out weights and the RoPE tables (not per token)
    skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
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


def test_nf4_weight_bytes_equal_a_quantized_model():
    hf = tiny_hf("llama")
    meta, _ = build_meta(hf, TOK_LEN, n_new=N_NEW, rank=RANK)
    weights, dequant = memplan.weight_bytes(meta, "nf4")
    real = GPT(config_from_hf(hf))  # the same steps on real tensors, the base quantized first as load_base does
    resize_vocab(real, TOK_LEN)
    resize_vocab(real, TOK_LEN + N_NEW)
    quantize_model(real)
    apply_lora(real, RANK, 8.0)
    train_new_token_rows(real, TOK_LEN)
    frozen = sum(p.numel() for p in real.parameters() if not p.requires_grad)  # bf16 in a real run
    codes = sum(t.numel() * t.element_size() for n, t in real.named_buffers() if n.endswith(("packed", "absmax")))
    assert weights == 2 * frozen + codes
    assert dequant == memplan.DEQUANT_BYTES * hf["intermediate_size"] * hf["hidden_size"]


def test_llama_8b_qlora_fits_24gb_at_micro_batch_4():
    """The issue's acceptance: Llama-3.1-8B, QLoRA r16, 768 tokens, activation checkpointing, within
    24 GiB less the 10% headroom, at a micro-batch of at least 4 (every token carrying a loss)."""
    hf, tok_len = memplan.MODELS["Llama-3.1-8B-Instruct"]
    p = memplan.plan("Llama-3.1-8B-Instruct", hf, tok_len, dropout=0.05, quantize="nf4")
    budget = memplan.card_budget(24)
    assert memplan.total_bytes(p, "ckpt", 4) <= budget
    assert memplan.largest_batch(p, "ckpt", budget) >= 4
    # and the 4-bit weights are about a third of the bf16 ones
    bf16 = memplan.plan("Llama-3.1-8B-Instruct", hf, tok_len, dropout=0.05)
    assert 0.3 < p["weights"] / bf16["weights"] < 0.4
