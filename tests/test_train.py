"""
Tests for train.py and nanocrs/checkpoint.py: save/load gives identical logits, --resume continues the
exact loss sequence, and broken checkpoint folders raise CheckpointError naming the problem.

    python -m pytest tests/test_train.py -q
"""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN_ARGS, run_train
from nanocrs import checkpoint
from nanocrs.checkpoint import CheckpointError
from nanocrs.model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(ckpt):
    with open(os.path.join(ckpt, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def probe(vocab_size, n=3, T=17):
    return torch.randint(0, vocab_size, (n, T), generator=torch.Generator().manual_seed(0))


def test_trained_checkpoint_folder(trained_ckpt):
    cfg = json.load(open(os.path.join(trained_ckpt, "config.json")))
    assert cfg["files"] == {"model": "model-000006.safetensors", "optimizer": "optimizer-000006.safetensors"}
    for f in checkpoint.REQUIRED + tuple(cfg["files"].values()) + ("log.jsonl",):
        assert os.path.isfile(os.path.join(trained_ckpt, f)), f
    # the step-3 save was replaced as a whole: no older tensors, no temporaries
    assert sorted(f for f in os.listdir(trained_ckpt) if f.endswith(".safetensors")) == sorted(cfg["files"].values())
    assert not [f for f in os.listdir(trained_ckpt) if f.endswith(".tmp")]
    assert cfg["step"] == 6 and cfg["model"]["n_layer"] == 2 and cfg["model"]["n_embd"] == 64
    log = read_log(trained_ckpt)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert [r["step"] for r in log if "val_loss" in r] == [3, 6]


@torch.no_grad()
def test_checkpoint_round_trip_identical_logits(trained_ckpt, tmp_path):
    m1, cfg1, tok, sids = checkpoint.load(trained_ckpt)
    m2, *_ = checkpoint.load(trained_ckpt)
    m1.eval(), m2.eval()
    x = probe(m1.config.vocab_size)
    l1, l2 = m1(x)[0], m2(x)[0]
    assert torch.equal(l1, l2)
    # the weights are the file's, bit for bit
    sd = load_file(os.path.join(trained_ckpt, cfg1["files"]["model"]))
    assert torch.equal(m1.embed_tokens.weight, sd["embed_tokens.weight"])
    assert m1.lm_head.weight.data_ptr() == m1.embed_tokens.weight.data_ptr()  # still tied after loading
    # and not a fresh initialisation: a new model with the same config gives different logits
    torch.manual_seed(123)
    assert not torch.allclose(GPT(m1.config).eval()(x)[0], l1)

    # save the loaded model again (what a resumed run does) and load it: same logits
    out = str(tmp_path / "again")
    checkpoint.save_static(out, tok, sids, os.path.join(trained_ckpt, "items.jsonl"))
    checkpoint.save(out, m1, {**cfg1, "step": 7})
    m3, cfg3, _, _ = checkpoint.load(out)
    assert cfg3["step"] == 7
    assert torch.equal(m3.eval()(x)[0], l1)


@pytest.mark.parametrize("extra", [dict(tie_embeddings=False, qkv_bias=True, qk_norm=True, head_dim=24),
                                   dict(tie_embeddings=True)])
@torch.no_grad()
def test_in_memory_model_save_load(trained_ckpt, tmp_path, extra):
    _, cfg, tok, sids = checkpoint.load(trained_ckpt)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tok), n_layer=2, n_embd=48, n_head=4, n_kv_head=2, **extra)).eval()
    for p in model.parameters():  # make every weight (biases and norms too) distinctive
        p.add_(0.05 * torch.randn_like(p))
    out = str(tmp_path / "ck")
    checkpoint.save_static(out, tok, sids, os.path.join(trained_ckpt, "items.jsonl"))
    checkpoint.save(out, model, {"model": model.config.to_dict(), "step": 1})
    loaded, config, _, _ = checkpoint.load(out)
    x = probe(len(tok))
    assert torch.equal(loaded.eval()(x)[0], model(x)[0])
    assert loaded.config == model.config
    if not extra["tie_embeddings"]:
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
        assert loaded.lm_head.weight.data_ptr() != loaded.embed_tokens.weight.data_ptr()


