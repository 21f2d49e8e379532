"""
First thing to run on a GPU machine: proves the CUDA path end to end and measures it. Needs one
NVIDIA GPU, a CUDA build of torch, this repository and no internet: it writes its own data and
random Hugging Face-shaped backbones (no weights are downloaded).

    python dev/gpu_check.py                      # on the GPU, about 5-8 minutes on an H100/H200
    python dev/gpu_check.py --cpu-dry-run        # the same sections at toy sizes on the CPU (< 2 min)
    python dev/gpu_check.py --only beam,load_1b  # some sections (fp32_master, qlora bring cli: it writes the backbone)

Sections, in order; the first that fails stops the run (exit status 1):
  env          torch, CUDA, the GPU, bf16 support
  flash        SDPA picks the flash kernel for nanocrs' attention in training (forward, backward),
               prefill and one-token decoding
  parity       CPU vs GPU: logits, KV-cache greedy decoding, beam-search top-50 lists
  cli          data_prep.py, train.py (bf16 from scratch, resumed, --init-from + LoRA),
               sample.py --eval and python -m nanocrs.checkpoint export, as subprocesses on the GPU
  fp32_master  trainable parameters are fp32 over a bf16 base; one step at lr=1e-5 moves them
  qlora        train.py --quantize nf4 (4-bit base, nanocrs/nf4.py) trains, resumes and exports on the GPU;
               Llama-3.1-8B's shapes as QLoRA at micro-batch 4 x 768 with checkpointing: peak memory vs
               nanocrs.memplan's 4-bit plan (it must fit a 24 GB card) and tokens/s
  big_shapes   Qwen2.5-7B and Llama-3.1-8B shapes, random bf16 weights + LoRA r16 + new rows, the
               presets' micro-batch (8 x 768, turn format) with and without activation checkpointing:
               peak memory vs nanocrs.memplan, tokens/s, MFU
  beam         beam-50 seconds per prompt over a ReDial-sized catalogue (6,924 items) on the 7B shape
  load_1b      load a locally written ~1B-parameter checkpoint: host peak memory vs its size
The figures go to --out (JSON) after every section, so a run cut short keeps what finished.
"""

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from nanocrs import memplan  # noqa: E402
from nanocrs.backbone import prepare  # noqa: E402
from nanocrs.common import atomic_path  # noqa: E402
from nanocrs.generate import Control, SIDTrie, beam_search  # noqa: E402
from nanocrs.hf import export_hf  # noqa: E402
from nanocrs.lora import LoRALinear  # noqa: E402
from nanocrs.mfu import peak_flops, train_flops  # noqa: E402
from nanocrs.model import GPT, GPTConfig, rope_frequencies  # noqa: E402
from nanocrs.nf4 import NF4Linear  # noqa: E402
from nanocrs.tokenizer import CONTROL_TOKENS, Tokenizer  # noqa: E402

