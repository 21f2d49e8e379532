"""
Benchmarks for nanocrs, each against the obvious alternative, printed as one table.

    python dev/bench.py --quick                         # tiny sizes, about 30 s: a smoke test
    python dev/bench.py --json out/bench.json           # quickstart-size model; quantizer on 10k, 100k, 1M (~6 min)
    python dev/bench.py --compile --json out/bench.json # + torch.compile'd training (both models)
    python dev/bench.py --sections train,decode --threads 1      # a subset, one CPU thread
    OMP_NUM_THREADS=1 python dev/bench.py --load-memory [--load-dtype bf16|fp32] [--load-params 1e9]  # section 5 only

1. Training throughput: tokens/s of one training step (forward, backward, AdamW) of nanocrs' GPT
   against transformers' LlamaForCausalLM built from the same config with the same weights, batch,
   sequence length and thread count (fp32 on the CPU, bf16 autocast on CUDA); once with a loss on
   every token, once with a dialog's loss mask (--supervised-share of the tokens, in 32-token spans;
   the same loss value from both), where nanocrs runs its output head and its last block's output
   projection and MLP only on the supervised positions. Both use fused AdamW. With --compile, the same two rows with both
   models under torch.compile (nanocrs block by block, as train.py --compile does).
2. Recommendation decoding: nanocrs.generate.beam_search (width 50; one prefill, the beams read the
   prompt's cache uncopied) against transformers' generate(num_beams=50, num_return_sequences=50,
   prefix_allowed_tokens_fn=<the same trie>, max_new_tokens=SID length, length_penalty=0). Both rank
   by the summed log-probability of the SID (every SID has the same length, so the length penalty
   could not matter anyway): the top-50 item lists must be identical. Also trie-constrained sampling
   against the same sampling loop with no trie: the constraint's overhead. Both at each thread count
   of --decode-threads (1 and 2: transformers gains more from a second thread than a Python loop
   does). Last, the decoder's own time per beam step with a 152k vocabulary and a model that costs
   nothing: what a GPU would wait for on the host.
3. Quantizer scale: residual k-means (3 levels x 256 codes) + collision suffixes on random 384-d
   vectors, each size in its own subprocess so that its peak RSS (VmHWM) is its own. Each level
   is fitted on at most --kmeans-points (256) points per centroid, then assigns every vector; 100k is
   also fitted on all points, and the final residual MSE of both shows what the sample costs.
4. Evaluation throughput: rec samples/s of nanocrs.evaluate (paper protocol, beam 50, no response
   generation) on a small synthetic dataset and a 2-step checkpoint built in a temp folder, one prompt
   at a time (--eval-batch 1) and batched (8), with identical rankings.
5. Load memory (--load-memory, or --sections load; not run by default: minutes, ~3x the checkpoint in
   RAM): a random ~1B-parameter Llama written as sharded safetensors into a temp folder (deleted after),
   then, each in a fresh process, the peak RSS of nanocrs.hf.load_hf against transformers'
   from_pretrained (+ a sum over every weight, so lazily mapped weights are really read), both in the
   checkpoint's dtype and less the RSS of the same process that only imports. Target: <= 1.3x disk.

Sections 1-2 use a model of the quickstart's shape (4 layers, n_embd 192, 4 heads / 2 kv heads,
tied, vocabulary 1387 of which 6 control tokens and 51 SID tokens) with random weights scaled so
that logits are O(1): near-ties between items would make the list comparison meaningless. Timed
runs are interleaved (A B, B A, ...) and medians are reported: the 2-core machine is noisy.
"""

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # nanocrs and the top-level scripts (section 4 runs them)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from nanocrs import generate  # noqa: E402
from nanocrs.common import init_device, run_script  # noqa: E402
from nanocrs.generate import Control, SIDTrie, beam_search, sample  # noqa: E402
from nanocrs.model import GPT, GPTConfig  # noqa: E402
from nanocrs.quantizer import QuantizerConfig, quantize  # noqa: E402
from nanocrs.tokenizer import CONTROL_TOKENS, added_tokens  # noqa: E402

