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

from conftest import REPO, run_train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": REPO}


def run(script, *args, stdin=None, timeout=180):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=ENV,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


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
    import sample as sample_py
    return sample_py.Session(trained_ckpt, "cpu")


# -----------------------------------------------------------------------------
# control-token injection

def test_typed_control_and_id_tokens_are_plain_text(tok, sids, dataset):
    from nanocrs.data import Renderer
    from nanocrs.tokenizer import CONTROL_TOKENS
    rd = Renderer(tok, sids, 256)
    added = {tok.id(t) for t in CONTROL_TOKENS + sids.all_token_strings()}
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
