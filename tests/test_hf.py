"""
Tests for nanocrs/hf.py against the reference implementation (transformers), offline and on the CPU:
tiny random Llama (llama3 RoPE scaling), Qwen2 (q/k/v biases, tied, padded vocabulary), Qwen3 (q/k
norm, head_dim != hidden/heads) and Mistral checkpoints, each saved in several shards.

    python -m pytest tests/test_hf.py -q

Checked: logits (fp32) and greedy KV-cache generation equal transformers'; old (top-level rope_theta)
and new (rope_parameters) config.json layouts load alike; resizing the vocabulary and adding tokens
keep the old tokens' logits; export_hf writes a folder transformers loads with the same logits; bad
folders fail with one-line errors. Skipped when transformers is not installed.
"""

import json
import math
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network (read when transformers is imported)
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from nanocrs.hf import add_tokens, config_from_hf, export_hf, hf_config_from, load_hf, resize_vocab  # noqa: E402
from nanocrs.model import GPT, GPTConfig  # noqa: E402
from nanocrs.tokenizer import Tokenizer  # noqa: E402

NEW_TOKENS = ["<BOI>", "<EOI>", "<MODE=REC>", "<a_0>", "<a_1>", "<b_0>"]
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {
    # Llama-3.1-style RoPE scaling with a short original context, so all three frequency bands occur
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32})),
    # like Qwen2.5: biases, tied embeddings, more embedding rows than tokenizer tokens
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, extra_rows=21,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=4096)),
}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A tiny byte-level BPE, shaped like the ones pretrained checkpoints ship."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "recommend me a horror movie from 1987 please",
            "I loved it, any other ideas?", "a fun comedy with a great plot"] * 20
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def randomize(model, seed=0):
    """O(1) logits that differ between positions: the default 0.02 init makes every logit ~0 and a
    wrong RoPE or a missing bias could hide under the tolerance."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


@pytest.fixture(scope="module")
def folders(hf_tokenizer, tmp_path_factory):
    """{family: folder} of tiny random Hugging Face checkpoints, several shards each, plus tokenizer.json."""
    out = {}
    for name, (cls, kw) in FAMILIES.items():
        kw = dict(kw)
        vocab = hf_tokenizer.get_vocab_size() + kw.pop("extra_rows", 0)
        cfg = getattr(transformers, cls)(**{**BASE, **kw, "vocab_size": vocab})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            randomize(model)
        d = str(tmp_path_factory.mktemp("hf") / name)
        model.save_pretrained(d, max_shard_size="40KB")
        hf_tokenizer.save(os.path.join(d, "tokenizer.json"))
        out[name] = d
    return out


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ids(vocab, B=2, T=16, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def rewrite_config(src, dst, edit):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        hf = json.load(f)
    edit(hf)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f)
    return dst


# -----------------------------------------------------------------------------
# parity with transformers

@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(folders, name):
    d = folders[name]
    shards = [f for f in os.listdir(d) if f.startswith("model-0")]
    assert len(shards) >= 3 and os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    model, tok = load_hf(d)
    ref = reference(d)
    cfg = model.config
    assert cfg.vocab_size == ref.config.vocab_size and cfg.pad_vocab_to == 1
    x = ids(len(tok))
    ours, _ = model(x)
    theirs = ref(x).logits
    print(f"{name}: max |logit diff| {(ours - theirs).abs().max().item():.2e} (logit scale {theirs.abs().max().item():.1f})")
    torch.testing.assert_close(ours, theirs)
    if name == "qwen2":
        assert cfg.qkv_bias and cfg.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
        assert cfg.vocab_size == len(tok) + 21
    if name == "qwen3":
        assert cfg.qk_norm and cfg.head_dim == 32 != cfg.n_embd // cfg.n_head
    if name == "mistral":
        assert cfg.n_kv_head == 1 and cfg.block_size == 128  # the 4096 window never takes effect
    if name == "llama":
        # the llama3 scaling must actually matter here, or this test would not check it
        assert cfg.rope_scaling["rope_type"] == "llama3"
        plain = GPT(GPTConfig(**{**cfg.to_dict(), "rope_scaling": {}}))
        plain.load_state_dict(model.state_dict())
        assert (plain(x)[0] - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_old_and_new_config_layouts(folders, name, tmp_path):
    """Hub-era config.json (top-level rope_theta, rope_scaling, torch_dtype) loads like the new one."""
    def to_old(hf):
        rp = hf.pop("rope_parameters")
        hf["rope_theta"] = rp.pop("rope_theta")
        hf["rope_scaling"] = rp if rp.get("rope_type") != "default" else None
        hf["torch_dtype"] = hf.pop("dtype")
    old = rewrite_config(folders[name], str(tmp_path / "old"), to_old)
    with open(os.path.join(folders[name], "config.json")) as f:
        new_cfg = config_from_hf(json.load(f))
    model, tok = load_hf(old)
    assert model.config == new_cfg
    assert "rope_parameters" not in open(os.path.join(old, "config.json")).read()
    x = ids(len(tok), seed=1)
    torch.testing.assert_close(model(x)[0], reference(folders[name])(x).logits)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_transformers(folders, name):
    model, tok = load_hf(folders[name])
    prompt = ids(len(tok), B=1, T=6, seed=2)
    expected = reference(folders[name]).generate(prompt, attention_mask=torch.ones_like(prompt),
                                                 max_new_tokens=10, do_sample=False)[0, 6:].tolist()
    cache = model.new_cache(1, 6 + 10)
    logits, _ = model(prompt, cache=cache)  # prefill once, then one token at a time
    out = []
    for _ in range(10):
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        out.append(nxt.item())
        logits, _ = model(nxt, cache=cache)
    assert out == expected


# -----------------------------------------------------------------------------
# vocabulary

@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_add_tokens_keeps_old_logits(folders, name):
    model, tok = load_hf(folders[name])
    n_old = len(tok)
    x = ids(n_old, seed=3)
    before, _ = model(x)
    old_emb = model.embed_tokens.weight[:n_old].clone()
    old_head = model.lm_head.weight[:n_old].clone()
    n = add_tokens(model, tok, NEW_TOKENS)
    assert n == len(NEW_TOKENS) and len(tok) == model.config.vocab_size == n_old + n
    assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == n_old + n  # Qwen's padding rows gone
    assert [tok.id(t) for t in NEW_TOKENS] == list(range(n_old, n_old + n))
    after, _ = model(x)
    torch.testing.assert_close(after[..., :n_old], before[..., :n_old])
    for w, old in ((model.embed_tokens.weight, old_emb), (model.lm_head.weight, old_head)):
        torch.testing.assert_close(w[:n_old], old)
        torch.testing.assert_close(w[n_old:], old.mean(0).expand(n, -1))
    assert model.config.tie_embeddings == (model.lm_head.weight is model.embed_tokens.weight)
    assert add_tokens(model, tok, NEW_TOKENS) == 0  # already there: nothing changes
    assert model.config.vocab_size == n_old + n


def test_resize_vocab_grow_and_shrink_padded_model():
    """A from-scratch model (vocabulary padded to 64 rows): growing and shrinking keep the kept logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, pad_vocab_to=64, block_size=32, n_layer=1, n_head=2, n_kv_head=1,
                          n_embd=32, tie_embeddings=False)).eval()
    x = ids(90, seed=4)
    before, _ = model(x)  # (B, T, 100)
    resize_vocab(model, 150)
    assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == 192
    torch.testing.assert_close(model(x)[0][..., :100], before)
    resize_vocab(model, 90)
    assert model.embed_tokens.weight.shape[0] == 128 and model(x)[0].shape[-1] == 90
    torch.testing.assert_close(model(x)[0], before[..., :90])