# model / data sizes: the quickstart's, and tiny ones for --quick and the test
FULL = dict(n_bpe=1330, n_items=600, levels=3, codes=16, n_layer=4, n_embd=192, n_head=4, n_kv_head=2,
            batch=8, seq=256, train_rounds=9, prompt_len=128, n_prompts=4, beam_rounds=3,
            sample_tokens=64, sample_rounds=5, quant_sizes=[10_000, 100_000, 1_000_000],
            data_args=["--n-items", "600", "--n-train", "300", "--n-val", "20", "--n-test", "40"])
QUICK = dict(n_bpe=300, n_items=160, levels=2, codes=8, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
             batch=4, seq=64, train_rounds=3, prompt_len=32, n_prompts=2, beam_rounds=2,
             sample_tokens=48, sample_rounds=5, quant_sizes=[10_000],
             data_args=["--n-items", "160", "--n-train", "100", "--n-val", "10", "--n-test", "20",
                        "--levels", "2", "--codebook-size", "8", "--vocab-size", "400"])
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--compile", action="store_true", help="also time nanocrs training under torch.compile")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--sections", default="train,decode,quantizer,eval", help="comma-separated subset")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for every run (0: torch's default)")
    p.add_argument("--decode-threads", default="1,2", help="section 2 runs once per thread count in this list")
    p.add_argument("--supervised-share", type=float, default=0.42,
                   help="section 1: share of tokens with a loss in the dialog-mask row (ReDial's training data: 0.42)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (sections 1-2)")
    p.add_argument("--load-memory", action="store_true", help="run only section 5, the load-memory benchmark")
    p.add_argument("--load-dtype", default="bf16", choices=list(DTYPES), help="section 5: checkpoint dtype")
    p.add_argument("--load-params", type=float, default=1e9, help="section 5: about this many parameters")
    p.add_argument("--kmeans-points", type=int, default=256,
                   help="section 3: k-means is fitted on at most this many points per centroid (0: all points)")
    p.add_argument("--quantizer-child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # internal: N POINTS
    p.add_argument("--load-child", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: WHICH FOLDER DTYPE
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# the shared setup: a random SID catalogue, its trie, a random model and its transformers twin

class Vocab:
    """Stands in for the tokenizer: [text tokens][control tokens][SID tokens], and the id() lookup
    that SIDTrie.build and Control.of need. Text tokens have no strings, only ids."""

    def __init__(self, n_bpe, added):
        self.ids = {t: n_bpe + i for i, t in enumerate(added)}
        self.n_bpe, self.size = n_bpe, n_bpe + len(added)

    def id(self, token):
        return self.ids[token]


def scaled_init_(model, seed=0):
    """Weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1): logits of order one, as in a trained model.
    (The 0.02 init makes every logit ~0, so item scores would be near-ties decided by rounding.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def build_world(sz, device="cpu", seed=0):
    """SIDs of sz['n_items'] random items (residual k-means + suffix, so all SIDs have one length),
    the trie, and a random GPT over the vocabulary."""
    emb = np.random.default_rng(seed).standard_normal((sz["n_items"], 64)).astype(np.float32)
    sids = quantize(emb, QuantizerConfig(levels=sz["levels"], codebook_size=sz["codes"], seed=seed),
                    verbose=False, item_ids=[f"m{i:04d}" for i in range(sz["n_items"])])
    vocab = Vocab(sz["n_bpe"], added_tokens(sids))
    trie, ctrl = SIDTrie.build(sids, vocab), Control.of(vocab)
    assert all(len(ids) == trie.depth for ids, _ in trie.items()), "equal-length SIDs"
    cfg = GPTConfig(vocab_size=vocab.size, block_size=256, n_layer=sz["n_layer"], n_embd=sz["n_embd"],
                    n_head=sz["n_head"], n_kv_head=sz["n_kv_head"])
    model = GPT(cfg)
    scaled_init_(model, seed)
    return SimpleNamespace(sids=sids, vocab=vocab, trie=trie, ctrl=ctrl, model=model.to(device), device=device)


def hf_twin(model):
    """transformers' LlamaForCausalLM with nanocrs' hyper-parameters and a copy of its weights."""
    from nanocrs.hf import hf_config_from
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = model.config
    d = {k: v for k, v in hf_config_from(cfg, "llama").items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**d, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    # explicit name map: ours are Hugging Face's minus the "model." prefix (the head has none)
    sd = {}
    for name, t in model.state_dict().items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            t = t[:cfg.vocab_size]  # our vocabulary padding rows (a speed detail) are not weights
        sd[name if name == "lm_head.weight" else "model." + name] = t.detach().clone()
    hf.load_state_dict(sd, strict=True)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "still tied"
    return hf.to(model.embed_tokens.weight.device)


@torch.no_grad()
def assert_same_logits(model, hf, vocab_size, T=48):
    device = model.embed_tokens.weight.device
    x = torch.randint(vocab_size, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    model.eval(), hf.eval()
    ours, theirs = model(x)[0].float(), hf(input_ids=x).logits.float()  # (2, T, V)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def interleaved(jobs, rounds):
    """jobs: {name: fn() -> units of work}. Each round runs every job once, the order reversed every
    other round, so that load from other processes falls on all of them alike. Median units/s."""
    rates = {k: [] for k in jobs}
    for r in range(rounds):
        for k in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            t0 = time.perf_counter()
            n = jobs[k]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rates[k].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


# -----------------------------------------------------------------------------
# 1. training throughput

def dialog_loss_mask(B, T, share, span=32, seed=4):
    """(B, T) bool, True where a position carries a loss: spans of `span` tokens, round(share x spans)
    of them supervised, chosen at random, the way a dialog alternates user turns (no loss) and
    assistant turns."""
    g = torch.Generator().manual_seed(seed)
    n = B * -(-T // span)
    spans = torch.zeros(n, dtype=torch.bool)
    spans[torch.randperm(n, generator=g)[:round(share * n)]] = True
    return spans.view(B, -1).repeat_interleave(span, dim=1)[:, :T]


def bench_train(w, hf, sz, compile_too, share):
    B, T, V = sz["batch"], sz["seq"], w.model.config.vocab_size
    xy = torch.randint(w.vocab.n_bpe, (B, T + 1), generator=torch.Generator().manual_seed(2)).to(w.device)
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T) each
    # the same batch with a dialog's loss mask: -1 for nanocrs, -100 for transformers, which shifts
    # its labels itself (labels[t] is the target of position t - 1)
    keep = dialog_loss_mask(B, T, share).to(w.device)
    keep[:, -1] = False  # transformers has no target for the last position
    y_dlg = torch.where(keep, y, -1)
    labels_dlg = torch.cat([torch.full_like(y[:, :1], -100), torch.where(keep, y, -100)[:, :-1]], 1)
    with torch.no_grad():  # the same loss, so the same work is asked of both
        torch.testing.assert_close(w.model(x, y_dlg)[1], hf(input_ids=x, labels=labels_dlg).loss, atol=1e-4, rtol=1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if w.device.startswith("cuda")
                else contextlib.nullcontext())

    def stepper(loss_of, model, steps=1):
        # the same optimizer for both: fused AdamW, nanocrs' (configure_optimizer) and transformers'
        # Trainer's default (optim="adamw_torch_fused")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def run():
            for _ in range(steps):
                with autocast:
                    loss = loss_of()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return steps * B * T
        run()  # warm-up (and, for the compiled model, the compilation)
        return run

    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (w.model, hf)]
    w.model.train(), hf.train()
    # nanocrs takes shifted targets, transformers shifts the labels itself: the same B x T logits
    jobs = {"nanocrs": stepper(lambda: w.model(x, y)[1], w.model),
            "transformers": stepper(lambda: hf(input_ids=x, labels=x).loss, hf),
            "nanocrs, dialog mask": stepper(lambda: w.model(x, y_dlg)[1], w.model),
            "transformers, dialog mask": stepper(lambda: hf(input_ids=x, labels=labels_dlg).loss, hf)}
    compile_s = None
    if compile_too:
        # nanocrs as train.py --compile does it (block by block, the row selection eager), against
        # transformers' model under torch.compile as a whole. Copies: compiling is in place.
        ours, theirs = copy.deepcopy(w.model), copy.deepcopy(hf)
        for block in ours.layers:
            block.compile()
        theirs_c = torch.compile(theirs)
        t0 = time.perf_counter()
        jobs["nanocrs compiled"] = stepper(lambda: ours(x, y)[1], ours)
        jobs["nanocrs compiled, dialog mask"] = stepper(lambda: ours(x, y_dlg)[1], ours)
        jobs["transformers compiled"] = stepper(lambda: theirs_c(input_ids=x, labels=x).loss, theirs)
        jobs["transformers compiled, dialog mask"] = stepper(lambda: theirs_c(input_ids=x, labels=labels_dlg).loss, theirs)
        compile_s = time.perf_counter() - t0
    rates = interleaved(jobs, sz["train_rounds"])
    for m, sd in zip((w.model, hf), before):  # the decoding comparison needs the twins equal again
        m.load_state_dict(sd)

    def ratio(a, b):
        return rates[a] / rates[b] if a in rates else None
    return dict(tokens_per_s=rates, batch=B, seq=T, compile_seconds=compile_s, supervised_share=float(keep.float().mean()),
                speedup=ratio("nanocrs", "transformers"),
                speedup_dialog=ratio("nanocrs, dialog mask", "transformers, dialog mask"),
                speedup_compiled=ratio("nanocrs compiled", "transformers compiled"),
                speedup_compiled_dialog=ratio("nanocrs compiled, dialog mask", "transformers compiled, dialog mask"))


# -----------------------------------------------------------------------------
# 2. decoding: beam search against transformers, constrained against free sampling

def make_prompts(w, n, length, seed=3):
    """Random text-token contexts that end with <BOI>, as the eval's do."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(w.vocab.n_bpe, (length - 1,), generator=g).tolist() + [w.ctrl.boi] for _ in range(n)]


@torch.no_grad()
def hf_beam(hf, w, prompt, width):
    """transformers' constrained beam search -> [(item, summed log-prob)], best first."""
    P, trie = len(prompt), w.trie

    def allowed(batch_id, ids):  # the trie children of the SID prefix generated so far
        node = trie.walk(ids[P:].tolist())
        kids = [t for t in node if t != SIDTrie.LEAF] if node is not None else []
        return kids or [w.ctrl.eoi]  # transformers refuses an empty list (a finished or dead beam)
    ids = torch.tensor([prompt], device=w.device)  # (1, P)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
                      do_sample=False, max_new_tokens=trie.depth, prefix_allowed_tokens_fn=allowed,
                      length_penalty=0.0, early_stopping=True, output_scores=True, return_dict_in_generate=True,
                      pad_token_id=w.ctrl.eot)
    order = torch.argsort(out.sequences_scores, descending=True, stable=True).tolist()
    return [(trie.walk(out.sequences[i, P:].tolist())[SIDTrie.LEAF], float(out.sequences_scores[i])) for i in order]


def compare_beams(w, hf, prompts, width=50, rounds=2):
    """Top-k lists of both implementations on every prompt, then (rounds > 0) their speeds."""
    w.model.eval(), hf.eval()
    identical, max_diff = True, 0.0
    for p in prompts:
        ours, theirs = beam_search(w.model, p, w.trie, w.ctrl, width), hf_beam(hf, w, p, width)
        identical &= [i for i, _ in ours] == [i for i, _ in theirs]
        max_diff = max(max_diff, max(abs(a[1] - b[1]) for a, b in zip(ours, theirs)))
    res = dict(identical=identical, max_score_diff=max_diff, width=width, prompts=len(prompts), prompt_len=len(prompts[0]))
    if rounds:
        def all_prompts(search):
            for p in prompts:
                search(p)
            return len(prompts)
        rates = interleaved({"nanocrs": lambda: all_prompts(lambda p: beam_search(w.model, p, w.trie, w.ctrl, width)),
                             "transformers": lambda: all_prompts(lambda p: hf_beam(hf, w, p, width))}, rounds)
        res.update(prompts_per_s=rates, speedup=rates["nanocrs"] / rates["transformers"])
    return res


def bench_sampling(w, prompts, max_new, rounds):
    """Decoding steps/s of generate.sample (4 rows, temperature 0.8, top-k 50) with the trie and
    without it. Steps, not tokens: rows that stop early (<EOT>) still ride along in the batch, and the
    free rows never close a span, so token counts differ while the cost per step is what we compare."""
    def run(constrained):
        kw = dict(n=4, max_new_tokens=max_new, temperature=0.8, top_k=50,
                  generator=torch.Generator(device=w.device).manual_seed(0))
        steps = 0
        for p in prompts:  # trie=None: the same loop with no constraint at all
            outs = sample(w.model, p, w.trie if constrained else None, w.ctrl, **kw)
            steps += max(len(o) for o in outs)  # the rows advance together: one forward per step
        return steps
    rates = interleaved({"constrained": lambda: run(True), "free": lambda: run(False)}, rounds)
    return dict(steps_per_s=rates, overhead=rates["free"] / rates["constrained"] - 1.0)


class StubLM:
    """Stands in for a model with a big vocabulary (a Qwen-sized head): every row's logits are one of
    a few fixed random rows, viewed, not copied, so a beam step's time is the decoder's own work."""

    def __init__(self, vocab_size, seed=0):
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=4096)
        self.norm = SimpleNamespace(weight=torch.zeros(1))  # where the decoders find the device
        self.rows = torch.randn(4, vocab_size, generator=torch.Generator().manual_seed(seed))

    def eval(self):
        return self

    def new_cache(self, batch_size, max_len, pad=None, prefix=None):
        cache = SimpleNamespace(pos=0, pad=pad)
        cache.reorder = lambda rows: None
        return cache

    def __call__(self, idx, cache=None, return_hidden=False):
        cache.pos += idx.shape[1]
        return self.rows[int(cache.pos) % 4].expand(idx.shape[0], idx.shape[1], -1), None


class TableSIDs:
    """Random SIDs of `levels` tokens over `codes` codes per level, in the interface SIDTrie.build reads."""

    def __init__(self, n_items, levels, codes, seed=0):
        g = np.random.default_rng(seed)
        ids = {tuple(g.integers(codes, size=levels)) for _ in range(3 * n_items)}
        self.codes = sorted(ids)[:n_items]
        self.item_ids = [f"m{i}" for i in range(len(self.codes))]
        self.levels, self.size = levels, codes

    def tokens(self, item):
        return [f"<{chr(97 + l)}_{c}>" for l, c in enumerate(self.codes[int(item[1:])])]

    def all_token_strings(self):
        return [f"<{chr(97 + l)}_{c}>" for l in range(self.levels) for c in range(self.size)]


def bench_beam_overhead(vocab_size=151_936, width=50, n_items=20_000, levels=3, codes=64, rounds=5):
    """Milliseconds per beam step of nanocrs.generate.beam_search around a model that costs nothing:
    the decoder's own work with a big vocabulary (the full-vocabulary log-softmax included)."""
    sids = TableSIDs(n_items, levels, codes)
    vocab = Vocab(vocab_size - len(CONTROL_TOKENS) - levels * codes, CONTROL_TOKENS + sids.all_token_strings())
    trie, ctrl = SIDTrie.build(sids, vocab), Control.of(vocab)
    model = StubLM(vocab.size)
    prompt = [5, 6, 7, ctrl.boi]
    beam_search(model, prompt, trie, ctrl, width)  # warm-up; builds the trie's tables
    secs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        beam_search(model, prompt, trie, ctrl, width)
        secs.append(time.perf_counter() - t0)
    return dict(ms_per_step=1000 * statistics.median(secs) / trie.depth, vocab=vocab.size, width=width,
                items=len(sids.item_ids), sid_length=trie.depth)


# -----------------------------------------------------------------------------
# 3. quantizer scale (each size in a fresh process, so peak RSS is that run's alone)

def quantizer_child(n, points, threads):
    if threads:
        torch.set_num_threads(threads)
    x = np.random.default_rng(0).standard_normal((n, 384), dtype=np.float32)  # (N, 384)
    t0 = time.perf_counter()
    sids = quantize(x, QuantizerConfig(levels=3, codebook_size=256, kmeans_iters=50, max_points_per_centroid=points),
                    verbose=False)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_rss_mb": peak_rss_mb(), "id_length": len(sids.level_sizes),
                      "points_per_centroid": points, "mse": sids.report["mse"]}))