def test_resume_continues_the_same_losses(dataset_dir, trained_ckpt, tmp_path):
    b = str(tmp_path / "B")
    run_train(dataset_dir, b, ["--max-steps", "3"])
    assert json.load(open(os.path.join(b, "config.json")))["step"] == 3
    run_train(dataset_dir, b, ["--max-steps", "6", "--resume"])
    log_a, log_b = read_log(trained_ckpt), read_log(b)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(log_a, log_b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6, (ra, rb)
        assert ra["lr"] == rb["lr"]
        if "val_loss" in ra:
            assert abs(ra["val_loss"] - rb["val_loss"]) <= 1e-6
    # the losses do move (so equality is not trivial), and the final weights agree too
    assert len({r["loss"] for r in log_a[3:]}) == 3
    ma, *_ = checkpoint.load(trained_ckpt)
    mb, *_ = checkpoint.load(b)
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and torch.allclose(pa, pb, atol=1e-6), na
    # a resume past --max-steps does nothing and appends nothing
    run_train(dataset_dir, b, ["--max-steps", "6", "--resume"])
    assert len(read_log(b)) == 6


def test_turn_format_trains(dataset_dir, tmp_path):
    out = run_train(dataset_dir, str(tmp_path / "T"), ["--max-steps", "2", "--format", "turn", "--eval-interval", "0"])
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2] and all("val_loss" not in r for r in log)
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)


