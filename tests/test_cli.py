"""
End-to-end tests of the scripts run as subprocesses: bad input gives a one-line error and exit code 1
(never a traceback), piped chat works, long chat contexts are truncated, --eval --json writes the
documented keys, and --rankings writes one line per sample that agrees with the metrics, at any
--eval-batch.

    python -m pytest tests/test_cli.py -q
"""

import json
import os
import shutil

import pytest

from conftest import run_cli as run


def assert_one_line_error(p, *words):
    assert p.returncode == 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_data_prep_unknown_dataset(tmp_path):
    out = str(tmp_path / "x")
    p = run("data_prep.py", "--dataset", "nope", "--out", out)
    assert_one_line_error(p, "nope")
    assert not os.path.exists(out)


def test_train_missing_data(tmp_path):
    p = run("train.py", "--data", "/nonexistent", "--out", str(tmp_path / "o"), "--max-steps", "1")
    assert_one_line_error(p, "/nonexistent")


def test_train_resume_without_checkpoint(dataset_dir, tmp_path):
    out = str(tmp_path / "empty")
    os.makedirs(out)
    p = run("train.py", "--data", dataset_dir, "--out", out, "--resume", "--max-steps", "1")
    assert_one_line_error(p, out, "config.json")


def test_sample_missing_checkpoint():
    assert_one_line_error(run("sample.py", "--ckpt", "/nonexistent"), "/nonexistent")


def test_sample_incomplete_checkpoint(trained_ckpt, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, ck)
    os.remove(os.path.join(ck, "model-000006.safetensors"))
    os.remove(os.path.join(ck, "sids.json"))
    assert_one_line_error(run("sample.py", "--ckpt", ck), ck, "model-000006.safetensors", "sids.json")


def test_sample_bad_eval_split(trained_ckpt):
    assert_one_line_error(run("sample.py", "--ckpt", trained_ckpt, "--eval", "nope"), "nope")


def corrupt(dataset_dir, tmp_path, split, line_no, new_line):
    dst = str(tmp_path / "broken")
    shutil.copytree(dataset_dir, dst)
    path = os.path.join(dst, f"{split}.jsonl")
    lines = open(path).read().splitlines()
    lines[line_no - 1] = new_line
    open(path, "w").write("\n".join(lines) + "\n")
    return dst, path


def test_malformed_dataset_names_file_and_line(dataset_dir, tmp_path):
    dst, path = corrupt(dataset_dir, tmp_path, "train", 5, '{"id": "syn-train-00004", "turns": [')
    p = run("train.py", "--data", dst, "--out", str(tmp_path / "o"), "--max-steps", "1")
    assert_one_line_error(p, f"{path}:5:", "invalid JSON")
    assert not os.path.exists(str(tmp_path / "o" / "config.json"))


def test_unknown_item_in_eval_split(dataset_dir, trained_ckpt, tmp_path):
    bad = {"id": "x", "turns": [{"role": "user", "text": "like @{zz9}", "items": ["zz9"]}]}
    dst, path = corrupt(dataset_dir, tmp_path, "val", 2, json.dumps(bad))
    p = run("sample.py", "--ckpt", trained_ckpt, "--data", dst, "--eval", "val")
    assert_one_line_error(p, f"{path}:2:", "zz9")


def test_piped_chat(trained_ckpt):
    p = run("sample.py", "--ckpt", trained_ckpt, "--chat", "--max-new-tokens", "24",
            stdin="hello\n\n/reset\nI like scary movies from the 80s\n")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    out = p.stdout.splitlines()
    assert any(l.startswith("(empty message") for l in out)
    assert "(new conversation)" in out
    assert sum(l.startswith("you> ") for l in out) == 2
    bots = [l for l in out if l.startswith("bot> ")]
    assert len(bots) == 2, p.stdout
    assert all(l.split(" ", 1)[1].startswith("(") for l in bots)  # "(MODE ...) text"


