"""
Checkpoints: a folder a user can read, with no pickle anywhere.

    out/synthetic/
      config.json           {"model": GPTConfig, "heads": HeadsConfig or null (nanocrs/heads.py), "train": train.py
                             arguments, "step": N, "world": processes, "data": ..., "init_from": backbone or "",
                             "lora": {...}, "quantize": "none" or "nf4", "dataset": name,
                             "files": {"model": "model-000800.safetensors", "optimizer": "optimizer-000800.safetensors"}}
      model-000800.safetensors      weights of step 800 (metadata: step)
      optimizer-000800.safetensors  AdamW moments (metadata: step, hyperparameters as JSON)
      tokenizer.json        the tokenizer, added tokens included
      sids.json             the item <-> semantic-ID table
      items.jsonl           the catalogue (titles for printing)
      log.jsonl             one line per optimizer step: step, lr, loss, val_loss (appended)
      train.lock            held by the train.py writing here (one at a time); says train.py made the folder

config.json also keeps the sha256 of tokenizer.json, sids.json and items.jsonl ("parts"): load() refuses
a checkpoint whose parts were swapped or edited (the weights would read another item table or
tokenizer without any error), naming the file.

A save is atomic as a whole. The tensors of step N go to files named after N (each written to a
temporary name, flushed to disk and renamed), and only then is config.json replaced: that one rename
is the commit. A crash at any moment before it leaves config.json naming the previous step's files,
which are untouched; the files of the step that did not finish are deleted at once if the save
failed with an error (a full disk), or else by the next save, before it writes anything. The
tensor files also carry their step in their metadata, which load() checks against config.json.

    python -m nanocrs.checkpoint export --ckpt out/smol --out out/smol-hf   # a Hugging Face folder, LoRA merged
"""

import hashlib
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file, load_file

from nanocrs.common import TMP_NAME, atomic_path, lock_folder, out_of_range
from nanocrs.data import BOUND_FILES, DataError, check_catalogue, fingerprint, load_items
from nanocrs.heads import Heads, HeadsConfig
from nanocrs.model import GPT, GPTConfig
from nanocrs.quantizer import SemanticIDs
from nanocrs.tokenizer import Tokenizer, added_tokens

REQUIRED = ("config.json", "tokenizer.json", "sids.json", "items.jsonl")  # + the files config.json names
_STEP_FILE = re.compile(r"^(model|optimizer)-\d+\.safetensors$")
LOCK_FILE = "train.lock"


class CheckpointError(ValueError):
    """A checkpoint folder that can not be used; one line, naming the folder and the problem."""