@pytest.fixture
def ckpt_copy(trained_ckpt, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(trained_ckpt, dst)
    return dst


@pytest.mark.parametrize("missing", ["model-000006.safetensors", "config.json", "tokenizer.json", "sids.json"])
def test_load_missing_file(ckpt_copy, missing):
    os.remove(os.path.join(ckpt_copy, missing))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(ckpt_copy)
    assert missing in str(e.value) and ckpt_copy in str(e.value)


def test_load_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(str(tmp_path / "nope"))


def test_inconsistent_step_metadata(ckpt_copy):
    path = os.path.join(ckpt_copy, "config.json")
    cfg = json.load(open(path))
    cfg["step"] = 5
    json.dump(cfg, open(path, "w"))
    with pytest.raises(CheckpointError, match="step"):
        checkpoint.load(ckpt_copy)


def test_optimizer_step_mismatch(ckpt_copy):
    model, cfg, _, _ = checkpoint.load(ckpt_copy)
    opt = model.configure_optimizer(1e-3, 0.1)
    checkpoint.load_optimizer(opt, ckpt_copy, cfg["step"])  # consistent: fine
    assert len(opt.state) > 0
    with pytest.raises(CheckpointError, match="optimizer"):
        checkpoint.load_optimizer(opt, ckpt_copy, cfg["step"] - 1)
    os.remove(os.path.join(ckpt_copy, "optimizer-000006.safetensors"))
    with pytest.raises(CheckpointError, match="optimizer-000006.safetensors"):
        checkpoint.load_optimizer(opt, ckpt_copy, cfg["step"])


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["model", "optimizer", "commit"])
def test_crash_while_saving_keeps_the_last_checkpoint(ckpt_copy, monkeypatch, where):
    """A save that dies half way (while writing the weights, the optimizer state, or just before the
    config.json rename) leaves the folder loading as the previous step, bit for bit, and resumable;
    the next save that completes removes what the crashed one left behind."""
    model, cfg, _, _ = checkpoint.load(ckpt_copy)
    opt = model.configure_optimizer(1e-3, 0.1)
    checkpoint.load_optimizer(opt, ckpt_copy, 6)
    x = probe(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        before = model(x)[0]
        for p in model.parameters():
            p.add_(0.01)  # "step 7" weights differ from step 6
    real_save_file, real_commit = checkpoint.save_file, checkpoint._commit

    def dying_save_file(tensors, path, metadata=None):
        if os.path.basename(path).startswith(where):
            with open(path, "wb") as f:
                f.write(b"half a file")  # torn write of the temporary
            raise Crash
        real_save_file(tensors, path, metadata=metadata)

    def dying_commit(out_dir, config):
        if where == "commit":
            raise Crash
        real_commit(out_dir, config)

    monkeypatch.setattr(checkpoint, "save_file", dying_save_file)
    monkeypatch.setattr(checkpoint, "_commit", dying_commit)
    with pytest.raises(Crash):
        checkpoint.save(ckpt_copy, model, {**cfg, "step": 7}, opt)
    monkeypatch.undo()

    m6, cfg6, _, _ = checkpoint.load(ckpt_copy)  # still step 6, every file consistent
    assert cfg6["step"] == 6
    m6.eval()
    with torch.no_grad():
        assert torch.equal(m6(x)[0], before)
    checkpoint.load_optimizer(m6.configure_optimizer(1e-3, 0.1), ckpt_copy, 6)

    checkpoint.save(ckpt_copy, model, {**cfg, "step": 7}, opt)  # a save that completes
    tensors = sorted(f for f in os.listdir(ckpt_copy) if ".safetensors" in f)
    assert tensors == ["model-000007.safetensors", "optimizer-000007.safetensors"]
    m7, cfg7, _, _ = checkpoint.load(ckpt_copy)
    m7.eval()
    with torch.no_grad():
        assert cfg7["step"] == 7 and torch.equal(m7(x)[0], model(x)[0])


def test_invalid_config_json(ckpt_copy):
    with open(os.path.join(ckpt_copy, "config.json"), "w") as f:
        f.write("{\"model\": ")
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoint.load(ckpt_copy)


# -----------------------------------------------------------------------------
# one global batch, three ways: plain, gradient accumulation, two DDP processes


def _losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_gradient_accumulation_matches_one_big_batch(dataset_dir, tmp_path):
    run_train(dataset_dir, str(tmp_path / "big"), ["--max-steps", "4", "--batch-size", "8", "--grad-accum", "1"])
    run_train(dataset_dir, str(tmp_path / "acc"), ["--max-steps", "4", "--batch-size", "2", "--grad-accum", "4"])
    big, acc = _losses(tmp_path / "big"), _losses(tmp_path / "acc")
    assert len(big) == len(acc) == 4
    assert big[0] > big[-1]  # it trains at all
    for b, a in zip(big, acc):
        assert abs(b - a) < 1e-4, (big, acc)


def test_compile_matches_eager(dataset_dir, trained_ckpt, tmp_path):
    # train.py --compile (each block under torch.compile, inductor's C++ kernels on the CPU) gives the
    # eager run's losses, up to the order of float sums in fused kernels (the 4 steps sit inside the
    # 30-step warmup, so the 6-step eager run had the same learning rates)
    import torch._dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from nanocrs.model import Block
    torch._dynamo.reset()
    out = run_train(dataset_dir, str(tmp_path / "C"), ["--max-steps", "4", "--compile"])
    # compiled variants of Block.forward (training and no_grad eval, x all rows and the last block's
    # supervised rows; shapes dynamic from the start): well under the recompile limit, past which
    # Dynamo would silently run the block eagerly (bf16 + --grad-checkpoint also gives 4)
    n_variants = len(_debug_get_cache_entry_list(Block.forward.__code__))
    assert n_variants <= 4 < torch._dynamo.config.recompile_limit, n_variants
    eager, compiled = _losses(trained_ckpt)[:4], _losses(out)
    assert len(compiled) == 4 and compiled[0] > compiled[-1]
    for e, c in zip(eager, compiled):
        assert abs(e - c) < 1e-3, (eager, compiled)


def test_ddp_two_cpu_processes_match_one_process(dataset_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_train(dataset_dir, str(tmp_path / "one"), ["--max-steps", "4", "--batch-size", "8"])
    args = [a for a in TRAIN_ARGS] + ["--data", dataset_dir, "--out", str(tmp_path / "two"),
                                      "--max-steps", "4", "--batch-size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(REPO, "train.py")] + args
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-4, (one, two)


def test_resume_with_dropout_continues_the_same_losses(dataset_dir, tmp_path):
    # dropout masks come from (seed, step, rank), so they survive a restart too
    extra = ["--dropout", "0.1", "--save-interval", "2"]
    run_train(dataset_dir, str(tmp_path / "a"), extra + ["--max-steps", "4"])
    run_train(dataset_dir, str(tmp_path / "b"), extra + ["--max-steps", "2"])
    run_train(dataset_dir, str(tmp_path / "b"), extra + ["--max-steps", "4", "--resume"])
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 4
    assert a == b


def test_fresh_run_refuses_to_overwrite_a_checkpoint(dataset_dir, tmp_path):
    run_train(dataset_dir, str(tmp_path / "c"), ["--max-steps", "1"])
    with pytest.raises(CheckpointError, match="--resume"):
        run_train(dataset_dir, str(tmp_path / "c"), ["--max-steps", "1"])


def test_item_loss_weight(dataset_dir, tmp_path):
    # the weighted path (per-token losses) is the plain one when the weight is (almost) 1, and a weight
    # on the semantic-ID tokens changes training; it also holds with gradient accumulation
    run_train(dataset_dir, str(tmp_path / "one"), ["--max-steps", "3", "--eval-interval", "0"])
    run_train(dataset_dir, str(tmp_path / "near"), ["--max-steps", "3", "--eval-interval", "0", "--item-loss-weight", "1.000001"])
    run_train(dataset_dir, str(tmp_path / "five"), ["--max-steps", "3", "--eval-interval", "0", "--item-loss-weight", "5",
                                                     "--batch-size", "4", "--grad-accum", "2"])
    run_train(dataset_dir, str(tmp_path / "five1"), ["--max-steps", "3", "--eval-interval", "0", "--item-loss-weight", "5"])
    one, near, five, five1 = (_losses(tmp_path / n) for n in ("one", "near", "five", "five1"))
    for a, b in zip(one, near):
        assert abs(a - b) < 1e-4, (one, near)
    for a, b in zip(five, five1):
        assert abs(a - b) < 1e-4, (five, five1)
    assert abs(five1[0] - one[0]) > 1e-3  # the ID tokens' share of the loss moved


def _with_item_sequences(dataset_dir, out, n=40):
    """A copy of the tiny dataset whose train split also has n items-only dialogs of 4 invented picks."""
    shutil.copytree(dataset_dir, out)
    items = [json.loads(line)["id"] for line in open(os.path.join(out, "items.jsonl"))]
    rng = random.Random(0)
    with open(os.path.join(out, "train.jsonl"), "a") as f:
        for k in range(n):
            turns = [{"role": "user" if j == 0 else "assistant", "text": "@{" + m + "}", "items": [m]}
                     for j, m in enumerate(rng.sample(items, 4))]
            f.write(json.dumps({"id": f"seq-{k}", "items_only": True, "turns": turns}) + "\n")
    return out


def test_shuffled_item_sequences(dataset_dir, tmp_path):
    import train
    from nanocrs.data import Renderer, load_dataset
    from nanocrs.quantizer import SemanticIDs
    from nanocrs.tokenizer import Tokenizer
    data = _with_item_sequences(dataset_dir, str(tmp_path / "seq"))
    # each epoch deals the items-only dialogs anew: same example count and lengths, other orders,
    # the text dialogs untouched, and a pure function of (seed, epoch)
    a = train.get_args(["--data", data, "--shuffle-item-sequences", "1", "--seed", "3"])
    rd = Renderer(Tokenizer.load(os.path.join(data, "tokenizer.json")), SemanticIDs.load(os.path.join(data, "sids.json")), 256)
    examples_at, _ = train.build_data(a, load_dataset(data), rd)
    e0, e1 = examples_at(0), examples_at(1)
    assert e0 == examples_at(0) and e0 != e1
    assert sorted(len(x) for x, _ in e0) == sorted(len(x) for x, _ in e1)
    changed = [k for k, (x, y) in enumerate(zip(e0, e1)) if x != y]
    assert changed and min(changed) >= len(e0) - 40  # only the 40 items-only sequences move
    assert all(sorted(e0[k][0]) == sorted(e1[k][0]) for k in changed)  # same items, other order
    # training with it resumes exactly across an epoch boundary (4 batches of 64 per epoch with the
    # first item of each turn as its only slot target)
    extra = ["--shuffle-item-sequences", "1", "--batch-size", "64", "--eval-interval", "0", "--slot-items", "first"]
    run_train(data, str(tmp_path / "a"), extra)
    run_train(data, str(tmp_path / "b"), extra + ["--max-steps", "3"])
    run_train(data, str(tmp_path / "b"), extra + ["--max-steps", "6", "--resume"])
    run_train(data, str(tmp_path / "c"), ["--batch-size", "64", "--eval-interval", "0", "--slot-items", "first"])
    la, lb, lc = (_losses(tmp_path / n) for n in ("a", "b", "c"))
    assert la == lb and len(la) == 6
    assert la != lc  # the reordering reached the batches


@pytest.mark.parametrize("target", ["sid", "mode-resp", "resp"])
def test_table_4_targets_train_and_rank(dataset_dir, tmp_path, target):
    """Each training target trains, resumes with its target, and is ranked: sid from the slot as usual;
    mode-resp and resp from the first <BOI> the model writes (every sample still gets a full beam list)."""
    from conftest import run_cli
    out = run_train(dataset_dir, str(tmp_path / target), ["--target", target, "--max-steps", "3"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["train"]["target"] == target
    rk = str(tmp_path / "rank.jsonl")
    p = run_cli("sample.py", "--ckpt", out, "--eval", "test", "--max-samples", "3", "--max-gen", "2", "--beam", "10",
                "--rankings", rk, "--threads", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in open(rk)]
    assert rows and all(len(r["top"]) == 10 for r in rows)
    p = run_cli("train.py", "--data", dataset_dir, "--out", out, "--resume", "--target", "full", "--threads", "1")
    assert p.returncode != 0 and "--target full" in p.stderr  # the weights were trained for another target