# -----------------------------------------------------------------------------
# export

@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_round_trip(folders, name, tmp_path):
    model, tok = load_hf(folders[name])
    add_tokens(model, tok, NEW_TOKENS)
    out = str(tmp_path / "export")
    export_hf(model, tok, out)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == name
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert ("lm_head.weight" in keys) == (not model.config.tie_embeddings)
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in keys)
    x = torch.cat([ids(len(tok), B=1, T=10, seed=5), torch.tensor([[tok.id(t) for t in NEW_TOKENS]])], 1)
    ours, _ = model(x)
    ref = reference(out)
    torch.testing.assert_close(ref(x).logits, ours)
    again, _ = load_hf(out)
    torch.testing.assert_close(again(x)[0], ours)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "recommend <BOI><a_0><b_0><EOI> the fox"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_export_from_scratch_model(hf_tokenizer, tmp_path):
    """A nanocrs model trained from scratch (padded vocabulary) exports as llama without the padding."""
    tok = Tokenizer(HFTokenizer.from_str(hf_tokenizer.to_str()))
    tok.add_tokens(NEW_TOKENS)
    cfg = GPTConfig(vocab_size=len(tok), pad_vocab_to=64, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    assert cfg.padded_vocab_size > cfg.vocab_size
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    randomize(model, seed=1)
    out = str(tmp_path / "scratch")
    export_hf(model, tok, out)
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["model_type"] == "llama" and hf["vocab_size"] == len(tok)
    back = config_from_hf(hf)
    assert back == GPTConfig(**{**cfg.to_dict(), "pad_vocab_to": 1})
    x = ids(len(tok), seed=6)
    torch.testing.assert_close(reference(out)(x).logits, model(x)[0])


# -----------------------------------------------------------------------------
# errors: one line, naming what is wrong

def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_configs_fail_in_one_line(folders, tmp_path):
    hf = json.load(open(os.path.join(folders["qwen2"], "config.json")))
    one_line_error(lambda: config_from_hf({**hf, "model_type": "gpt2"}), "model_type 'gpt2'")
    one_line_error(lambda: config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6,
                                                                      "factor": 4.0}}), "rope type 'yarn'")
    one_line_error(lambda: config_from_hf({**hf, "use_sliding_window": True}), "sliding-window")
    one_line_error(lambda: config_from_hf({**hf, "hidden_act": "gelu"}), "hidden_act")
    one_line_error(lambda: hf_config_from(config_from_hf(hf), "llama"), "qkv_bias")
    bad = rewrite_config(folders["llama"], str(tmp_path / "phi"), lambda c: c.update(model_type="phi3"))
    one_line_error(lambda: load_hf(bad), "model_type 'phi3'")


def test_unknown_and_missing_weights_fail_in_one_line(folders, tmp_path):
    def edit_shard(dst, fn):
        shutil.copytree(folders["llama"], dst)
        first = sorted(set(json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"].values()))[0]
        path = os.path.join(dst, first)
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        return dst
    extra = edit_shard(str(tmp_path / "extra"), lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    one_line_error(lambda: load_hf(extra), "unknown weight 'model.layers.0.self_attn.extra.weight'")
    too_deep = edit_shard(str(tmp_path / "deep"), lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    one_line_error(lambda: load_hf(too_deep), "does not fit this config")
    missing = edit_shard(str(tmp_path / "missing"), lambda t: t.pop(next(iter(t))))
    one_line_error(lambda: load_hf(missing), "lacks 1 weights")
