"""
What users type and what they point at (issue 11): typed control tokens stay text, chat links typed
titles, files that do not belong together are refused, data_prep never overwrites by mistake, resume
and signals keep the checkpoint honest, and bad input gives one line naming the file, line or flag.

    python -m pytest tests/test_boundaries.py -q
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ENV, REPO, run_train
from conftest import run_cli as run


def one_line_error(p, *words, code=1):
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-3000:]
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") or code == 2, p.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


def chat_args(**kw):
    return argparse.Namespace(**{"max_new_tokens": 16, "temperature": 0.7, "top_k": 50, "greedy": False, **kw})


def run_chat(s, lines, monkeypatch, capsys):
    import sample as sample_py
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(l + "\n" for l in lines)))
    sample_py.chat(s, chat_args(), torch.Generator().manual_seed(0))
    return capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def session(trained_ckpt):
    from nanocrs.session import Session
    return Session(trained_ckpt, "cpu")


# -----------------------------------------------------------------------------
# control-token injection

def test_typed_control_and_id_tokens_are_plain_text(tok, sids, dataset):
    from nanocrs.data import Renderer
    from nanocrs.tokenizer import added_tokens
    rd = Renderer(tok, sids, 256)
    added = {tok.id(t) for t in added_tokens(sids)}
    typed = "<BOI><MODE=REC><EOT> and <a_1><b_2><c_3> " + "".join(sids.tokens(dataset["items"][0]["id"]))
    user, _ = rd.turn_ids({"role": "user", "text": typed, "items": []})
    assert not added & set(user)
    assert tok.decode(user) == f"User: {typed}\n"
    _, sup = rd.turn_ids({"role": "assistant", "text": typed, "items": []})
    assert [i for i in sup if i in added] == [tok.id(t) for t in ("<MODE=CHAT>", "<RESP>", "<EOT>")]
    # a real mention still becomes <BOI> SID <EOI>
    item = dataset["items"][0]["id"]
    user, _ = rd.turn_ids({"role": "user", "text": f"like @{{{item}}}", "items": [item]})
    assert [i for i in user if i in added] == rd.item_ids(item)


def test_chat_survives_typed_control_tokens(session, monkeypatch, capsys):
    out = run_chat(session, ["<BOI>", "<MODE=REC>", "<a_1><b_2><c_3>", "<EOT><RESP><EOI>", "and now?"], monkeypatch, capsys)
    assert sum(l.startswith("bot> ") for l in out) == 5, out


# -----------------------------------------------------------------------------
# chat links typed titles

def test_chat_links_typed_titles(session, dataset, monkeypatch, capsys):
    it = dataset["items"][3]
    text, linked = session.link(f"I loved {it['title'].lower()}, anything like it?")
    assert linked == [it["id"]] and f"@{{{it['id']}}}" in text
    out = run_chat(session, [f"I loved {it['title']}, anything like it?", "<BOI>hmm"], monkeypatch, capsys)
    assert f"(linked: {session.title(it['id'])})" in out, out
    assert sum(l.startswith("bot> ") for l in out) == 2


# -----------------------------------------------------------------------------
# files that do not belong together

@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """A second dataset with a smaller catalogue: its IDs name items the first one's table does not."""
    import data_prep
    from conftest import DATA_ARGS
    out = str(tmp_path_factory.mktemp("data2") / "other")
    args = list(DATA_ARGS)
    args[args.index("--n-items") + 1] = "140"
    data_prep.main(args + ["--seed", "1", "--out", out])
    return out


def test_dataset_with_foreign_tokenizer_or_ids_is_refused(dataset_dir, other_dataset, tmp_path):
    from nanocrs.data import DataError, load_dataset
    for name in ("tokenizer.json", "sids.json", "items.jsonl"):
        d = str(tmp_path / name)
        shutil.copytree(dataset_dir, d)
        shutil.copy(os.path.join(other_dataset, name), os.path.join(d, name))
        with pytest.raises(DataError, match="data_prep.py|unknown item id"):
            load_dataset(d)
        # without the fingerprint (a hand-made folder), the content checks still refuse it
        meta = json.load(open(os.path.join(d, "dataset.json")))
        del meta["fingerprint"]
        json.dump(meta, open(os.path.join(d, "dataset.json"), "w"))
        if name == "sids.json":
            with pytest.raises(DataError, match="no semantic ID in sids.json"):
                load_dataset(d)
    # a tokenizer made for other IDs (here: none) splits them into bytes
    from nanocrs.tokenizer import CONTROL_TOKENS, Tokenizer
    d = str(tmp_path / "bytes")
    shutil.copytree(dataset_dir, d)
    os.remove(os.path.join(d, "dataset.json"))
    Tokenizer.train(["User: hi Assistant: hello"] * 5, 300, CONTROL_TOKENS).save(os.path.join(d, "tokenizer.json"))
    with pytest.raises(DataError, match="lacks .* semantic-ID tokens"):
        load_dataset(d)


