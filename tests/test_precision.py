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


# -----------------------------------------------------------------------------
# train.py --dtype bfloat16: from scratch, from a backbone, resumed


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_tensors(out):
    cfg = json.load(open(os.path.join(out, "config.json")))
    return load_file(os.path.join(out, cfg["files"]["model"]))


BF16 = ["--dtype", "bfloat16", "--eval-interval", "2", "--save-interval", "2"]


def test_train_bf16_from_scratch_and_resume(dataset_dir, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_train(dataset_dir, a, BF16 + ["--max-steps", "4"])
    run_train(dataset_dir, b, BF16 + ["--max-steps", "2"])
    run_train(dataset_dir, b, BF16 + ["--max-steps", "4", "--resume"])
    la, lb = read_log(a), read_log(b)
    assert [r["step"] for r in la] == [1, 2, 3, 4] and la[0]["loss"] > la[-1]["loss"]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # the CPU is deterministic: bitwise
    assert all(t.dtype == torch.float32 for t in saved_tensors(a).values())  # the master weights


def test_train_bf16_init_from_lora_and_resume(dataset_dir, backbone, tmp_path):
    from nanocrs import checkpoint
    from nanocrs.lora import LoRALinear
    lora = BF16 + ["--init-from", backbone, "--lora-rank", "4", "--lr", "1e-3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_train(dataset_dir, a, lora + ["--max-steps", "4"])
    run_train(dataset_dir, b, lora + ["--max-steps", "2"])
    run_train(dataset_dir, b, lora + ["--max-steps", "4", "--resume"])
    la, lb = read_log(a), read_log(b)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    sd = saved_tensors(a)  # the adapter only, in fp32
    assert sd and all(n.endswith(("lora_A", "lora_B", "new_rows")) and t.dtype == torch.float32 for n, t in sd.items())

    # evaluation over a bf16 base: LoRA stays unmerged in fp32, the semantic-ID logits are fp32
    model, _, tok, sids = checkpoint.load(a, merge=True, dtype=torch.bfloat16)
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.norm.weight.dtype == torch.bfloat16
    x = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(x)[0]
    assert logits.dtype == torch.float32
    # over an fp32 base (the CPU's default) it merges as before
    merged, *_ = checkpoint.load(a, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        ref = merged.eval()(x)[0]
    new = slice(len(tok) - len(sids.all_token_strings()), len(tok))
    torch.testing.assert_close(logits[..., new], ref[..., new], atol=0.05, rtol=0.05)  # bf16 base vs fp32
    # and export folds the adapters in
    export_hf(model, tok, str(tmp_path / "export"))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_dtype_float32_reaches_the_backbone(dataset_dir, backbone, tmp_path):
    from nanocrs import checkpoint
    out = run_train(dataset_dir, str(tmp_path / "f"), ["--dtype", "float32", "--init-from", backbone,
                                                       "--lora-rank", "2", "--max-steps", "1"])
    model, *_ = checkpoint.load(out, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_full_finetune_that_cannot_fit_is_refused(tmp_path):
    from nanocrs.memplan import QWEN25_7B, check_full_finetune
    os.makedirs(tmp_path / "q")
    json.dump(QWEN25_7B, open(tmp_path / "q" / "config.json", "w"))
    with pytest.raises(ValueError, match="lora-rank"):
        check_full_finetune(str(tmp_path / "q"), 80 * 2 ** 30)  # 7.6B x 16 bytes > 72 GiB
    check_full_finetune(str(tmp_path / "q"), 192 * 2 ** 30)    # fits a bigger card


# -----------------------------------------------------------------------------
# attention: what SDPA receives


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask is None, q.dtype, k.dtype, v.dtype))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("base", ["fp32 + autocast", "bf16 backbone + LoRA"])
def test_sdpa_gets_no_mask_and_16bit_inputs(backbone, sdpa_calls, base):
    """Flash attention needs equal 16-bit q, k, v and no explicit mask: check it holds in training,
    prefill and one-token decoding (the KV cache takes the compute dtype)."""
    if base == "fp32 + autocast":
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=120, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
        V = 120
    else:
        model, tok, _ = prepare(backbone, NEW_TOKENS, 64, 4, 8.0, 0.05, "cpu", dtype=torch.bfloat16)
        V = len(tok)
    x, y = lm_batch(V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        model(x, y)[1].backward()
        model.eval()
        with torch.no_grad():
            cache = model.new_cache(2, 40)
            logits, _ = model(x[:2, :10], cache=cache)
            for _ in range(3):
                logits, _ = model(logits[:, -1:].argmax(-1), cache=cache)
    assert cache.k.dtype == torch.bfloat16
    assert len(sdpa_calls) == 2 * 5  # 2 layers x (training, prefill, 3 decoding steps)
    assert set(sdpa_calls) == {(True, torch.bfloat16, torch.bfloat16, torch.bfloat16)}, set(sdpa_calls)


def test_grad_checkpointing_under_autocast_equals_plain(backbone):
    """Same loss and gradients with and without activation checkpointing, under bf16 autocast and
    with LoRA dropout (the recomputation replays the same dropout masks)."""
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, tok, first_new = prepare(backbone, NEW_TOKENS, 64, 4, 8.0, 0.1, "cpu", dtype=torch.bfloat16)
        trained_like(model)
        model.train()
        model.grad_checkpointing = ckpt
        x, y = lm_batch(len(tok), first_new=first_new)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=0, rtol=0, msg=n)


# -----------------------------------------------------------------------------
# FLOPs and peaks for MFU


def test_train_flops_match_torch_flop_counter(backbone):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from nanocrs.mfu import train_flops
    for rank in (4, 0):
        torch.manual_seed(0)
        model, tok, first_new = prepare(backbone, NEW_TOKENS, 64, rank, 8.0, 0.0, "cpu")
        x, y = lm_batch(len(tok), B=3, T=32, first_new=first_new)
        y[:, :20] = -1  # a loss on the last 12 positions only
        model.train()
        # the math kernel decomposes into matmuls the counter sees (it has no formula for the CPU's
        # fused kernel); it computes the whole T x T score matrix, hence causal=False below
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(x, y)[1].backward()
        est = train_flops(model, [32] * 3, int((y != -1).sum()), causal=False)
        assert abs(est / counter.get_total_flops() - 1) < 0.01, (rank, est, counter.get_total_flops())


def test_peak_flops_table():
    from nanocrs.mfu import peak_flops
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12      # SXM
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Some Future GPU") is None


def test_deterministic_flag_runs(dataset_dir, tmp_path):
    """--deterministic (deterministic kernels; on CUDA no flash attention) trains, and gives the
    default run's losses on the CPU, whose kernels are deterministic anyway."""
    try:
        out = run_train(dataset_dir, str(tmp_path / "d"), ["--max-steps", "2", "--deterministic"])
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: do not leak into the other tests
    ref = run_train(dataset_dir, str(tmp_path / "r"), ["--max-steps", "2"])
    assert [r["loss"] for r in read_log(out)] == [r["loss"] for r in read_log(ref)]
