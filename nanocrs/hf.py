"""
Pretrained backbones: load a Hugging Face Llama / Qwen2(.5) / Qwen3 / Mistral folder into nanocrs'
GPT, grow its vocabulary by nanocrs' tokens, and export the result back to a Hugging Face folder.

    from nanocrs.hf import load_hf, add_tokens, export_hf
    model, tok = load_hf("path/to/Qwen2.5-0.5B", device="cuda")     # bf16 on CUDA, fp32 on the CPU
    n_new = add_tokens(model, tok, added_tokens(sids))
    ...fine-tune...
    export_hf(model, tok, "out/export")   # config.json + model.safetensors + tokenizer.json

    python -m nanocrs.checkpoint export --ckpt out/smol --out out/smol-hf   # a trained checkpoint, LoRA merged

The folder must hold config.json, tokenizer.json and model.safetensors (or the shards
model-0000x-of-0000y.safetensors with model.safetensors.index.json). Nothing is downloaded.

Loading never holds two copies of the model: it is built on the meta device (no memory, no random
init), then every tensor is read on its own from its shard, converted to the chosen dtype and put in
place of its meta parameter. Every checkpoint key must be in WEIGHT_MAP and every parameter must be
filled, otherwise the load stops with a one-line ValueError naming the key.

Our module names are Hugging Face's minus the "model." prefix and our RoPE is the split-halves
(rotate_half) form that these checkpoints are trained with, so q_proj/k_proj load unchanged.
"""

import json
import os
import re

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from nanocrs import nf4
from nanocrs.common import atomic_path
from nanocrs.lora import merge_lora
from nanocrs.model import GPT, GPTConfig, rope_frequencies
from nanocrs.tokenizer import Tokenizer

# Hugging Face checkpoint name -> nanocrs parameter name; {} is the layer index.
WEIGHT_MAP = {
    "model.embed_tokens.weight":                       "embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight":          "layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight":         "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight":         "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight":         "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias":           "layers.{}.self_attn.q_proj.bias",    # Qwen2.5
    "model.layers.{}.self_attn.k_proj.bias":           "layers.{}.self_attn.k_proj.bias",    # Qwen2.5
    "model.layers.{}.self_attn.v_proj.bias":           "layers.{}.self_attn.v_proj.bias",    # Qwen2.5
    "model.layers.{}.self_attn.q_norm.weight":         "layers.{}.self_attn.q_norm.weight",  # Qwen3
    "model.layers.{}.self_attn.k_norm.weight":         "layers.{}.self_attn.k_norm.weight",  # Qwen3
    "model.layers.{}.self_attn.o_proj.weight":         "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.mlp.gate_proj.weight":            "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight":              "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight":            "layers.{}.mlp.down_proj.weight",
    "model.norm.weight":                               "norm.weight",
    "lm_head.weight":                                  "lm_head.weight",  # absent when tied
}
# Keys some checkpoints carry that are not weights (older Llama saves stored the RoPE table).
IGNORED = {"model.layers.{}.self_attn.rotary_emb.inv_freq", "model.rotary_emb.inv_freq"}
TO_HF = {ours: theirs for theirs, ours in WEIGHT_MAP.items()}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _template(name: str, prefix: str) -> tuple[str, int | None]:
    """'model.layers.7.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 7)."""
    m = re.match(re.escape(prefix) + r"layers\.(\d+)\.", name)
    if m is None:
        return name, None
    return f"{prefix}layers.{{}}." + name[m.end():], int(m.group(1))


# -----------------------------------------------------------------------------
# config.json <-> GPTConfig