def _save_tensors(tensors: dict, path: str, metadata: dict):
    with atomic_path(path, fsync=True) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as e:  # safetensors reports a full disk as its own error type: one line, as an OSError
            raise OSError(f"{path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None


def part_hashes(folder: str) -> dict:
    """sha256 of each of the files a checkpoint's weights only work with (data.BOUND_FILES)."""
    out = {}
    for name in BOUND_FILES:
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def model_state(model: GPT, trainable_only: bool = False) -> dict:
    """The tensors a checkpoint stores. trainable_only (LoRA runs): just the parameters that train
    (LoRA matrices, new token rows); the frozen backbone is read again from init_from on load."""
    if trainable_only:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    # tied weights are stored once (safetensors refuses shared storage)
    sd = dict(model.state_dict())
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _adapter_only(config: dict) -> bool:
    return bool(config.get("init_from")) and config.get("lora", {}).get("rank", 0) > 0


def _commit(out_dir: str, config: dict):
    """Replace config.json: the one rename that makes a save visible."""
    with atomic_path(os.path.join(out_dir, "config.json"), fsync=True) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=1)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def save_static(out_dir: str, tokenizer, sids, items_path: str):
    """The files that never change during a run: tokenizer, semantic-ID table and catalogue (train.py
    writes them once, before its first step)."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    sids.save(os.path.join(out_dir, "sids.json"))
    with atomic_path(os.path.join(out_dir, "items.jsonl"), fsync=True) as tmp:
        shutil.copyfile(items_path, tmp)


def save(out_dir: str, model: GPT, config: dict, optimizer=None):
    """Write the weights (and optimizer state) of config["step"] and then config.json, atomically as a
    whole (see the top of this file). The static files come from save_static. A save that fails (a
    full disk) removes what it wrote, so the last checkpoint stays and the space is free again."""
    os.makedirs(out_dir, exist_ok=True)
    step = config["step"]
    meta = {"step": str(step)}
    files = {"model": f"model-{step:06d}.safetensors"}
    if optimizer is not None:
        files["optimizer"] = f"optimizer-{step:06d}.safetensors"
    committed = _committed_files(out_dir)
    _remove_leftovers(out_dir, keep=committed)  # a killed save's files: first, for the room they take
    try:
        _save_tensors(model_state(model, _adapter_only(config)), os.path.join(out_dir, files["model"]), meta)
        if optimizer is not None:
            tensors, hyper = optimizer_state(optimizer)
            _save_tensors(tensors, os.path.join(out_dir, files["optimizer"]), {**meta, "hyper": json.dumps(hyper)})
        _commit(out_dir, {**config, "files": files, "parts": part_hashes(out_dir)})
    except OSError as e:
        committed = _committed_files(out_dir)  # config.json may have been replaced before the error
        _remove_leftovers(out_dir, keep=committed)
        last = f"step {read_config(out_dir)['step']}" if committed else "none"
        raise CheckpointError(f"{out_dir}: could not save step {step} ({e.strerror or e}); its files are removed, "
                              f"the last checkpoint stays ({last})") from None
    # the previous step's tensors, and those of a save that crashed before its commit
    _remove_leftovers(out_dir, keep=set(files.values()))


def _committed_files(out_dir: str) -> set:
    """The tensor files the current config.json names (none before the first save)."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            files = json.load(f).get("files", {})
        return {v for v in files.values() if isinstance(v, str)}
    except (OSError, ValueError, AttributeError):
        return set()


def _remove_leftovers(out_dir: str, keep: set):
    """Delete the step files not in keep and the temporary files of train.py's interrupted writes
    (those of other writers, such as sample.py --calibrate, may still be in use)."""
    for name in os.listdir(out_dir):
        tmp = TMP_NAME.match(name) or re.match(r"^(.+)\.tmp$", name)  # and the fixed FILE.tmp of older versions
        if (_STEP_FILE.match(name) and name not in keep) or (
                tmp and (_STEP_FILE.match(tmp.group(1)) or tmp.group(1) in ("config.json", "log.jsonl") + BOUND_FILES)):
            os.remove(os.path.join(out_dir, name))


