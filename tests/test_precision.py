"""
Tests for the mixed-precision paths that a GPU run takes, exercised on the CPU in bf16: trainable
parameters are fp32 master weights over a bf16 frozen backbone, train.py --dtype bfloat16 trains
from scratch, from a (tiny, locally written) Hugging Face backbone and resumed, attention reaches
SDPA without a mask and with equal 16-bit dtypes (what flash attention needs), activation
checkpointing under autocast gives the plain computation, a compiled run stays under Dynamo's
recompile limit, and the LoRA-aware FLOP count matches torch's own counter.

    python -m pytest tests/test_precision.py -q
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_train
from nanocrs.backbone import prepare
from nanocrs.data import load_dataset
from nanocrs.hf import export_hf
from nanocrs.model import GPT, GPTConfig
from nanocrs.tokenizer import CONTROL_TOKENS, Tokenizer

NEW_TOKENS = CONTROL_TOKENS + [f"<{level}_{c}>" for level in "ab" for c in range(8)]


def write_backbone(folder, texts, model_type="qwen2", tie=False, seed=0):
    """A tiny random Hugging Face folder (config.json, model.safetensors, tokenizer.json) written by
    nanocrs' own exporter: a Qwen2.5-shaped model (q/k/v biases) over a small byte-level BPE."""
    tok = Tokenizer.train(texts, vocab_size=300, added=[])
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=len(tok), pad_vocab_to=1, block_size=512, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64, tie_embeddings=tie, qkv_bias=model_type == "qwen2")
    export_hf(GPT(cfg), tok, folder, model_type)
    return folder


def dialog_texts(dataset_dir):
    ds = load_dataset(dataset_dir)
    return [t["text"] for d in ds["train"] for t in d["turns"]]


@pytest.fixture(scope="module")
def backbone(dataset_dir, tmp_path_factory):
    return write_backbone(str(tmp_path_factory.mktemp("hf") / "qwen2"), dialog_texts(dataset_dir))


def trained_like(model, seed=0):
    """Give lora_B and the new rows the size they have after some training (B starts at 0, and an
    update to 0 is representable in any dtype, which would hide the rounding this file tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif n.endswith("new_rows"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def lm_batch(V, B=4, T=24, seed=0, first_new=None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T + 1), generator=g)
    if first_new is not None:
        idx[:, ::4] = torch.randint(first_new, V, idx[:, ::4].shape, generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


@pytest.mark.parametrize("rank", [4, 0])
def test_trainable_parameters_are_fp32_masters(backbone, rank):
    """A bf16 backbone (what --init-from loads on CUDA): the frozen weights stay bf16, everything that
    trains is fp32, and one AdamW step at lr=1e-5 moves (nearly) every element with a gradient."""
    torch.manual_seed(0)
    model, tok, first_new = prepare(backbone, NEW_TOKENS, 64, rank, 8.0, 0.0, "cpu", dtype=torch.bfloat16)
    trained_like(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable
    opt = model.configure_optimizer(lr=1e-5, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    x, y = lm_batch(len(tok), first_new=first_new)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(x, y)
    loss.backward()
    has_grad = {n: p.grad != 0 for n, p in trainable.items()}
    opt.step()
    n_grad = sum(int(m.sum()) for m in has_grad.values())
    n_moved = sum(int(((trainable[n].detach() != before[n]) & m).sum()) for n, m in has_grad.items())
    assert n_grad > 1000
    assert n_moved >= 0.99 * n_grad, f"one step at lr=1e-5 moved {n_moved} of {n_grad} elements with a gradient"
    bad = sorted(n for n, p in trainable.items() if p.dtype != torch.float32)
    assert not bad, f"trainable parameters not fp32: {bad[:4]}"
    if rank:
        assert all(p.dtype == torch.bfloat16 for p in frozen.values()), "the frozen base is bf16"