def bench_quantizer(runs, threads):
    """runs: [(N, max points per centroid)]. The residual MSE shows what fitting on a sample costs."""
    res = {}
    for n, points in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--quantizer-child", str(n), str(points),
               "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[(n, points)] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


# -----------------------------------------------------------------------------
# 4. evaluation throughput

def bench_eval(sz, device, threads):
    import data_prep
    import train
    from nanocrs.data import load_dataset
    from nanocrs.evaluate import evaluate
    from nanocrs.session import Session
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        data, ckpt = os.path.join(tmp, "data"), os.path.join(tmp, "ckpt")
        data_prep.main(["--dataset", "synthetic", "--out", data] + sz["data_args"])
        train.main(["--data", data, "--out", ckpt, "--max-steps", "2", "--n-layer", str(sz["n_layer"]),
                    "--n-embd", str(sz["n_embd"]), "--n-head", str(sz["n_head"]), "--n-kv-head", str(sz["n_kv_head"]),
                    "--batch-size", "8", "--eval-interval", "0", "--device", device, "--threads", str(threads)])
        s = Session(ckpt, device)
        ds = load_dataset(data)
        lists, n = {}, {}

        def run(batch):
            path = os.path.join(tmp, f"rankings{batch}.jsonl")
            n[batch] = evaluate(s, ds, "test", beam=50, max_gen=0, batch=batch, rankings=path)["n_samples"]
            lists[batch] = [[i for i, _ in json.loads(line)["top"]] for line in open(path)]
            return n[batch]
        # one prompt at a time (as before batching) against batches of 8 (the default)
        rates = interleaved({1: lambda: run(1), 8: lambda: run(8)}, 2)
    return dict(samples=n[8], samples_per_s=rates, speedup=rates[8] / rates[1], identical=lists[1] == lists[8])


