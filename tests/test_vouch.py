"""
Files that vouch for themselves (issue 31): decoding knobs, config.json, calibration.json and npz values
checked where they come in; a checkpoint checks its own parts; train.py writes only into folders it made;
leftovers of a failed or killed run are cleaned; one training per --out; runs/table.py refuses what it
can not average; catalogue text never drives the terminal. Every refusal is one line, exit code 1 or 2,
and leaves every file that was there unchanged.

    python -m pytest tests/test_vouch.py -q
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ENV, REPO, TRAIN_ARGS, run_train
from conftest import run_cli as run


def hashes(*folders) -> dict:
    """path -> sha256 of every file under the folders: what a refusal must leave as it was."""
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    out[os.path.join(root, f)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def refused(main, argv, capsys, code=1, *words):
    """Run a script's main in this process as its __main__ does; assert one line on stderr naming the
    words, and the exit code. Returns the line."""
    from nanocrs.common import run_script
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_script(lambda: main(argv))
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == code, (e.value.code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    return err[0]


@pytest.fixture
def ck(trained_ckpt, tmp_path):
    """A copy of the tiny checkpoint to damage."""
    d = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, d)
    return d


@pytest.fixture(scope="module")
def assoc_ckpt(dataset_dir, tmp_path_factory):
    """A tiny checkpoint with a copy head, an association head and turn buckets (all three knobs apply)."""
    out = str(tmp_path_factory.mktemp("assoc") / "A")
    return run_train(dataset_dir, out, ["--heads", "pointer=16,assoc=1,copy-turns=1", "--max-steps", "2",
                                        "--save-interval", "2"])


# -----------------------------------------------------------------------------
# non-finite decoding values give one line, not silent zeros

def test_non_finite_knobs_are_refused(assoc_ckpt, tmp_path, capsys):
    import sample as sample_py
    before = hashes(assoc_ckpt)
    out = str(tmp_path / "e.json")
    base = ["--ckpt", assoc_ckpt, "--eval", "test", "--json", out, "--threads", "1", "--max-gen", "0"]
    for knob in ("copy=nan", "copy=inf", "just-named=nan", "text=nan", "text=inf", "text=-1", "threshold=2"):
        refused(sample_py.main, base + ["--knob", knob], capsys, 2, f"--knob {knob}")
    cal = os.path.join(assoc_ckpt, "calibration.json")
    for saved, key in (({"copy_bias": float("nan")}, "copy_bias"), ({"just_named_bias": float("inf")}, "just_named_bias"),
                       ({"text_prior": float("nan")}, "text_prior"), ({"rec_threshold": 5}, "rec_threshold"),
                       ({"rec_threshold": -1}, "rec_threshold"), ({"rec_threshold": float("nan")}, "rec_threshold"),
                       ({"copy_bias": "1.0"}, "copy_bias")):
        with open(cal, "w") as f:
            json.dump(saved, f)  # writes NaN and Infinity as Python's json does
        refused(sample_py.main, base, capsys, 1, cal, key)
    os.remove(cal)
    # the text prior's vectors: one NaN, or a damaged file
    from nanocrs.heads import TEXT_PRIOR_FILE
    from nanocrs.session import Knobs, Session
    s = Session(assoc_ckpt, "cpu")
    npz = os.path.join(assoc_ckpt, TEXT_PRIOR_FILE)
    vecs = np.ones((len(s.trie.item_ids), 4), dtype=np.float32)
    vecs[3, 1] = np.nan
    np.savez(npz, items=vecs, encoder=np.array("minilm"))
    with pytest.raises(ValueError, match="items must be finite"):
        s.use(Knobs(text_prior=2.0))
    with open(npz, "wb") as f:
        f.write(b"PK\x03\x04 not a zip")
    refused(sample_py.main, base + ["--knob", "text=2"], capsys, 1, npz, "not a readable text-prior file")
    os.remove(npz)
    assert not os.path.exists(out) and hashes(assoc_ckpt) == before


# -----------------------------------------------------------------------------
# a checkpoint checks its own files

def swap_sids(path):
    """The same items and the same tokens, dealt to other items: loads without any other error."""
    t = json.load(open(path))
    t["item_ids"] = t["item_ids"][1:] + t["item_ids"][:1]
    json.dump(t, open(path, "w"))


def swap_tokens(path):
    """A tokenizer of the same size whose two BPE tokens trade ids: garbage text, no error."""
    t = json.load(open(path))
    vocab = t["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if 100 <= v < 102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(t, open(path, "w"))


def rotate_titles(path):
    rows = [json.loads(l) for l in open(path)]
    titles = [r["title"] for r in rows]
    for r, t in zip(rows, titles[1:] + titles[:1]):
        r["title"] = t
    open(path, "w").write("".join(json.dumps(r) + "\n" for r in rows))


def test_checkpoint_refuses_its_own_swapped_parts(trained_ckpt, dataset_dir, tmp_path, capsys):
    import sample as sample_py
    import train
    from nanocrs import checkpoint
    for name, swap in (("sids.json", swap_sids), ("tokenizer.json", swap_tokens), ("items.jsonl", rotate_titles)):
        d = str(tmp_path / name)
        shutil.copytree(trained_ckpt, d)
        swap(os.path.join(d, name))
        before = hashes(d)
        with pytest.raises(checkpoint.CheckpointError, match=f"{name}: not the file this checkpoint was saved with"):
            checkpoint.load(d)
        refused(sample_py.main, ["--ckpt", d, "--num-samples", "1", "--threads", "1"], capsys, 1, name)
        refused(train.main, ["--data", dataset_dir, "--out", d, "--resume", "--max-steps", "9", "--threads", "1"],
                capsys, 1, name)
        # a checkpoint from before the per-file hashes: the dataset fingerprint still catches it
        cfg_path = os.path.join(d, "config.json")
        saved = open(cfg_path, "rb").read()
        cfg = json.loads(saved)
        del cfg["parts"]
        json.dump(cfg, open(cfg_path, "w"))
        with pytest.raises(checkpoint.CheckpointError, match="fingerprint"):
            checkpoint.load(d)
        open(cfg_path, "wb").write(saved)
        assert hashes(d) == before
    # and the intact checkpoint, loaded after the refusals, names only catalogue items in 10,000 spans
    from nanocrs.generate import sample
    from nanocrs.session import Session
    from nanocrs.tokenizer import BOI, MODE_REC
    s = Session(trained_ckpt, "cpu")
    prompt = s.rd.prompt([{"role": "user", "text": "something scary please", "items": []}], forced=MODE_REC + BOI)
    outs = sample(s.model, prompt, s.trie, s.ctrl, n=10_000, max_new_tokens=s.trie.depth + 1, temperature=2.0,
                  generator=torch.Generator().manual_seed(0))
    named = [s.sids.item_of_tokens([s.tok.token(t) for t in o[:o.index(s.ctrl.eoi)]]) for o in outs]
    assert len(named) == 10_000 and sum(i not in s.items for i in named) == 0


# -----------------------------------------------------------------------------
# train.py writes only into folders it made (or empty ones)

def test_train_never_writes_into_a_dataset_or_foreign_folder(dataset_dir, tmp_path, capsys):
    import train
    raw = str(tmp_path / "raw")  # a custom --raw folder: the schema files, no dataset.json
    shutil.copytree(dataset_dir, raw)
    os.remove(os.path.join(raw, "dataset.json"))
    before = hashes(dataset_dir, raw)
    args = TRAIN_ARGS + ["--data", dataset_dir, "--max-steps", "1"]
    refused(train.main, args + ["--out", dataset_dir], capsys, 1, "prepared dataset")
    refused(train.main, args + ["--out", raw], capsys, 1, "train.py did not make it")
    refused(train.main, args + ["--out", dataset_dir, "--resume"], capsys, 1)
    assert hashes(dataset_dir, raw) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    run_train(dataset_dir, str(empty), ["--max-steps", "1"])
    assert json.load(open(empty / "config.json"))["step"] == 1


# -----------------------------------------------------------------------------
# leftovers of failed or killed runs, temporary names, outputs over a checkpoint, two trainings at once

def test_failed_save_on_full_disk_then_resume(dataset_dir, trained_ckpt, tmp_path, monkeypatch, capsys):
    import train
    from safetensors import SafetensorError
    from nanocrs import checkpoint
    from test_boundaries import same_weights
    real = checkpoint.save_file

    def full_disk(tensors, path, metadata=None):
        if "optimizer-000006" in path:  # the weights of step 6 are written, then the disk is full
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    out = str(tmp_path / "o")
    refused(train.main, TRAIN_ARGS + ["--data", dataset_dir, "--out", out], capsys, 1,
            "could not save step 6", "StorageFull", "step 3")
    assert json.load(open(os.path.join(out, "config.json")))["step"] == 3
    assert not [f for f in os.listdir(out) if "000006" in f or f.endswith(".tmp")], os.listdir(out)
    monkeypatch.setattr(checkpoint, "save_file", real)
    # what a kill inside a save leaves: the next step's weights renamed in place, a temporary file
    open(os.path.join(out, "model-000006.safetensors"), "wb").write(b"half a file")
    open(os.path.join(out, "optimizer-000006.safetensors.1234abcd.tmp"), "wb").write(b"x" * 100)
    run_train(dataset_dir, out, ["--resume"])  # no clean-up by hand
    assert same_weights(out, trained_ckpt, 6)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model-000006.safetensors",
                                                                       "optimizer-000006.safetensors"]


def test_killed_data_prep_leftovers_are_removed(tmp_path):
    import data_prep
    from conftest import DATA_ARGS
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "syn"
    (tmp_path / f"syn.tmp-{dead.pid}").mkdir()  # kill -9 during data_prep left this
    (tmp_path / f"syn.tmp-{dead.pid}" / "items.jsonl").write_text("{}\n")
    (tmp_path / f"syn.tmp-{os.getppid()}").mkdir()  # a run still going: stays
    data_prep.main(DATA_ARGS + ["--out", str(final)])
    assert sorted(os.listdir(tmp_path)) == ["syn", f"syn.tmp-{os.getppid()}"]


def test_atomic_writes_use_exclusive_names_and_never_follow_links(tmp_path):
    from nanocrs.common import TMP_NAME, atomic_path
    from nanocrs.data import write_json
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = tmp_path / "x.json"
    os.symlink(victim, str(path) + ".tmp")  # the fixed name older versions wrote through
    write_json(str(path), {"a": 1})
    assert victim.read_text() == "keep me" and json.load(open(path)) == {"a": 1}
    with atomic_path(path) as t1, atomic_path(path) as t2:
        assert t1 != t2 and TMP_NAME.match(os.path.basename(t1))
        open(t1, "w").write("{}")
        open(t2, "w").write("{}")
    assert not [f for f in os.listdir(tmp_path) if TMP_NAME.match(f)]


def test_outputs_never_replace_a_checkpoints_files(ck, capsys):
    import sample as sample_py
    before = hashes(ck)
    for flag, name in (("--rankings", "config.json"), ("--json", "tokenizer.json"), ("--json", "sids.json"),
                       ("--rankings", "items.jsonl"), ("--json", "model-000006.safetensors"), ("--json", "log.jsonl")):
        target = os.path.join(ck, name)
        refused(sample_py.main, ["--ckpt", ck, "--eval", "test", flag, target, "--threads", "1"], capsys, 1, flag, target)
    same = os.path.join(ck, "e.json")
    refused(sample_py.main, ["--ckpt", ck, "--eval", "test", "--json", same, "--rankings", same], capsys, 1, "both")
    assert hashes(ck) == before


def test_one_training_per_out(ck, dataset_dir):
    import fcntl
    fd = os.open(os.path.join(ck, "train.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a training still running holds it
    os.pwrite(fd, b"4242\n", 0)
    before = hashes(ck)
    try:
        p = run("train.py", "--data", dataset_dir, "--out", ck, "--resume", "--max-steps", "9", "--threads", "1")
    finally:
        os.close(fd)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    err = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "another train.py (pid 4242)" in err[0], err
    assert hashes(ck) == before


# -----------------------------------------------------------------------------
# runs/table.py

def test_table_refuses_what_it_can_not_average(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "runs"))
    import table
    from test_table import eval_json

    def write(name, obj):
        p = tmp_path / name
        p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
        return str(p)

    def fails(paths, *words):
        p = subprocess.run([sys.executable, os.path.join(REPO, "runs", "table.py"), *paths], capture_output=True, text=True)
        err = [l for l in p.stderr.splitlines() if l.strip()]
        assert p.returncode == 1 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
        for w in words:
            assert w in err[0], (w, err[0])

    a = write("a.json", {**eval_json(0.2), "copy_bias": 1.0})
    b = write("b.json", {**eval_json(0.3), "copy_bias": 1.0})
    fails([a, a, a], "a.json", "given twice")
    fails([a, write("a_copy.json", json.loads(open(a).read()))], "a_copy.json", "given twice")
    fails([a, write("c.json", {**eval_json(0.3), "copy_bias": 2.0})], "c.json", "copy_bias", "different knob settings")
    no_cooc = eval_json(0.3)
    del no_cooc["cooc"], no_cooc["fresh"]["cooc"]
    fails([a, write("d.json", {**no_cooc, "copy_bias": 1.0})], "d.json", "'cooc' is missing")
    fails([a, write("s.json", '"a string"')], "s.json", "not a sample.py --eval JSON")
    no_fresh = {**eval_json(0.3), "copy_bias": 1.0}
    del no_fresh["fresh"]
    fails([a, write("f.json", no_fresh)], "f.json", "fresh")
    nan = {**eval_json(0.3), "copy_bias": 1.0}
    nan["model"]["recall@10"] = float("nan")
    fails([a, write("n.json", nan)], "n.json", "model.recall@10")
    # each seed calibrated on its own val: the values differ, the source does not
    cal = [{**eval_json(r), "copy_bias": v, "knob_sources": {"copy_bias": "calibration.json"}} for r, v in ((0.2, 1.0), (0.3, 2.0))]
    assert len(table.rows(table.load([write("k0.json", cal[0]), write("k1.json", cal[1])]))) == 3
    flag = {**cal[1], "knob_sources": {"copy_bias": "flag"}}
    fails([write("k0.json", cal[0]), write("k2.json", flag)], "k2.json", "different knob settings")
    assert table.load([a, b])


# -----------------------------------------------------------------------------
# one line where a traceback was

def test_damaged_config_and_weights_are_one_line(ck, capsys):
    import sample as sample_py
    from safetensors.torch import load_file, save_file
    path = os.path.join(ck, "config.json")
    good = json.load(open(path))
    for key, change in (("files.model", lambda c: c["files"].update(model=None)),
                        ("model.n_head", lambda c: c["model"].update(n_head=0)),
                        ("model.dropout", lambda c: c["model"].update(dropout="0.1")),
                        ("step", lambda c: c.update(step=-1))):
        cfg = json.loads(json.dumps(good))
        change(cfg)
        json.dump(cfg, open(path, "w"))
        refused(sample_py.main, ["--ckpt", ck, "--threads", "1"], capsys, 1, path, key)
    json.dump(good, open(path, "w"))
    weights = os.path.join(ck, "model-000006.safetensors")
    sd = load_file(weights)
    save_file({k: torch.full_like(v, float("nan")) for k, v in sd.items()}, weights, metadata={"step": "6"})
    refused(sample_py.main, ["--ckpt", ck, "--threads", "1"], capsys, 1, weights, "non-finite")


def test_bad_train_flags_are_one_line(dataset_dir, tmp_path, capsys):
    import train
    out = str(tmp_path / "o")
    args = TRAIN_ARGS + ["--data", dataset_dir, "--out", out]
    for flag, code in ((["--threads", "-3"], 2), (["--device", "bogus"], 1), (["--block-size", "8"], 2),
                       (["--n-head", "3"], 2), (["--dropout", "1.5"], 2), (["--batch-size", "0"], 2),
                       (["--max-steps", "0"], 2), (["--lr", "nan"], 2), (["--warmup", "-1"], 2)):
        refused(train.main, args + flag, capsys, code, flag[0])
    if not torch.cuda.is_available():
        refused(train.main, args + ["--device", "cuda"], capsys, 1, "--device cuda")
    assert not os.path.exists(out)


def test_invalid_utf8_in_chat_keeps_the_session(trained_ckpt):
    p = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", trained_ckpt, "--chat",
                        "--threads", "1", "--max-new-tokens", "8"], cwd=REPO, env=ENV,
                       input=b"caf\xe9 \xff\xfe please\nsomething scary\n", capture_output=True, timeout=180)
    assert p.returncode == 0 and b"Traceback" not in p.stderr, p.stderr[-2000:]
    out = p.stdout.decode()
    assert out.count("bot> ") == 2 and "not UTF-8" in out, out


# -----------------------------------------------------------------------------
# catalogue text can not drive the terminal

def test_control_characters_in_titles_are_escaped(trained_ckpt, tmp_path, monkeypatch, capsys):
    import sample as sample_py
    from nanocrs import checkpoint
    from nanocrs.session import Session
    d = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, d)
    items = os.path.join(d, "items.jsonl")
    rows = [json.loads(l) for l in open(items)]
    rows[0]["title"] = "Evil\x1b[2J\x1b]0;pwned\x07 \u202eTitle\u2066 \x9b"
    open(items, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["parts"] = checkpoint.part_hashes(d)  # as if trained on this catalogue
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    s = Session(d, "cpu")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"I loved {rows[0]['title']}\n\x1b[31mred\n"))
    from test_boundaries import chat_args
    sample_py.chat(s, chat_args(), torch.Generator().manual_seed(0))
    ds = {"test": [{"id": "x", "turns": [{"role": "user", "text": f"like @{{{rows[0]['id']}}}", "items": [rows[0]["id"]]},
                                         {"role": "assistant", "text": f"try @{{{rows[0]['id']}}}", "items": [rows[0]["id"]]}]}]}
    sample_py.show_samples(s, ds, 1, chat_args(), torch.Generator().manual_seed(0))
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b\u202e\u2066"), repr(out)
    assert "(linked: [Evil\\x1b[2J\\x1b]0;pwned\\x07 \\u202eTitle\\u2066 \\x9b (" in out, out
    assert "gold: [REC] try [Evil\\x1b[2J" in out