def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """A GPTConfig from a Hugging Face config.json dict. Old (top-level rope_theta / rope_scaling)
    and new (transformers 5's rope_parameters) layouts both work; anything we would run differently
    from the reference implementation is refused with a one-line ValueError."""
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    # Qwen2 always has q/k/v biases and no o_proj bias; elsewhere attention_bias adds an o_proj bias too
    if mt != "qwen2" and hf.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true is not supported for {mt} (it biases o_proj too)")

    # RoPE: rope_parameters (new) wins over rope_scaling (old); theta may sit in either or at the top
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"{where}: rope type {kind!r} is not supported (supported: default, llama3)")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    scaling = {}
    if kind == "llama3":
        missing = [k for k in LLAMA3_KEYS if k not in rope]
        if missing:
            raise ValueError(f"{where}: llama3 rope scaling lacks {missing}")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_KEYS}}

    # Sliding-window attention: Qwen's is switched on by use_sliding_window and we refuse it. Mistral's
    # changes nothing for sequences no longer than the window, so the block size is capped there.
    block_size = hf.get("max_position_embeddings", 4096)
    if mt in ("qwen2", "qwen3") and (hf.get("use_sliding_window") or "sliding_attention" in hf.get("layer_types", [])):
        raise ValueError(f"{where}: sliding-window attention (use_sliding_window=true) is not supported")
    if mt == "mistral" and hf.get("sliding_window"):
        block_size = min(block_size, hf["sliding_window"])

    n_head = hf["num_attention_heads"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        pad_vocab_to=1,  # the checkpoint's row count is the vocabulary; padding would shift nothing but memory
        block_size=block_size,
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,  # Qwen3 sets it; never derive it there
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False is these families' default
        qkv_bias=mt == "qwen2",
        qk_norm=mt == "qwen3",
    )