def test_chat_long_context_is_truncated(trained_ckpt):
    long_line = " ".join(["scary"] * 1500 + ["eighties"] * 1500)
    p = run("sample.py", "--ckpt", trained_ckpt, "--chat", "--greedy", stdin=long_line + "\nand another one?\n")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert sum(l.startswith("bot> ") for l in p.stdout.splitlines()) == 2


def test_eval_json(trained_ckpt, tmp_path):
    out = str(tmp_path / "sub" / "eval.json")
    p = run("sample.py", "--ckpt", trained_ckpt, "--eval", "test", "--max-samples", "3", "--json", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "standard protocol" in p.stdout and "free-mode intent (argmax" in p.stdout
    res = json.load(open(out))
    im = res["intent"]
    assert im["n_turns"] == res["n_intent_turns"] and 0 <= im["rec_precision"] <= 1 and 0 <= im["rec_recall"] <= 1
    assert res["dialog"]["ppl_tokens"] >= res["dialog"]["ppl_units"]  # a span of several tokens is one unit
    assert "gold_distinct_ratio" in res["dialog"]
    for key in ("n_samples", "model", "popularity", "repeat", "repeat+pop", "cooc", "repeat+cooc", "oracle", "fresh", "intent_accuracy"):
        assert key in res, key
    metric_keys = {f"recall@{k}" for k in (1, 5, 10, 20, 50)} | {f"{m}@{k}" for m in ("ndcg", "mrr") for k in (5, 10, 20)}
    for method in ("model", "popularity", "repeat", "oracle"):
        assert metric_keys <= set(res[method]), method
        assert all(0.0 <= res[method][k] <= 1.0 for k in metric_keys)
        assert res[method]["recall@1"] <= res[method]["recall@5"] <= res[method]["recall@50"]
    assert set(res["fresh"]) >= {"model", "popularity", "repeat", "oracle"}
    assert res["n_samples"] > 0 and 0.0 <= res["intent_accuracy"] <= 1.0
    assert res["oracle"]["recall@50"] == 1.0  # the generator's own list always holds the gold item
    # repeat+pop's list begins with the whole repeat list: every gold that repeat ranks, it ranks no lower
    assert res["repeat+pop"]["recall@50"] >= res["repeat"]["recall@50"]
    dg = res["diagnostics"]
    assert 0.0 <= dg["cold_share"] <= 1.0 and all(0.0 < dg["coverage@10"][m] <= 1.0 for m in ("model", "popularity"))
    assert dg["top1_distinct"]["popularity"] == 1  # the same list for every context
    # popularity counts recommendation targets: an item never a target can not reach its top 10
    assert dg["recall@10_cold"]["popularity"] == 0.0
    assert "never a training target" in p.stdout
    assert not os.path.exists(out + ".tmp")


def test_eval_rankings_file(trained_ckpt, tmp_path):
    from nanocrs.metrics import rank_metrics
    lines, results = {}, {}
    for batch in (1, 5):
        out, rk = str(tmp_path / f"eval{batch}.json"), str(tmp_path / f"rank{batch}.jsonl")
        p = run("sample.py", "--ckpt", trained_ckpt, "--eval", "test", "--max-samples", "6", "--max-gen", "0",
                "--eval-batch", str(batch), "--json", out, "--rankings", rk)
        assert p.returncode == 0, p.stderr[-3000:]
        results[batch], lines[batch] = json.load(open(out)), [json.loads(l) for l in open(rk)]
    res, rows = results[5], lines[5]
    assert len(rows) == res["n_samples"] > 0 and sum(r["fresh"] for r in rows) == res["n_fresh"]
    for r in rows:
        assert set(r) == {"dialog", "turn", "gold", "fresh", "rank", "top", "baselines"}
        items, scores = [i for i, _ in r["top"]], [lp for _, lp in r["top"]]
        assert len(items) == len(set(items)) == res["beam"]
        assert all(a >= b for a, b in zip(scores, scores[1:])) and all(lp <= 0 for lp in scores)
        assert r["rank"] == (items.index(r["gold"]) + 1 if r["gold"] in items else 0)
    # the file reproduces the printed metrics, standard and fresh
    assert rank_metrics([r["rank"] for r in rows]) == res["model"]
    assert rank_metrics([r["rank"] for r in rows if r["fresh"]]) == res["fresh"]["model"]
    for m in rows[0]["baselines"]:  # and the baselines', for runs/table.py's paired intervals
        assert rank_metrics([r["baselines"][m] for r in rows]) == res[m]
    # one prompt at a time and five at once: the same samples, rankings and metrics
    one = lines[1]
    assert [(r["dialog"], r["turn"], r["gold"]) for r in one] == [(r["dialog"], r["turn"], r["gold"]) for r in rows]
    for a, b in zip(one, rows):
        assert [i for i, _ in a["top"]] == [i for i, _ in b["top"]]
        assert max(abs(x[1] - y[1]) for x, y in zip(a["top"], b["top"])) < 1e-4
    assert results[1]["model"] == res["model"] and results[1]["fresh"] == res["fresh"]


def test_chat_context_survives_generated_mention_syntax(trained_ckpt):
    """chat() writes the model's reply back into the context via reply_text; if the generated text
    itself contains "@{...}" (any byte sequence is possible for a sampled model), the next prompt must
    still render instead of crashing with a KeyError (user input is escaped the same way: "@ {")."""
    from nanocrs.session import Session, reply_text
    s = Session(trained_ckpt, "cpu")
    ids = s.tok.encode("<MODE=CHAT><RESP> what about @{zz9} then?<EOT>")
    text = reply_text(s, ids)
    context = [{"role": "user", "text": "hi", "items": []}, {"role": "assistant", "text": text, "items": []},
               {"role": "user", "text": "ok", "items": []}]
    prompt = s.rd.prompt(context)  # must not raise
    assert len(prompt) > 0


def test_calibrate_on_val_only(trained_ckpt, tmp_path):
    import shutil
    ckpt = str(tmp_path / "ck")
    shutil.copytree(trained_ckpt, ckpt)
    p = run("sample.py", "--ckpt", ckpt, "--eval", "test", "--max-samples", "2", "--max-gen", "0", "--calibrate")
    assert p.returncode == 1 and "never on test" in p.stderr
    p = run("sample.py", "--ckpt", ckpt, "--eval", "val", "--max-samples", "3", "--max-gen", "0", "--calibrate")
    assert p.returncode == 0, p.stderr[-3000:]
    saved = json.load(open(os.path.join(ckpt, "calibration.json")))
    assert 0 <= saved["rec_threshold"] <= 1 and saved["chosen_on"] == "val"
    p = run("sample.py", "--ckpt", ckpt, "--eval", "val", "--max-samples", "2", "--max-gen", "0", "--calibrate", "copy")
    assert p.returncode == 1 and "no heads" in p.stderr.strip().splitlines()[-1]  # this checkpoint has none
    # later evals report the calibrated decision beside the argmax, and chat uses it
    p = run("sample.py", "--ckpt", ckpt, "--eval", "test", "--max-samples", "2", "--max-gen", "0")
    assert "threshold from val" in p.stdout
    p = run("sample.py", "--ckpt", ckpt, "--chat", "--greedy", stdin="a scary movie please\n")
    assert p.returncode == 0 and sum(l.startswith("bot> ") for l in p.stdout.splitlines()) == 1, p.stderr[-2000:]
    # a broken calibration file is one line naming it; the older name (intent.json) is still read
    os.rename(os.path.join(ckpt, "calibration.json"), os.path.join(ckpt, "intent.json"))
    p = run("sample.py", "--ckpt", ckpt, "--eval", "test", "--max-samples", "2", "--max-gen", "0")
    assert p.returncode == 0 and "threshold from val" in p.stdout
    open(os.path.join(ckpt, "intent.json"), "w").write("{not json")
    p = run("sample.py", "--ckpt", ckpt, "--eval", "test", "--max-samples", "2", "--max-gen", "0")
    assert p.returncode == 1 and "intent.json" in p.stderr.strip().splitlines()[-1]