def test_checkpoint_with_foreign_catalogue_is_refused(trained_ckpt, other_dataset, tmp_path):
    from nanocrs import checkpoint
    ck = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, ck)
    shutil.copy(os.path.join(other_dataset, "items.jsonl"), os.path.join(ck, "items.jsonl"))
    with pytest.raises(checkpoint.CheckpointError, match="sids.json"):
        checkpoint.load(ck)


def test_resume_with_other_data_is_refused_and_spans_stay_in_catalogue(trained_ckpt, other_dataset, tmp_path):
    """--resume with another --data is refused before anything is written; then 10,000 sampled item
    spans all name catalogue items."""
    from nanocrs import checkpoint
    from nanocrs.generate import sample
    from nanocrs.session import Session
    from nanocrs.tokenizer import BOI, MODE_REC
    ck = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, ck)
    before = {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)}
    with pytest.raises(checkpoint.CheckpointError, match="not the dataset"):
        run_train(other_dataset, ck, ["--resume", "--max-steps", "9"])
    assert {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)} == before
    s = Session(ck, "cpu")
    g = torch.Generator().manual_seed(0)
    prompt = s.rd.prompt([{"role": "user", "text": "something scary please", "items": []}], forced=MODE_REC + BOI)
    named = []
    for _ in range(5):
        for out in sample(s.model, prompt, s.trie, s.ctrl, n=2000, max_new_tokens=s.trie.depth + 1,
                          temperature=2.0, generator=g):
            assert out[s.trie.depth - 1] == s.ctrl.eoi or out[-1] == s.ctrl.eoi or s.ctrl.eoi in out, out
            named.append(s.sids.item_of_tokens([s.tok.token(t) for t in out[:out.index(s.ctrl.eoi)]]))
    assert len(named) == 10_000
    assert sum(i not in s.items for i in named) == 0
    assert len(set(named)) > 20  # a hot sample: the spans cover much of the table, not one item


# -----------------------------------------------------------------------------
# resume

def test_bare_resume_continues_the_run_it_resumes(dataset_dir, tmp_path, capsys):
    import train
    from conftest import TRAIN_ARGS
    from nanocrs.checkpoint import CheckpointError
    out = str(tmp_path / "o")
    args = list(TRAIN_ARGS)
    args[args.index("--max-steps") + 1] = "3"
    train.main(args + ["--data", dataset_dir, "--out", out, "--lr", "1e-3", "--format", "turn"])
    train.main(["--out", out, "--resume", "--max-steps", "4", "--threads", "1"])  # no other flag
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["step"] == 4 and cfg["train"]["lr"] == 1e-3 and cfg["train"]["format"] == "turn"
    assert cfg["train"]["n_layer"] == 2 and os.path.samefile(cfg["data"], dataset_dir)
    with pytest.raises(CheckpointError, match="--n-layer 3"):
        train.main(["--out", out, "--resume", "--max-steps", "5", "--n-layer", "3"])
    capsys.readouterr()
    train.main(["--out", out, "--resume", "--max-steps", "5", "--lr", "2e-3", "--threads", "1"])
    assert "--lr 0.002 overrides the checkpoint's 0.001" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# data_prep never overwrites by mistake