SECTIONS = ["env", "flash", "parity", "cli", "fp32_master", "qlora", "big_shapes", "beam", "load_1b"]
SYNTH = ["--dataset", "synthetic", "--n-items", "160", "--n-train", "200", "--n-val", "30", "--n-test", "30",
         "--levels", "2", "--codebook-size", "8", "--vocab-size", "400", "--kmeans-iters", "20"]


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def randomize(model, seed=0):
    """O(1) logits that differ between tokens (the 0.02 init makes every logit about 0, and beams tie)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def random_catalogue(n_items, first_sid, levels=3, codes=64, seed=0):
    """A trie of n_items distinct random semantic IDs over token ids first_sid + level * codes + code."""
    g = torch.Generator().manual_seed(seed)
    seen, trie = set(), SIDTrie()
    while len(seen) < n_items:
        sid = tuple(torch.randint(0, codes, (levels,), generator=g).tolist())
        if sid in seen:
            continue
        seen.add(sid)
        node = trie.root
        for lvl, c in enumerate(sid):
            node = node.setdefault(first_sid + lvl * codes + c, {})
        node[SIDTrie.LEAF] = f"item{len(seen)}"
        trie.index[f"item{len(seen)}"] = len(trie.item_ids)
        trie.item_ids.append(f"item{len(seen)}")  # catalogue order: the tie rule of the beam search
    trie.depth = levels
    trie.sid_token_ids = set(range(first_sid, first_sid + levels * codes))
    return trie


def top_items(model, prompt, trie, ctrl, width=50):
    """The one place this script calls beam search: [(item, log-prob)], best first."""
    return beam_search(model, prompt, trie, ctrl, beam_width=width)


# -----------------------------------------------------------------------------
# sections: each takes the run's context dict and returns its figures


def sec_env(ctx):
    dev = ctx["device"]
    fig = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "cuda_build": torch.version.cuda}
    if dev.type == "cuda":
        check(torch.cuda.is_available(), "CUDA is not available: install the CUDA build of torch")
        p = torch.cuda.get_device_properties(dev)
        fig.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2 ** 30, 1),
                   bf16=torch.cuda.is_bf16_supported(), peak_bf16_tflops=(peak_flops(p.name) or 0) / 1e12 or None)
        check(fig["bf16"], f"{p.name} does not support bf16")
        x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
        check(torch.isfinite(x @ x).all().item(), "a bf16 matmul on the GPU is not finite")
    else:
        x = torch.randn(64, 64, dtype=torch.bfloat16)
        check(torch.isfinite(x @ x).all().item(), "a bf16 matmul on the CPU is not finite")
    return fig


def small_model(ctx, seed=0):
    """Qwen2.5-shaped (q/k/v biases, GQA, head_dim 128 on the GPU), randomized, fp32 on the CPU."""
    torch.manual_seed(seed)
    if ctx["dry"]:
        cfg = GPTConfig(vocab_size=600, pad_vocab_to=1, block_size=256, n_layer=2, n_head=4, n_kv_head=2,
                        n_embd=64, qkv_bias=True, tie_embeddings=False)
    else:
        cfg = GPTConfig(vocab_size=8000, pad_vocab_to=1, block_size=1024, n_layer=4, n_head=8, n_kv_head=2,
                        n_embd=1024, qkv_bias=True, tie_embeddings=False)
    return randomize(GPT(cfg), seed)


def sec_flash(ctx):
    dev = ctx["device"]
    model = small_model(ctx).to(dev)
    V = model.config.vocab_size
    x = torch.randint(0, V, (4, 128), device=dev)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])

    def sdpa_ops(fn):
        with torch.profiler.profile(activities=acts) as prof:
            fn()
            sync(dev)
        return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key.startswith("aten::_")})

    def train_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            model.train()(x, x)[1].backward()

    def prefill_and_decode(phase):
        model.eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            cache = model.new_cache(4, 160)
            logits, _ = model(x, cache=cache)
            if phase == "decode":
                state["cache"], state["nxt"] = cache, logits[:, -1:].argmax(-1)

    state = {}
    fig = {"train": sdpa_ops(train_step), "prefill": sdpa_ops(lambda: prefill_and_decode("prefill"))}
    prefill_and_decode("decode")

    def decode():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            for _ in range(4):
                logits, _ = model(state["nxt"], cache=state["cache"])
                state["nxt"] = logits[:, -1:].argmax(-1)
    fig["decode"] = sdpa_ops(decode)
    fig["cache_dtype"] = str(state["cache"].k.dtype)
    check(state["cache"].k.dtype == torch.bfloat16, f"KV cache is {state['cache'].k.dtype} under bf16 autocast")
    for phase, ops in fig.items():
        if phase != "cache_dtype":
            check(ops and all("flash_attention" in op for op in ops), f"{phase}: SDPA ran {ops}, not the flash kernel")
    check(any("backward" in op for op in fig["train"]), f"no flash backward in training: {fig['train']}")
    return fig


def sec_parity(ctx):
    dev, dry = ctx["device"], ctx["dry"]
    cpu = small_model(ctx)
    gpu = small_model(ctx).to(dev)
    V = cpu.config.vocab_size
    if dev.type == "cuda":  # fp32 parity needs true fp32 matmuls, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.randint(0, V - 200, (2, 96), generator=torch.Generator().manual_seed(1))
    fig = {}
    with torch.no_grad():
        ref = cpu.eval()(x)[0]
        out = gpu.eval()(x.to(dev))[0].cpu()
        fig["logits_fp32_max_abs_diff"] = (out - ref).abs().max().item()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out16 = gpu(x.to(dev))[0].float().cpu()
        fig["logits_bf16_autocast_max_abs_diff"] = (out16 - ref).abs().max().item()
        fig["logit_scale"] = ref.abs().max().item()
        check(fig["logits_fp32_max_abs_diff"] < 1e-3 * max(1.0, fig["logit_scale"]), f"fp32 logits differ: {fig}")

        def greedy(model, device, n=24):
            cache = model.new_cache(1, 96 + n + 1)
            logits, _ = model(x[:1].to(device), cache=cache)
            out = []
            for _ in range(n):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
                logits, _ = model(nxt, cache=cache)
            return out
        g_cpu, g_gpu = greedy(cpu, "cpu"), greedy(gpu, dev)
        fig["greedy_tokens_equal"] = sum(a == b for a, b in zip(g_cpu, g_gpu))
        check(g_cpu == g_gpu, f"KV-cache greedy decoding differs: cpu {g_cpu} gpu {g_gpu}")

        first_sid = V - 200 if dry else V - 3 * 64 - 8
        codes = 16 if dry else 64
        trie = random_catalogue(300 if dry else 2000, first_sid, codes=codes)
        ctrl = Control(boi=V - 2, eoi=V - 1, mode_rec=V - 6, mode_chat=V - 5, resp=V - 4, eot=V - 3)
        prompt = x[0, :80].tolist() + [ctrl.boi]
        b_cpu, b_gpu = top_items(cpu, prompt, trie, ctrl), top_items(gpu, prompt, trie, ctrl)
        same = [i for i, _ in b_cpu] == [i for i, _ in b_gpu]
        overlap = len({i for i, _ in b_cpu} & {i for i, _ in b_gpu}) / max(1, len(b_cpu))
        fig.update(beam_top50_identical=same, beam_top50_overlap=overlap,
                   beam_max_score_diff=max(abs(a[1] - b[1]) for a, b in zip(b_cpu, b_gpu)))
        check(overlap >= 0.98, f"beam top-50 overlap CPU vs GPU {overlap:.2f}")
        gpu16 = small_model(ctx).to(dev).to(torch.bfloat16)
        b16 = top_items(gpu16, prompt, trie, ctrl)
        fig["beam_top50_overlap_bf16_weights"] = len({i for i, _ in b_cpu} & {i for i, _ in b16}) / max(1, len(b_cpu))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return fig


def run(cmd, what, env=None):
    t = time.time()
    r = subprocess.run([sys.executable] + cmd, cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    check(r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}")
    return time.time() - t


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def timed_steps(model, opt, x, y, steps: int, dev) -> tuple[float, torch.Tensor]:
    """(mean seconds of the steps after the first, which is warmup; the last loss): bf16 training steps."""
    times = []
    for _ in range(steps):
        sync(dev)
        t = time.time()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            _, loss = model.train()(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        times.append(time.time() - t)
    return sum(times[1:]) / len(times[1:]), loss


def train_and_resume(a, b, steps: int, common: list, what: str, fig: dict, dev) -> tuple[float, list]:
    """train.py for `steps` steps into a, and into b in two halves with --resume: the losses must agree
    (bitwise on the CPU; on CUDA within the tolerance train.py documents, flash backward being
    nondeterministic). Returns (seconds of the run into a, its losses); records both loss lists in fig."""
    seconds = run(["train.py", "--out", a, "--max-steps", str(steps)] + common, what)
    run(["train.py", "--out", b, "--max-steps", str(steps // 2)] + common, f"{what} to step {steps // 2}")
    run(["train.py", "--out", b, "--max-steps", str(steps), "--resume"] + common, f"{what} --resume")
    la, lb = losses(a), losses(b)
    fig["losses"], fig["losses_resumed"] = la, lb
    fig["resume_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
    check(len(la) == len(lb) == steps and all(math.isfinite(x) for x in la), f"{what} did not run: {la}")
    check(fig["resume_max_rel_diff"] <= (0 if dev.type == "cpu" else 1e-3), f"{what}: resume diverged: {la} vs {lb}")
    return seconds, la


def write_backbone(folder, data_dir, seed=0):
    """A tiny random Qwen2.5-shaped Hugging Face folder with a BPE trained on the dataset's text."""
    with open(os.path.join(data_dir, "train.jsonl")) as f:
        texts = [t["text"] for line in f for t in json.loads(line)["turns"]]
    tok = Tokenizer.train(texts, vocab_size=300, added=[])
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=len(tok), pad_vocab_to=1, block_size=512, n_layer=2, n_head=4, n_kv_head=2,
                    n_embd=128, qkv_bias=True, tie_embeddings=False)
    export_hf(GPT(cfg), tok, folder, "qwen2")
    return folder