# -----------------------------------------------------------------------------
# 5. load memory: peak RSS of loading a sharded ~1B checkpoint, against its size on disk

def write_random_llama(folder, n_params, dtype, n_shards=4):
    """A random Llama in Hugging Face layout (n_shards safetensors + index, config.json, a one-token
    tokenizer.json), written one shard at a time: never the whole model in memory. -> parameter count"""
    from nanocrs.hf import hf_config_from
    from tokenizers import Tokenizer as HFTokenizer, models
    # 16 layers, head_dim 64, 4 query heads per kv head, SwiGLU 2.75x, 32k vocabulary, untied:
    # params = 16 * 10.75 H^2 + 2 * 32000 H, solved for the width H, rounded to a multiple of 256
    V, L, a = 32000, 16, 16 * 10.75
    H = 256 * max(1, round((math.sqrt(4 * V * V + 4 * a * n_params) - 2 * V) / (2 * a) / 256))
    cfg = GPTConfig(vocab_size=V, pad_vocab_to=1, block_size=2048, n_layer=L, n_embd=H, n_head=H // 64,
                    n_kv_head=H // 256, intermediate_size=256 * round(2.75 * H / 256), tie_embeddings=False)
    with torch.device("meta"):  # names and shapes only; ours are Hugging Face's minus "model." (not the head)
        shapes = [(n if n == "lm_head.weight" else "model." + n, p.shape) for n, p in GPT(cfg).named_parameters()]
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(math.prod(s) for _, s in shapes) * elem
    groups, done = [[] for _ in range(n_shards)], 0  # tensors -> shards by their byte offset, in order
    for name, shape in shapes:
        groups[min(n_shards - 1, n_shards * done // total)].append((name, shape))
        done += math.prod(shape) * elem
    groups = [group for group in groups if group]  # a tensor bigger than a shard leaves one empty
    g, weight_map = torch.Generator().manual_seed(0), {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (0.02 * torch.randn(shape, generator=g)).to(dtype) for name, shape in group}
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(os.path.join(folder, "tokenizer.json"))
    hf = hf_config_from(cfg, "llama")
    hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return total // elem


def peak_rss_mb():
    """This process's peak RSS. Not getrusage's ru_maxrss: on Linux that includes the high-water mark of
    the parent a process was spawned from (folded in at exec), so a small child of a big parent reads big."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB -> MB


def load_child(which, folder, dtype):
    """One fresh process: which = nanocrs or transformers (load, read every weight), or + "-imports"."""
    if which.startswith("transformers"):
        import transformers
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 (the model code is an import)
        transformers.logging.set_verbosity_error()
    else:
        from nanocrs.hf import load_hf
    t0 = time.perf_counter()
    if not which.endswith("-imports"):
        if which == "nanocrs":
            model = load_hf(folder, dtype=DTYPES[dtype])[0]
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
        with torch.no_grad():  # a memory-mapped weight takes RAM only once read: read them all
            sum(float(p.sum()) for p in model.parameters())
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_rss_mb": peak_rss_mb()}))


def bench_load_memory(n_params, dtype, threads):
    def child(which):
        cmd = [sys.executable, os.path.abspath(__file__), "--load-child", which, folder, dtype, "--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        return json.loads(out.stdout.strip().splitlines()[-1])

    folder = tempfile.mkdtemp(prefix="nanocrs-load-")  # on disk (TMPDIR), not in RAM
    try:
        n = write_random_llama(folder, n_params, DTYPES[dtype])
        shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        disk_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in shards) / 2**20
        res = dict(params=n, dtype=dtype, shards=len(shards), disk_mb=disk_mb)
        for which in ("nanocrs", "transformers"):
            base, peak = child(which + "-imports"), child(which)
            net = peak["peak_rss_mb"] - base["peak_rss_mb"]
            res[which] = dict(peak_rss_mb=peak["peak_rss_mb"], imports_rss_mb=base["peak_rss_mb"], net_rss_mb=net,
                              ratio_to_disk=net / disk_mb, seconds=peak["seconds"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return res


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    device = init_device(args.device, args.threads)
    if args.quantizer_child:
        return quantizer_child(*args.quantizer_child, args.threads)
    if args.load_child:
        return load_child(*args.load_child)
    sz = QUICK if args.quick else FULL
    sections = {"load"} if args.load_memory else set(args.sections.split(","))
    unknown = sections - {"train", "decode", "quantizer", "eval", "load"}
    if unknown:
        raise ValueError(f"--sections: unknown {sorted(unknown)} (use train, decode, quantizer, eval, load)")
    threads = torch.get_num_threads()
    rows = []  # (benchmark, figure, target)

    def add(name, result, target=""):
        rows.append((name, result, target))
        print(f"{name}: {result}", flush=True)  # progress; the table comes at the end

    fig = dict(train_speedup=None, train_speedup_dialog=None, train_speedup_compiled=None,
               train_speedup_compiled_dialog=None, beam_speedup=None, beam_identical=None,
               constrained_overhead=None, rqkmeans_1m_seconds=None, rqkmeans_1m_peak_rss_mb=None,
               eval_samples_per_s=None, load_memory=None, quick=args.quick, device=device, threads=threads,
               torch=torch.__version__, python=platform.python_version())
    if sections & {"train", "decode"}:
        import transformers
        transformers.logging.set_verbosity_error()
        fig["transformers"] = transformers.__version__
        w = build_world(sz, device)
        hf = hf_twin(w.model)
        assert_same_logits(w.model, hf, w.vocab.size)
        fig["model"] = dict(params=w.model.num_params(), vocab=w.vocab.size, items=len(w.sids), sid_length=w.trie.depth,
                            **{k: sz[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head")})
        print(f"model: {w.model.num_params() / 1e6:.2f}M params, vocab {w.vocab.size}, {len(w.sids)} items, "
              f"SID length {w.trie.depth}; logits equal transformers'; {device}, {threads} threads", flush=True)
    if "train" in sections:
        r = bench_train(w, hf, sz, args.compile, args.supervised_share)
        fig.update(train=r, train_speedup=r["speedup"], train_speedup_dialog=r["speedup_dialog"],
                   train_speedup_compiled=r["speedup_compiled"], train_speedup_compiled_dialog=r["speedup_compiled_dialog"])
        tps = r["tokens_per_s"]
        add(f"train step, batch {r['batch']}x{r['seq']}, loss on every token: tokens/s nanocrs / transformers",
            f"{tps['nanocrs']:.0f} / {tps['transformers']:.0f} = {r['speedup']:.2f}x", ">= 1.2x")
        add(f"  the same batch, loss on {r['supervised_share']:.0%} of tokens (a dialog's assistant turns)",
            f"{tps['nanocrs, dialog mask']:.0f} / {tps['transformers, dialog mask']:.0f} = {r['speedup_dialog']:.2f}x", ">= 1.2x")
        if args.compile:
            add(f"  both under torch.compile (compiled in {r['compile_seconds']:.0f} s), loss on every token",
                f"{tps['nanocrs compiled']:.0f} / {tps['transformers compiled']:.0f} = {r['speedup_compiled']:.2f}x", ">= 1.2x")
            add(f"  both under torch.compile, loss on {r['supervised_share']:.0%} of tokens",
                f"{tps['nanocrs compiled, dialog mask']:.0f} / {tps['transformers compiled, dialog mask']:.0f} = "
                f"{r['speedup_compiled_dialog']:.2f}x", ">= 1.2x")
    if "decode" in sections:
        prompts = make_prompts(w, sz["n_prompts"], sz["prompt_len"])
        fig["decode"] = {}
        for n in [int(x) for x in args.decode_threads.split(",")]:
            torch.set_num_threads(n)
            r = compare_beams(w, hf, prompts, 50, sz["beam_rounds"])
            pps = r["prompts_per_s"]
            add(f"[{n} thread{'s' if n > 1 else ''}] beam search w50, {r['prompts']} prompts x {r['prompt_len']} tok: "
                "prompts/s nanocrs / transformers",
                f"{pps['nanocrs']:.1f} / {pps['transformers']:.1f} = {r['speedup']:.1f}x", ">= 10x")
            add("  top-50 item lists identical (max |score diff|)", f"{r['identical']} ({r['max_score_diff']:.1e})", "True")
            rs = bench_sampling(w, prompts, sz["sample_tokens"], sz["sample_rounds"])
            t = rs["steps_per_s"]
            add("  sampling n=4, decoding steps/s: trie-constrained / free",
                f"{t['constrained']:.0f} / {t['free']:.0f}: overhead {rs['overhead']:+.1%}", "<= 5%")
            fig["decode"][n] = dict(beam=r, sampling=rs)
            # the headline figures: the last thread count of the list
            fig.update(beam=r, beam_speedup=r["speedup"], beam_identical=r["identical"], sampling=rs,
                       constrained_overhead=rs["overhead"])
        torch.set_num_threads(threads)
        r = fig["beam_overhead"] = bench_beam_overhead(rounds=3 if args.quick else 5)
        add(f"beam search w{r['width']}, vocabulary {r['vocab']:,}, {r['items']:,} items, no model: ms per step",
            f"{r['ms_per_step']:.1f} ms", "")
    if "quantizer" in sections:
        runs = [(n, args.kmeans_points) for n in sz["quant_sizes"]]
        if not args.quick and args.kmeans_points:  # what the sample costs: 100k fitted on every point
            runs.insert(2, (100_000, 0))
        r = bench_quantizer(runs, args.threads)
        fig["rqkmeans"] = {f"{n}/{p}": v for (n, p), v in r.items()}
        for (n, p), v in r.items():
            fit = f"fit on {min(n, 256 * p):,}" if p else "fit on all"
            add(f"RQ-KMeans 3x256 + suffix, {n:,} x 384, {fit}",
                f"{v['seconds']:.1f} s, peak RSS {v['peak_rss_mb']:.0f} MB, residual MSE {v['mse'][-1]:.1f}",
                "<= 300 s, <= 4096 MB" if n == 1_000_000 else "")
        if (1_000_000, args.kmeans_points) in r:
            v = r[(1_000_000, args.kmeans_points)]
            fig.update(rqkmeans_1m_seconds=v["seconds"], rqkmeans_1m_peak_rss_mb=v["peak_rss_mb"])
    if "eval" in sections:
        r = bench_eval(sz, device, args.threads)
        fig.update(eval=r, eval_samples_per_s=r["samples_per_s"][8])
        sps = r["samples_per_s"]
        add(f"eval (nanocrs.evaluate, beam 50, no generation), {r['samples']} rec samples: samples/s batch 8 / 1",
            f"{sps[8]:.1f} / {sps[1]:.1f} = {r['speedup']:.1f}x", "")
        add("  rankings identical", f"{r['identical']}", "True")
    if "load" in sections:
        r = fig["load_memory"] = bench_load_memory(args.load_params, args.load_dtype, args.threads)
        add(f"load a {r['params'] / 1e9:.2f}B {r['dtype']} checkpoint ({r['shards']} shards): size on disk",
            f"{r['disk_mb']:.0f} MB")
        for name, label in (("nanocrs", "nanocrs load_hf"), ("transformers", "transformers from_pretrained + read")):
            m = r[name]
            add(f"  {label}: peak RSS - imports (raw peak)",
                f"{m['net_rss_mb']:.0f} MB ({m['peak_rss_mb']:.0f}): {m['ratio_to_disk']:.2f}x disk",
                "<= 1.3x" if name == "nanocrs" else "")
    width = max(len(r[0]) for r in rows) if rows else 0
    print(f"\n{'benchmark':<{width}}  {'result':<34} target")
    for name, result, target in rows:
        print(f"{name:<{width}}  {result:<34} {target}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)
        print(f"wrote {args.json}")
    return fig


if __name__ == "__main__":
    run_script(main)