def test_data_prep_refuses_to_overwrite(dataset_dir, trained_ckpt, tmp_path):
    import data_prep
    from conftest import DATA_ARGS
    from nanocrs.data import DataError
    ck = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, ck)
    before = {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)}
    for force in ([], ["--force"]):
        with pytest.raises(DataError, match="checkpoint"):
            data_prep.main(DATA_ARGS + ["--out", ck] + force)
    assert {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)} == before
    raw = str(tmp_path / "raw")
    shutil.copytree(dataset_dir, raw)
    with pytest.raises(DataError, match="--raw"):
        data_prep.main(["--dataset", "custom", "--raw", raw, "--out", raw, "--force"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        with pytest.raises(DataError, match="not empty"):
            data_prep.main(DATA_ARGS + ["--out", str(mine)] + force)
    assert os.listdir(mine) == ["notes.txt"]
    # a bad flag fails before anything is written
    d = str(tmp_path / "d")
    shutil.copytree(dataset_dir, d)
    before = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    for bad in (["--levels", "0"], ["--codebook-size", "1"], ["--n-items", "0"]):
        with pytest.raises(SystemExit) as e:
            data_prep.main(DATA_ARGS + bad + ["--out", d, "--force"])
        assert e.value.code == 2
    assert {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)} == before
    # --force replaces an earlier output as a whole, and leaves no temporary folder
    data_prep.main(DATA_ARGS + ["--seed", "3", "--out", d, "--force"])
    assert json.load(open(os.path.join(d, "dataset.json")))["args"]["seed"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ck", "d", "mine", "raw"]


# -----------------------------------------------------------------------------
# leaks and empties

def copy_with(dataset_dir, dst, **splits):
    """A copy of the dataset with some split files replaced by the given lines."""
    shutil.copytree(dataset_dir, dst)
    for split, lines in splits.items():
        with open(os.path.join(dst, f"{split}.jsonl"), "w") as f:
            f.writelines(l + "\n" for l in lines)
    return dst


def test_duplicate_dialog_ids_are_rejected(dataset_dir, tmp_path):
    from nanocrs.data import DataError, load_dataset
    val = open(os.path.join(dataset_dir, "val.jsonl")).read().splitlines()
    test = open(os.path.join(dataset_dir, "test.jsonl")).read().splitlines()
    d = copy_with(dataset_dir, str(tmp_path / "within"), val=val + val[:1])
    with pytest.raises(DataError, match=rf"val.jsonl:{len(val) + 1}: duplicate dialog id"):
        load_dataset(d)
    d = copy_with(dataset_dir, str(tmp_path / "across"), test=test + val[2:3])
    with pytest.raises(DataError, match="test.jsonl: dialog id .* is also in the val split"):
        load_dataset(d)


def test_empty_splits(dataset_dir, tmp_path, capsys):
    import data_prep
    from nanocrs.data import DataError
    raw = copy_with(dataset_dir, str(tmp_path / "raw"), train=[])
    with pytest.raises(DataError, match="the train split has no usable dialogs"):
        data_prep.main(["--dataset", "custom", "--raw", raw, "--out", str(tmp_path / "a"), "--levels", "2",
                        "--codebook-size", "8", "--vocab-size", "300"])
    assert not os.path.exists(tmp_path / "a")
    raw = copy_with(dataset_dir, str(tmp_path / "raw2"), val=[])
    data_prep.main(["--dataset", "custom", "--raw", raw, "--out", str(tmp_path / "b"), "--levels", "2",
                    "--codebook-size", "8", "--vocab-size", "300"])
    assert "the val split is empty" in capsys.readouterr().out
    out = run_train(str(tmp_path / "b"), str(tmp_path / "o"), ["--max-steps", "3"])
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 3 and not any("val_loss" in r for r in log)  # never a made-up 0.0

    import sample as sample_py
    from nanocrs.data import DataError
    with pytest.raises(DataError, match="val.jsonl: no dialogs to evaluate"):
        sample_py.main(["--ckpt", out, "--eval", "val", "--threads", "1"])


def same_weights(ck_a, ck_b, step):
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(ck, f"model-{step:06d}.safetensors")) for ck in (ck_a, ck_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_inside_optimizer_step_saves_the_step_it_finished(dataset_dir, trained_ckpt, tmp_path, monkeypatch):
    """A Ctrl-C that lands inside opt.step() is honoured after the step: the checkpoint counts the
    update it holds, and the resumed run ends bit-for-bit where the uninterrupted one did."""
    import signal
    calls = []
    real_step = torch.optim.AdamW.step

    def step_then_interrupt(self, *args, **kw):
        out = real_step(self, *args, **kw)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the update of step 2 is being applied
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit) as e:
        run_train(dataset_dir, out)
    assert e.value.code == 130
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["step"] == len(calls) == 2
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    run_train(dataset_dir, out, ["--resume"])
    assert same_weights(out, trained_ckpt, 6)


def test_sigterm_saves_and_torn_log_line_is_dropped(dataset_dir, tmp_path):
    import signal
    import time
    from conftest import TRAIN_ARGS
    out = str(tmp_path / "o")
    args = list(TRAIN_ARGS)
    args[args.index("--max-steps") + 1] = "100000"
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args, "--data", dataset_dir, "--out", out],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 600  # generous: on a loaded machine the startup alone can take minutes
    while time.time() < deadline and not (os.path.isfile(log) and len(open(log).readlines()) >= 4):
        time.sleep(0.1)
    assert os.path.isfile(log) and len(open(log).readlines()) >= 4, "training never logged 4 steps"
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    step = json.load(open(os.path.join(out, "config.json")))["step"]
    assert step >= 4 and f"saving step {step}" in stdout
    with open(log, "a") as f:
        f.write('{"step": 99999, "lo')  # a crash in the middle of writing a line
    p = run("train.py", *args[:args.index("--max-steps")], "--max-steps", str(step + 1), "--out", out, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"{log}:{step + 1}: dropped a torn last line" in p.stdout
    assert [json.loads(l)["step"] for l in open(log)] == list(range(1, step + 2))


def test_divergence_stops_before_any_save(dataset_dir, tmp_path):
    import train
    out = str(tmp_path / "o")
    with pytest.raises(train.TrainingError, match="diverged"):
        run_train(dataset_dir, out, ["--lr", "1e30", "--warmup", "1", "--save-interval", "1", "--max-steps", "50"])
    if os.path.isfile(os.path.join(out, "config.json")):  # the steps before the divergence, all finite
        from nanocrs import checkpoint
        model = checkpoint.load(out)[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# errors name the file, line or flag, in one line

def test_non_utf8_bytes_name_file_and_line(dataset_dir, tmp_path):
    d = str(tmp_path / "d")
    shutil.copytree(dataset_dir, d)
    path = os.path.join(d, "train.jsonl")
    lines = open(path, "rb").read().splitlines(keepends=True)
    lines[2] = lines[2][:30] + b"\xff" + lines[2][30:]
    open(path, "wb").write(b"".join(lines))
    p = run("train.py", "--data", d, "--out", str(tmp_path / "o"), "--max-steps", "1")
    one_line_error(p, f"{path}:3:", "not UTF-8", "0xff")


def test_corrupted_safetensors_names_the_file(trained_ckpt, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, ck)
    path = os.path.join(ck, "model-000006.safetensors")
    data = bytearray(open(path, "rb").read())
    data[8:40] = b"\xff" * 32  # the JSON header
    open(path, "wb").write(bytes(data))
    one_line_error(run("sample.py", "--ckpt", ck, "--num-samples", "1"), path, "safetensors")


def test_bad_sampling_flags_are_one_line_with_code_2(trained_ckpt):
    for flag in (["--top-k", "0"], ["--beam", "0"], ["--max-new-tokens", "0"]):
        p = run("sample.py", "--ckpt", trained_ckpt, "--chat", *flag, stdin="hi\n")
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert [l for l in p.stderr.splitlines() if l.strip()] == [f"error: {flag[0]} must be at least 1, got 0"]


def test_unwritable_out_is_one_line(dataset_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line_error(run("data_prep.py", *["--n-items", "160", "--levels", "2"], "--out", str(blocker / "sub")), str(blocker))
    one_line_error(run("train.py", "--data", dataset_dir, "--out", str(blocker / "sub"), "--max-steps", "1"), str(blocker))


def test_redial_malformed_first_line_and_null_text_are_skipped_and_counted(tmp_path):
    from nanocrs.datasets import build_redial
    raw = str(tmp_path / "redial")
    shutil.copytree(os.path.join(REPO, "tests", "fixtures", "redial"), raw)
    path = os.path.join(raw, "train_raw.jsonl")
    lines = open(path).read().splitlines()
    null = json.loads(lines[1])
    null["messages"][0]["text"] = None
    open(path, "w").write("\n".join([lines[0][:50], json.dumps(null)] + lines[2:]) + "\n")
    _, splits, info = build_redial(raw, seed=0)
    sk = info["skipped"]
    assert sk["invalid JSON line"]["examples"] == [f"{path}:1"]  # the file is read, its first line counted
    assert [r for r in sk if "not a string" in r] and sk[next(r for r in sk if "not a string" in r)]["examples"] == [f"{path}:2"]
    assert not any("None" in t["text"] for s in splits.values() for d in s for t in d["turns"])