def claim(out: str, resume: bool):
    """Take --out for one train.py: refuse a prepared dataset, and (without --resume) a folder that
    holds files train.py did not make (a custom --raw folder's items.jsonl would be replaced); then
    lock it (common.FolderLock), so a second training into it fails instead of interleaving."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"--out {out} is a file, not a folder")
    if os.path.isfile(os.path.join(out, "dataset.json")):
        raise CheckpointError(f"--out {out} is a prepared dataset (dataset.json): train.py never writes into one; "
                              "choose another --out")
    if not resume and os.path.isfile(os.path.join(out, "config.json")):
        raise CheckpointError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    if not resume and os.path.isdir(out) and not os.path.exists(os.path.join(out, LOCK_FILE)):
        others = sorted(os.listdir(out))
        if others:
            raise CheckpointError(f"--out {out} is not empty and train.py did not make it (it holds {', '.join(others[:3])}"
                                  f"{', ...' if len(others) > 3 else ''}): choose a new or empty folder")
    os.makedirs(out, exist_ok=True)
    return lock_folder(out, LOCK_FILE, "train.py")


def optimizer_state(opt: torch.optim.Optimizer):
    """AdamW state as flat tensors {"<param index>.<name>": tensor} plus JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"{idx}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, sd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, ckpt_dir: str, step: int):
    name = read_config(ckpt_dir)["files"].get("optimizer")
    path = os.path.join(ckpt_dir, name or "optimizer-*.safetensors")
    if not name or not os.path.isfile(path):
        raise CheckpointError(f"{path}: the optimizer state is missing, can not resume")
    saved_step, flat = _read_tensors(path)
    if saved_step != step:
        raise CheckpointError(f"{path}: optimizer state of step {saved_step}, config.json is at step {step}")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    state = {}
    for key, v in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = json.loads(meta["hyper"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _read_tensors(path: str) -> tuple[int, dict]:
    """(step in the metadata, tensors) of one file; a damaged file is a one-line CheckpointError."""
    try:
        with safe_open(path, "pt") as f:
            step = int(f.metadata()["step"])
        return step, load_file(path)
    except Exception as e:  # SafetensorError, a bad header, missing metadata: the file is not usable
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable safetensors file ({first}); the checkpoint is damaged") from None


def read_config(ckpt_dir: str) -> dict:
    """config.json, after checking that every file the checkpoint needs is there."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: checkpoint folder not found (train one with: python train.py --out {ckpt_dir})")
    config = None
    if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        try:
            with open(os.path.join(ckpt_dir, "config.json")) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{ckpt_dir}/config.json: invalid JSON ({e.msg})") from None
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("files"), dict)
                                   and "model" in config["files"]):
        raise CheckpointError(f"{ckpt_dir}/config.json names no tensor files: not a checkpoint of this version")
    if config is not None:
        check_config(config, os.path.join(ckpt_dir, "config.json"))
    needed = REQUIRED + ((config["files"]["model"],) if config is not None else ())
    missing = [f for f in needed if not os.path.isfile(os.path.join(ckpt_dir, f))]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: not a complete checkpoint, missing {', '.join(missing)}")
    return config


_MODEL_RANGES = {"dropout": (0, 1, "[)"), "head_dim": (0, None, "[]"), "intermediate_size": (0, None, "[]"),
                 "rope_theta": (0, None, "(]"), "rms_norm_eps": (0, None, "(]")}  # other numbers: >= 1


def model_config(config: dict) -> GPTConfig:
    """config.json's model shape; before issue 30 it also held the heads' spec ("pointer"), HeadsConfig's now."""
    return GPTConfig.from_dict({k: v for k, v in config["model"].items() if k != "pointer"})


def check_config(config: dict, path: str):
    """Every value of config.json that load() and train.py --resume use, of the right type and range:
    one line naming the file and the key (a null file name or n_head 0 would fail deep inside)."""
    def bad(key, why):
        raise CheckpointError(f"{path}: {key} {why}")
    for kind, name in config["files"].items():
        if kind not in ("model", "optimizer") or not isinstance(name, str) or not _STEP_FILE.match(name) \
                or not name.startswith(kind):
            bad(f"files.{kind}", f"must name a {kind}-NNNNNN.safetensors file in the folder, got {name!r}")
    why = out_of_range(config.get("step"), 0, None, integer=True)
    if why:
        bad("step", why)
    for key, kind in (("model", dict), ("train", dict), ("lora", dict), ("init_from", str), ("data", str),
                      ("fingerprint", str), ("parts", dict)):
        if key in config and not isinstance(config[key], kind):
            bad(key, f"must be a JSON {'object' if kind is dict else 'string'}, got {config[key]!r}")
    if "model" not in config:
        bad("model", "is missing")
    try:  # the heads (nanocrs/heads.py), or before issue 30 the model's "pointer" spec
        HeadsConfig.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        bad("heads", f"is not a heads config of this version ({e})")
    why = out_of_range(config.get("world", 1), 1, None, integer=True)
    if why:
        bad("world", why)
    for key, value in config.get("parts", {}).items():
        if key not in BOUND_FILES or not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
            bad(f"parts.{key}", f"must be the sha256 of one of {', '.join(BOUND_FILES)}, got {value!r}")
    lora = config.get("lora", {})
    for key, lo, hi, bounds, integer in (("rank", 0, None, "[]", True), ("alpha", 0, None, "()", False),
                                          ("dropout", 0, 1, "[)", False)):
        why = out_of_range(lora[key], lo, hi, bounds, integer) if key in lora else None
        if why:
            bad(f"lora.{key}", why)
    # the model's shape: each field of GPTConfig typed as its default; the sizes positive
    model, defaults = config["model"], GPTConfig().to_dict()
    for key, value in model.items():
        default = defaults.get(key)
        if key == "pointer":  # the heads' home before issue 30 (HeadsConfig.from_config reads it)
            continue
        if key not in defaults:
            bad(f"model.{key}", "is not a field of this version's GPTConfig")
        elif isinstance(default, (bool, dict)):
            if not isinstance(value, type(default)):
                bad(f"model.{key}", f"must be {'true or false' if isinstance(default, bool) else 'a JSON object'}, got {value!r}")
        else:
            lo, hi, bounds = _MODEL_RANGES.get(key, (1, None, "[]"))
            why = out_of_range(value, lo, hi, bounds, integer=isinstance(default, int))
            if why:
                bad(f"model.{key}", why)
    try:
        model_config(config)
    except (AssertionError, TypeError, ValueError) as e:
        bad("model", f"is not a valid model shape ({e})")


def load(ckpt_dir: str, device="cpu", merge: bool = False, dtype: torch.dtype | None = None,
         quantize: str | None = None):
    """(model, config dict, tokenizer, sids) from a checkpoint folder. A fine-tuned pretrained
    backbone is rebuilt from its init_from first, its frozen weights in `dtype` (default: bf16 on
    CUDA, fp32 elsewhere; what trained is fp32 either way) and quantized as config["quantize"] says
    (or as `quantize` overrides it: "nf4" over a 16-bit run, "none" to drop the 4-bit base). merge=True
    folds LoRA in for inference, but only into fp32 weights: folding a small update into bf16 weights
    rounds most of it away and bf16 logits tie close items, so over a 16-bit or 4-bit base the fp32
    adapters stay unmerged (they cost 2r(in + out) FLOPs per token against the base's 2 in out) and
    the new tokens' logits are fp32."""
    config = read_config(ckpt_dir)
    check_parts(ckpt_dir, config)
    quantize = quantize or config.get("quantize", "none")
    cfg = model_config(config)
    heads = HeadsConfig.from_config(config)
    sids = SemanticIDs.load(os.path.join(ckpt_dir, "sids.json"))
    if config.get("init_from"):
        from nanocrs.backbone import prepare
        lora = config.get("lora", {})
        model, _, _ = prepare(config["init_from"], added_tokens(sids), cfg.block_size,
                              lora.get("rank", 0), lora.get("alpha", 1.0), lora.get("dropout", 0.0), device, dtype,
                              quantize, config.get("train", {}).get("embed_train", "new"))
        if heads is not None:
            model.add_heads(Heads(cfg.n_embd, heads))
    else:
        model = GPT(cfg, heads=(lambda n: Heads(n, heads)) if heads is not None else None)
    path = os.path.join(ckpt_dir, config["files"]["model"])
    step, sd = _read_tensors(path)
    sd = {"heads." + k[len("pointer."):] if k.startswith("pointer.") else k: v for k, v in sd.items()}  # before issue 30
    if step != config["step"]:
        raise CheckpointError(f"{path}: weights of step {step}, config.json is at step {config['step']}")
    # training never saves non-finite weights (train.save), so any here are damage, not a model
    broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {', '.join(broken[:3])}"
                              f"{' and others' if len(broken) > 3 else ''}; the checkpoint is damaged")
    adapter = _adapter_only(config)
    expected = set(model_state(model, adapter))
    if set(sd) != expected:
        raise CheckpointError(f"{ckpt_dir}: weight names do not match the config (missing {sorted(expected - set(sd))[:3]}, unexpected {sorted(set(sd) - expected)[:3]})")
    model.load_state_dict(sd, strict=not (cfg.tie_embeddings or adapter))
    model.to(device)
    if merge and config.get("init_from") and model.norm.weight.dtype == torch.float32 and quantize == "none":
        from nanocrs.backbone import merged
        merged(model)
    tok = Tokenizer.load(os.path.join(ckpt_dir, "tokenizer.json"))
    if len(tok) != cfg.vocab_size:
        raise CheckpointError(f"{ckpt_dir}: tokenizer has {len(tok)} tokens but the model expects {cfg.vocab_size}")
    try:
        check_catalogue(ckpt_dir, [it["id"] for it in load_items(os.path.join(ckpt_dir, "items.jsonl"))], sids, tok)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    return model, config, tok, sids


def check_parts(ckpt_dir: str, config: dict):
    """The checkpoint's tokenizer.json, sids.json and items.jsonl are the files it was trained with:
    each file's sha256 against config.json's "parts" (checkpoints from before them: the dataset
    fingerprint, which a model trained from scratch shares with its data)."""
    parts = config.get("parts")
    if parts:
        now = part_hashes(ckpt_dir)
        for name in BOUND_FILES:
            if name in parts and now[name] != parts[name]:
                raise CheckpointError(f"{os.path.join(ckpt_dir, name)}: not the file this checkpoint was saved with "
                                      f"(its sha256 differs from config.json's); {', '.join(BOUND_FILES)} and the "
                                      "weights only work together: restore it, or train again")
    elif config.get("fingerprint") and not config.get("init_from") and fingerprint(ckpt_dir) != config["fingerprint"]:
        raise CheckpointError(f"{ckpt_dir}: its {', '.join(BOUND_FILES)} are not the files it was trained with "
                              "(fingerprint in config.json differs): restore them, or train again")


def check_data(config: dict, data_dir: str):
    """Refuse a dataset folder other than the one the checkpoint was trained on: its items, IDs and
    tokenizer must be the same files (checkpoints from before the fingerprint: the same catalogue)."""
    want = config.get("fingerprint")
    if want is None:
        return
    if fingerprint(data_dir) != want:
        raise CheckpointError(f"{data_dir}: not the dataset this checkpoint was trained on (its items, IDs or tokenizer "
                              f"differ from those of {config.get('data', 'the training data')}); "
                              "pass that --data, or train into a new --out")


# -----------------------------------------------------------------------------
# command line: a checkpoint as a Hugging Face folder (here, not in hf.py: hf.py knows no checkpoint)

def main(argv=None):
    import argparse
    from nanocrs.common import init_device
    from nanocrs.hf import export_hf
    p = argparse.ArgumentParser(prog="python -m nanocrs.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd = p.add_subparsers(dest="command", required=True)
    e = cmd.add_parser("export", help="write a checkpoint of train.py as a Hugging Face folder (LoRA merged)")
    e.add_argument("--ckpt", required=True, help="checkpoint folder written by train.py")
    e.add_argument("--out", required=True, help="folder to write: config.json, model.safetensors, tokenizer.json")
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    model, _, tok, _ = load(a.ckpt, init_device(a.device, a.threads), merge=True)
    export_hf(model, tok, a.out)
    print(f"wrote {a.out} (config.json, model.safetensors, tokenizer.json)")
    if model.heads is not None:
        print("note: the heads (train.py --heads) are not exported: transformers runs the plain language model")


if __name__ == "__main__":
    from nanocrs.common import run_script
    run_script(main)