def sec_cli(ctx):
    w, dev = ctx["work"], ctx["device"]
    data, fig = os.path.join(w, "data"), {}
    fig["data_prep_s"] = run(["data_prep.py"] + SYNTH + ["--out", data], "data_prep.py")
    ctx["data"] = data
    ctx["backbone"] = write_backbone(os.path.join(w, "backbone"), data)
    common = ["--data", data, "--device", dev.type, "--dtype", "bfloat16", "--eval-interval", "3",
              "--save-interval", "3", "--batch-size", "8"]
    if ctx["dry"]:
        common += ["--n-layer", "2", "--n-embd", "64", "--threads", "1"]
    a = os.path.join(w, "scratch")
    fig["train_scratch_s"], la = train_and_resume(a, os.path.join(w, "resumed"), 6, common, "train.py from scratch", fig, dev)
    check(la[-1] < la[0], f"training did not learn: {la}")
    lora = os.path.join(w, "lora")
    fig["train_lora_s"] = run(["train.py", "--out", lora, "--max-steps", "4", "--init-from", ctx["backbone"],
                               "--lora-rank", "4", "--lr", "1e-3"] + common, "train.py --init-from --lora-rank 4")
    ev = os.path.join(w, "eval.json")
    fig["eval_s"] = run(["sample.py", "--ckpt", lora, "--eval", "test", "--max-samples", "4", "--max-gen", "2",
                         "--json", ev, "--device", dev.type], "sample.py --eval")
    with open(ev) as f:
        fig["eval"] = {k: v for k, v in json.load(f).items() if isinstance(v, (int, float))}
    exp = os.path.join(w, "export")
    fig["export_s"] = run(["-m", "nanocrs.checkpoint", "export", "--ckpt", lora, "--out", exp, "--device", dev.type],
                          "python -m nanocrs.checkpoint export")
    check(os.path.isfile(os.path.join(exp, "config.json")), "export wrote no config.json")
    return fig


