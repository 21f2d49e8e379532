"""
Behaviour preserved: two tiny runs give the losses, rankings and samples recorded before the heads
moved into one module (issue 30), exactly (floats to 1e-6 relative) on the CPU with one thread.

    python -m pytest tests/dev/test_recorded_figures.py -q      # compare with recorded_figures.json
    OMP_NUM_THREADS=1 python tests/dev/test_recorded_figures.py --record   # write it anew (only on purpose)

The runs: (a) the synthetic quickstart, plain GCRS, 30 steps of a tiny model; (b) a tiny ReDial-format
dataset (tests/fixtures/redial, MiniLM item vectors) with every head on (copy, association reading the
context's items, started from the counts, fresh-only, distinct item sequences, turn buckets), the four
knobs calibrated on val, then non-zero knobs (threshold, copy bias, just-named bias, text prior) for
the evals of test and train and for sampled replies.
"""

import json
import math
import os
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FIGURES = os.path.join(HERE, "recorded_figures.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": REPO}
SYN_DATA = ["--dataset", "synthetic", "--n-items", "160", "--n-train", "200", "--n-val", "30", "--n-test", "30",
            "--levels", "2", "--codebook-size", "8", "--vocab-size", "400", "--kmeans-iters", "20"]
REDIAL_DATA = ["--dataset", "redial", "--raw", os.path.join(REPO, "tests", "fixtures", "redial"), "--encoder", "minilm",
               "--levels", "2", "--codebook-size", "4", "--vocab-size", "400", "--kmeans-iters", "10"]
TINY = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2", "--batch-size", "8",
        "--eval-interval", "10", "--save-interval", "30", "--max-steps", "30", "--device", "cpu", "--threads", "1"]
def heads(dim):  # every head on
    return ["--heads", f"pointer={dim},assoc=2,assoc-init=counts,assoc-fresh=1,distinct-sequences=1,copy-turns=1"]


def calibrate(text):
    return ["--calibrate", "threshold,copy,just-named" + (",text" if text else "")]
KNOBS = {"rec_threshold": 0.4, "copy_bias": 0.5, "just_named_bias": 1.5, "text_prior": 5.0}
EVAL = ["--device", "cpu", "--threads", "1", "--beam", "50"]
TOP = 10  # items kept of each sample's ranked list


def run(script, *args, stdin=None):
    r = subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=ENV, input=stdin,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} {' '.join(args)}\n{r.stderr[-3000:]}"
    return r.stdout


def losses(out: str) -> list:
    return [[r["step"], r["loss"], r.get("val_loss")] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))]


def eval_figures(out: str, split: str, tmp: str, max_gen: str) -> dict:
    """The figures of sample.py --eval SPLIT: every sample's ranked list and the headline metrics."""
    js, rk = os.path.join(tmp, f"{split}.json"), os.path.join(tmp, f"{split}.jsonl")
    run("sample.py", "--ckpt", out, "--eval", split, "--max-gen", max_gen, "--json", js, "--rankings", rk, "--max-samples", "40",
        *EVAL)
    res = json.load(open(js))
    keep = {"model": res["model"], "fresh": res["fresh"]["model"], "intent": res["intent"],
            "intent_calibrated": res.get("intent_calibrated"), "dialog": res["dialog"],
            "copy_gate_mean": res["diagnostics"]["copy_gate_mean"]}
    rows = [json.loads(line) for line in open(rk)]
    for r in rows:  # the first TOP of each ranked list (the metrics above cover the rest)
        r["top"] = r["top"][:TOP]
    return {"rankings": rows, "metrics": keep}


def record_all(tmp: str) -> dict:
    figs = {}
    # (a) the synthetic quickstart, plain GCRS
    data, out = os.path.join(tmp, "syn"), os.path.join(tmp, "syn-out")
    run("data_prep.py", *SYN_DATA, "--out", data)
    run("train.py", "--data", data, "--out", out, *TINY)
    figs["synthetic"] = {"losses": losses(out), "test": eval_figures(out, "test", tmp, "10"),
                         "samples": run("sample.py", "--ckpt", out, "--num-samples", "3", *EVAL[:4])}
    # (b) the same data with every head on but the text prior (its items are TF-IDF vectors)
    figs["synthetic_heads"] = heads_run(data, os.path.join(tmp, "syn-heads"), tmp, 8, text=False, chat="a scary movie please")
    # (c) the tiny ReDial-format dataset with every head on
    data = os.path.join(tmp, "redial")
    run("data_prep.py", *REDIAL_DATA, "--out", data)
    figs["redial_heads"] = heads_run(data, os.path.join(tmp, "redial-out"), tmp, 4, text=True,
                                     chat="I loved Moonlight Circus, what else?")
    return figs


def heads_run(data: str, out: str, tmp: str, dim: int, text: bool, chat: str) -> dict:
    """Train with every head, calibrate the knobs on val, then evaluate and sample with non-zero knobs."""
    run("train.py", "--data", data, "--out", out, *TINY, *heads(dim))
    run("sample.py", "--ckpt", out, "--eval", "val", "--max-gen", "0", *calibrate(text), *EVAL)
    calibrated = json.load(open(os.path.join(out, "calibration.json")))
    with open(os.path.join(out, "calibration.json"), "w") as f:
        json.dump(KNOBS if text else {**KNOBS, "text_prior": 0.0}, f)
    tmp = os.path.join(tmp, os.path.basename(out) + "-eval")
    os.makedirs(tmp)
    return {"losses": losses(out), "calibrated": calibrated,
            "test": eval_figures(out, "test", tmp, "4"), "train": eval_figures(out, "train", tmp, "4"),
            "samples": run("sample.py", "--ckpt", out, "--num-samples", "2", "--temperature", "0.9", *EVAL[:4]),
            "chat": run("sample.py", "--ckpt", out, "--chat", "--greedy", *EVAL[:4], stdin=chat + "\n")}


def close(a, b, path="") -> list:
    """The places where a (now) differs from b (recorded): exactly for everything but floats, floats to
    1e-6 relative; keys added to a since b was recorded are not compared."""
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and (
                a == b or (math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9))):
            return []
        return [f"{path}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):  # b recorded: what was added since is not compared
        if not set(b) <= set(a):
            return [f"{path}: missing keys {sorted(set(b) - set(a))}"]
        return [d for k in b for d in close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in close(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_figures_are_the_recorded_ones(tmp_path):
    recorded = json.load(open(FIGURES))
    now = json.loads(json.dumps(record_all(str(tmp_path))))  # through JSON, as recorded (tuples -> lists, keys -> str)
    diffs = close(now, recorded["figures"])
    assert not diffs, f"{len(diffs)} figures differ from those recorded at {recorded['commit']}:\n" + "\n".join(diffs[:20])


if __name__ == "__main__":
    import tempfile
    assert "--record" in sys.argv, "python tests/dev/test_recorded_figures.py --record (or run it under pytest)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        figs = record_all(tmp)
    with open(FIGURES, "w") as f:
        json.dump({"commit": commit, "figures": figs}, f, separators=(",", ":"))
    print(f"wrote {FIGURES} at {commit}")