def hf_config_from(cfg: GPTConfig, model_type: str) -> dict:
    """A Hugging Face config.json dict for cfg. RoPE is written both ways (rope_parameters for
    transformers >= 5, rope_theta + rope_scaling for older readers such as GGUF converters)."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} can not be exported (supported: {', '.join(ARCHITECTURES)})")
    if cfg.qkv_bias != (model_type == "qwen2"):
        raise ValueError(f"model_type {model_type!r} does not match qkv_bias={cfg.qkv_bias} (only qwen2 has q/k/v biases)")
    if cfg.qk_norm != (model_type == "qwen3"):
        raise ValueError(f"model_type {model_type!r} does not match qk_norm={cfg.qk_norm} (only qwen3 has q/k norms)")
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope_parameters,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) or None,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if model_type in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if model_type == "llama":
        hf["mlp_bias"] = False
    if model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if model_type in ("qwen2", "qwen3", "mistral"):
        hf["sliding_window"] = None
    return hf


# -----------------------------------------------------------------------------
# loading

def _shards(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(folder, n) for n in names]
        for p in paths:
            if not os.path.isfile(p):
                raise ValueError(f"{index}: lists {os.path.basename(p)}, which is not in the folder")
        return paths
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor):
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, leaf, nn.Parameter(tensor, requires_grad=getattr(mod, leaf).requires_grad))


def load_hf(folder: str, device="cpu", dtype: torch.dtype | None = None, quantize: str = "none") -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a Hugging Face folder. dtype defaults to bf16 on CUDA, fp32 elsewhere.
    The embedding keeps the checkpoint's row count (Qwen's exceeds the tokenizer's length);
    add_tokens() trims it to the tokenizer first. quantize="nf4": the block linears are stored in 4
    bits, each quantized on `device` as it is read (nanocrs/nf4.py)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path}: not found")
    with open(cfg_path) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf, where=cfg_path)
    shards = _shards(folder)
    tokenizer = Tokenizer.load(os.path.join(folder, "tokenizer.json"))

    # Footgun: this GPT lives on the meta device. It has shapes but no memory and no init, and every
    # parameter must be replaced by a real tensor below before the model can run.
    with torch.device("meta"):
        model = GPT(cfg)
    expected = dict(model.named_parameters())  # tied lm_head.weight is listed once, as embed_tokens.weight
    shells = nf4.meta_shells(model, dtype) if quantize == "nf4" else {}  # {weight name: empty NF4Linear}
    loaded = set()
    for path in shards:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            template, layer = _template(key, "model.")
            if template in IGNORED:
                continue
            if template not in WEIGHT_MAP:
                raise ValueError(f"{path}: unknown weight {key!r} (not in nanocrs.hf.WEIGHT_MAP)")
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # a tied checkpoint that also stored the head: the embedding is the head
            ours = WEIGHT_MAP[template].format(layer)
            if ours not in expected:
                raise ValueError(f"{path}: weight {key!r} does not fit this config (no parameter {ours!r})")
            # One tensor at a time, each from its own memory map of the file, closed right after: the
            # pages read stay resident while the map is open, so a whole shard held open would cost a
            # second copy of it. copy=True: the model owns its memory, not a view of the file.
            with safe_open(path, framework="pt") as f:
                t = f.get_tensor(key)
            if t.shape != expected[ours].shape:
                raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, config.json implies {tuple(expected[ours].shape)}")
            if ours in shells:  # quantized on the device from the checkpoint's own dtype: no 16-bit copy stays
                shells[ours].quantize_(t.to(device))
            else:
                _set_param(model, ours, t.to(device=device, dtype=dtype, copy=True))
            del t
            loaded.add(ours)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {TO_HF[_template(missing[0], '')[0]]!r}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_frequencies(cfg).to(device)  # the buffer was built on meta too
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()]), "a tensor was never filled"
    model.hf_model_type = hf["model_type"]  # export_hf writes the same model_type back
    return model.eval(), tokenizer


# -----------------------------------------------------------------------------
# vocabulary

@torch.no_grad()
def resize_vocab(model: GPT, new_size: int):
    """Give the model new_size tokens: rows past new_size are dropped, new rows (input and output
    embedding) start at the mean of the kept rows, so the old tokens' logits do not change. Call it
    before building the optimizer: the embedding parameters are replaced."""
    cfg = model.config
    keep = min(cfg.vocab_size, new_size)
    cfg.vocab_size = new_size
    rows = cfg.padded_vocab_size

    def resized(w):  # (old_rows, C) -> (rows, C)
        mean = w[:keep].mean(0, dtype=torch.float32).to(w.dtype)  # (C,)
        out = mean.expand(rows, -1).clone()
        out[:keep] = w[:keep]
        return nn.Parameter(out, requires_grad=w.requires_grad)

    model.embed_tokens.weight = resized(model.embed_tokens.weight)
    model.embed_tokens.num_embeddings = rows
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.weight = resized(model.lm_head.weight)
    model.lm_head.out_features = rows
    assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == rows


def add_tokens(model: GPT, tokenizer: Tokenizer, tokens: list[str]) -> int:
    """Append tokens to the tokenizer and the model (rows = mean of the existing rows); returns how
    many were new. The embedding is first trimmed or grown to the tokenizer's length, so padding
    rows (Qwen) neither shift the new ids nor pull on the mean."""
    if model.config.vocab_size != len(tokenizer):
        resize_vocab(model, len(tokenizer))
    n_new = tokenizer.add_tokens(tokens)
    resize_vocab(model, len(tokenizer))
    assert all(tokenizer.id(t) < len(tokenizer) for t in tokens), "added token ids must end the vocabulary"
    return n_new


# -----------------------------------------------------------------------------
# export

def _infer_model_type(model: GPT) -> str:
    cfg = model.config
    return getattr(model, "hf_model_type", None) or ("qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama")


@torch.no_grad()
def export_hf(model: GPT, tokenizer: Tokenizer, out_dir: str, model_type: str | None = None):
    """Write out_dir/{config.json, model.safetensors, tokenizer.json}, loadable with transformers'
    AutoModelForCausalLM.from_pretrained. model_type defaults to the source checkpoint's, else
    qwen3 / qwen2 / llama by the architecture. Vocabulary padding rows and the copy head are not written. LoRA
    adapters and split token rows still in the model are merged into it first (in place)."""
    cfg = model.config
    merge_lora(model)  # a model with LoRA still unmerged (a bf16 base at inference): fold it in now
    model_type = model_type or _infer_model_type(model)
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {cfg.vocab_size}: call add_tokens()")
    hf = hf_config_from(cfg, model_type)
    weight_dtype = model.embed_tokens.weight.dtype
    hf["dtype"] = hf["torch_dtype"] = str(weight_dtype).removeprefix("torch.")

    tensors = {}
    for name, t in model.state_dict().items():  # the live module, never a compiled wrapper's "_orig_mod."
        if (name == "lm_head.weight" and cfg.tie_embeddings) or name.startswith("heads."):
            continue  # the recommendation slot's heads (nanocrs/heads.py) have no Hugging Face counterpart
        template, layer = _template(name, "")
        if template not in TO_HF:
            raise ValueError(f"parameter {name!r} has no Hugging Face name (not in nanocrs.hf.WEIGHT_MAP)")
        if name in ("embed_tokens.weight", "lm_head.weight"):
            t = t[:cfg.vocab_size]  # drop the padding rows
        tensors[TO_HF[template].format(layer)] = t.detach().to("cpu").contiguous()

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    # Without it transformers' AutoTokenizer would guess a model-specific class
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # last: a folder without it is unfinished
        json.dump(hf, f, indent=2)