def sec_fp32_master(ctx):
    dev = ctx["device"]
    torch.manual_seed(0)
    new = CONTROL_TOKENS + [f"<{lv}_{c}>" for lv in "ab" for c in range(8)]
    model, tok, first = prepare(ctx["backbone"], new, 64, 4, 8.0, 0.0, dev, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B and the new rows at a trained size (an update to 0 survives any dtype)
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "new_rows")):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    train = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fig = {"trainable_dtypes": sorted({str(p.dtype) for p in train.values()}),
           "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})}
    check(fig["trainable_dtypes"] == ["torch.float32"], f"trainable parameters: {fig['trainable_dtypes']}")
    check(fig["frozen_dtypes"] == ["torch.bfloat16"], f"frozen parameters: {fig['frozen_dtypes']}")
    opt = model.configure_optimizer(1e-5, 0.0, device_type=dev.type)
    before = {n: p.detach().clone() for n, p in train.items()}
    x = torch.randint(0, len(tok), (4, 33), device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        model.train()(x[:, :-1].contiguous(), x[:, 1:].contiguous())[1].backward()
    has = {n: p.grad != 0 for n, p in train.items()}
    opt.step()
    n_grad = sum(int(m.sum()) for m in has.values())
    moved = sum(int(((train[n].detach() != before[n]) & m).sum()) for n, m in has.items())
    fig.update(elements_with_grad=n_grad, moved=moved, moved_fraction=moved / max(1, n_grad))
    check(fig["moved_fraction"] >= 0.99, f"one step at lr=1e-5 moved {moved} of {n_grad} elements")
    return fig


def random_lora_model(hf, tok_len, device, dropout=0.05, seed=0):
    """The fine-tuning model of memplan.build_meta (LoRA r16 + new rows) made real on `device`:
    frozen weights bf16, trainable fp32, random values (no checkpoint needed to measure)."""
    model, first_new = memplan.build_meta(hf, tok_len)
    g = torch.Generator(device=device).manual_seed(seed)
    done = {}
    for mod in list(model.modules()):
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                dtype = torch.float32 if p.requires_grad else torch.bfloat16
                t = torch.empty(p.shape, device=device, dtype=dtype)
                if name == "bias":
                    t.zero_()
                elif p.dim() == 1:
                    t.fill_(1.0)
                else:  # lora_B too: at a trained size, so that A has gradients as in a real run
                    t.normal_(0, 0.02, generator=g)
                done[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
            setattr(mod, name, done[id(p)])
        if isinstance(mod, LoRALinear):
            mod.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    model.inv_freq = rope_frequencies(model.config).to(device)
    return model, first_new


def sec_qlora(ctx):
    w, dev, dry = ctx["work"], ctx["device"], ctx["dry"]
    common = ["--data", ctx["data"], "--device", dev.type, "--dtype", "bfloat16", "--eval-interval", "0",
              "--save-interval", "2", "--batch-size", "8", "--init-from", ctx["backbone"], "--quantize", "nf4",
              "--lora-rank", "4", "--lr", "1e-3"] + (["--threads", "1"] if dry else [])
    fig = {}
    a = os.path.join(w, "qlora")
    fig["train_s"], _ = train_and_resume(a, os.path.join(w, "qlora_resumed"), 4, common, "train.py --quantize nf4", fig, dev)
    exp = os.path.join(w, "qlora_export")
    run(["-m", "nanocrs.checkpoint", "export", "--ckpt", a, "--out", exp, "--device", dev.type], "export of a QLoRA checkpoint")
    check(os.path.isfile(os.path.join(exp, "config.json")), "QLoRA export wrote no config.json")

    # Llama-3.1-8B's shapes: bf16 random weights, each block linear then swapped for its NF4 version
    name, (hf, tok_len) = ("toy-qwen2", (TOY_HF, 2000)) if dry else ("Llama-3.1-8B-Instruct", memplan.MODELS["Llama-3.1-8B-Instruct"])
    B, T = (2, 64) if dry else (4, memplan.SEQ_LEN)
    model, _ = random_lora_model(hf, tok_len, dev)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.base = NF4Linear.from_linear(m.base)
    model.grad_checkpointing = True
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    plan = memplan.plan(name, hf, tok_len, 0.05, quantize="nf4")
    fig["planned_gib"] = round(memplan.total_bytes(plan, "ckpt", B) / 2 ** 30, 2)  # every token with a loss
    opt = model.configure_optimizer(1e-4, 0.0, device_type=dev.type)
    x = torch.randint(0, model.config.vocab_size, (B, T), device=dev)
    step_s, loss = timed_steps(model, opt, x, torch.roll(x, -1, 1), 2 if dry else 4, dev)
    fig.update(model=name, micro_batch=f"{B} x {T}", step_s=round(step_s, 3), tokens_per_s=round(B * T / step_s),
               loss=loss.item())
    check(math.isfinite(fig["loss"]), f"QLoRA {name}: loss {fig['loss']}")
    if dev.type == "cuda":
        fig["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
        fig["peak_over_plan"] = round(fig["peak_gib"] / fig["planned_gib"], 3)
        check(fig["peak_gib"] <= memplan.card_budget(24) / 2 ** 30, f"QLoRA {name} {B} x {T}: {fig['peak_gib']} GiB "
              "does not fit a 24 GB card")
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return fig


TOY_HF = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2000, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "max_position_embeddings": 1024}


def sec_big_shapes(ctx):
    dev, dry = ctx["device"], ctx["dry"]
    models = {"toy-qwen2": (TOY_HF, 2000)} if dry else memplan.MODELS
    B, T = (2, 64) if dry else (8, memplan.SEQ_LEN)
    sup = max(1, round(memplan.TURN_SUPERVISED * T))  # turn format: the last turn carries the loss
    peak = peak_flops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    fig = {}
    for name, (hf, tok_len) in models.items():
        model, first_new = random_lora_model(hf, tok_len, dev)
        plan = memplan.plan(name, hf, tok_len, 0.05)
        logits = memplan.LOGIT_FP32_COPIES * memplan.FP32 * plan["cfg"].vocab_size
        opt = model.configure_optimizer(1e-4, 0.0, device_type=dev.type)
        V = model.config.vocab_size
        x = torch.randint(0, V, (B, T), device=dev)
        y = torch.roll(x, -1, 1)
        y[:, :T - sup] = -1
        flops = train_flops(model, [T] * B, B * sup)
        for ckpt in (True, False):
            mode = "ckpt" if ckpt else "no ckpt"
            model.grad_checkpointing = ckpt
            planned = plan["static"] + B * T * (plan["per_token"][mode] - round((1 - memplan.TURN_SUPERVISED) * logits))
            rec = {"planned_gib": round(planned / 2 ** 30, 2)}
            try:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                step_s, loss = timed_steps(model, opt, x, y, 2 if dry else 4, dev)
                rec.update(step_s=round(step_s, 3), tokens_per_s=round(B * T / step_s), loss=loss.item())
                if dev.type == "cuda":
                    rec["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
                    rec["peak_over_plan"] = round(rec["peak_gib"] / rec["planned_gib"], 3)
                if peak:
                    rec["mfu"] = round(flops / step_s / peak, 4)
                check(math.isfinite(rec["loss"]), f"{name} {mode}: loss {rec['loss']}")
            except torch.OutOfMemoryError:
                rec["oom"] = True
                check(not ckpt, f"{name}: out of memory with checkpointing at {B} x {T}")
            opt.zero_grad(set_to_none=True)
            fig[f"{name} / {mode}"] = rec
        if name == list(models)[-1]:  # keep the last (Qwen2.5-7B) for the beam section: only one lives at a time
            ctx["beam_model"] = (model.eval(), first_new)
        else:
            del model
        del opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return fig


def sec_beam(ctx):
    dev, dry = ctx["device"], ctx["dry"]
    if "beam_model" not in ctx:
        hf, tok_len = (TOY_HF, 2000) if dry else memplan.MODELS["Qwen2.5-7B-Instruct"]
        model, first_new = random_lora_model(hf, tok_len, dev)
        ctx["beam_model"] = (model.eval(), first_new)
    model, first_new = ctx["beam_model"]
    V = model.config.vocab_size
    n_items = 6924  # ReDial's movies
    trie = random_catalogue(n_items, first_new + len(CONTROL_TOKENS), levels=3, codes=64)
    ctrl = Control(*range(first_new, first_new + len(CONTROL_TOKENS)))  # the ids follow CONTROL_TOKENS' order
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, first_new, (64 if dry else 400,), generator=g).tolist() + [ctrl.boi] for _ in range(3)]
    times = []
    for p in prompts:
        sync(dev)
        t = time.time()
        top = top_items(model, p, trie, ctrl, 50)
        sync(dev)
        times.append(time.time() - t)
        check(len(top) == 50 and len({i for i, _ in top}) == 50, f"beam returned {len(top)} items")
    fig = {"vocab": V, "items": n_items, "beam": 50, "prompt_tokens": len(prompts[0]),
           "seconds_per_prompt": round(sum(times[1:]) / len(times[1:]), 3), "first_prompt_s": round(times[0], 3)}
    fig["redial_test_hours_at_4900_prompts"] = round(fig["seconds_per_prompt"] * 4900 / 3600, 2)
    del ctx["beam_model"]
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return fig


def sec_load_1b(ctx):
    dev, dry = ctx["device"], ctx["dry"]
    folder = os.path.join(ctx["work"], "ckpt_1b")
    cfg = GPTConfig(vocab_size=32000, pad_vocab_to=1, block_size=2048, n_layer=20, n_head=16, n_kv_head=8,
                    n_embd=2048, intermediate_size=5632, tie_embeddings=False, rope_theta=500000.0)
    if dry:
        cfg = GPTConfig(vocab_size=4000, pad_vocab_to=1, block_size=256, n_layer=4, n_head=4, n_kv_head=2,
                        n_embd=256, tie_embeddings=False)
    t = time.time()
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02)
    model.inv_freq = rope_frequencies(cfg)
    tok = Tokenizer.train(["a b c d e f"] * 4, vocab_size=280, added=[])
    tok.add_tokens([f"<x{i}>" for i in range(cfg.vocab_size - len(tok))])
    export_hf(model, tok, folder, "llama")
    n_params = model.num_params()
    del model
    size = os.path.getsize(os.path.join(folder, "model.safetensors"))
    fig = {"params_b": round(n_params / 1e9, 3), "file_gib": round(size / 2 ** 30, 3), "write_s": round(time.time() - t, 1)}
    probe = ("import json, resource, sys, time, torch; sys.path.insert(0, {repo!r}); from nanocrs.hf import load_hf; "
             "d = torch.device({dev!r}); torch.zeros(1, device=d); t = time.time(); "
             "{load}; print(json.dumps({{'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
             "'s': time.time() - t}}))")
    out = {}
    for what, load in (("baseline", "None"), ("load", f"m, _ = load_hf({folder!r}, device=d, dtype=torch.bfloat16)")):
        r = subprocess.run([sys.executable, "-c", probe.format(repo=REPO, dev=str(dev), load=load)],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"loading the 1B checkpoint failed: {r.stderr[-2000:]}")
        out[what] = json.loads(r.stdout.strip().splitlines()[-1])
    extra = out["load"]["maxrss"] - out["baseline"]["maxrss"]
    fig.update(load_s=round(out["load"]["s"], 2), host_peak_over_baseline_gib=round(extra / 2 ** 30, 3),
               host_peak_over_size=round(extra / size, 3))
    # on the GPU the weights never stay on the host; on the CPU the model itself is one copy
    limit = 0.5 if dev.type == "cuda" else 1.5
    check(extra / size <= limit, f"host peak {extra / 2 ** 30:.2f} GiB for a {size / 2 ** 30:.2f} GiB checkpoint")
    return fig


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="every section at toy sizes on the CPU")
    ap.add_argument("--out", default=os.path.join(REPO, "out", "gpu_check.json"), help="figures (JSON)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--only", default="", help="comma-separated sections (default: all, in order)")
    a = ap.parse_args(argv)
    if a.cpu_dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(min(4, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device (install the CUDA build of torch; or run with --cpu-dry-run)", file=sys.stderr)
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
    only = [s for s in a.only.split(",") if s] or SECTIONS
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)} (known: {', '.join(SECTIONS)})")
    # a section's inputs: fp32_master and qlora need cli's backbone
    todo = [s for s in SECTIONS if s in only or (s == "cli" and {"fp32_master", "qlora"} & set(only))]
    work = a.work or tempfile.mkdtemp(prefix="nanocrs_gpu_check_")
    ctx = {"device": device, "dry": a.cpu_dry_run, "work": work}
    report = {"mode": "cpu-dry-run" if a.cpu_dry_run else "gpu", "sections": {}}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    t_all, status = time.time(), 0
    for name in todo:
        t = time.time()
        print(f"== {name}", flush=True)
        try:
            fig = globals()[f"sec_{name}"](ctx)
            fig = {"ok": True, "seconds": round(time.time() - t, 1), **fig}
        except Exception as e:  # noqa: BLE001 -- recorded, then the run stops
            fig = {"ok": False, "seconds": round(time.time() - t, 1), "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
            status = 1
        report["sections"][name] = fig
        report["total_seconds"] = round(time.time() - t_all, 1)
        with atomic_path(a.out) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(json.dumps({k: v for k, v in fig.items() if k != "traceback"}, default=str)[:2000], flush=True)
        if status:
            print(f"FAILED in {name}: {fig['error']}\n{fig['traceback']}", file=sys.stderr)
            break
    print(f"{'all passed' if not status else 'failed'} in {time.time() - t_all:.0f} s; figures in {a.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
