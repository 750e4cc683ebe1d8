"""
A run's folder and its checkpoint: the one place that writes and reads ckpt.pt and the log beside
it, decides what a run may write into a folder and what a resumed run goes on with, and turns a
folder (or a GPT-2 name) into a model.

A checkpoint is out_dir/ckpt.pt: a dict of tensors and plain values (model weights, "model_config",
and whatever the writer adds: optimizer state, RNG state, labels, ...), written atomically and read
with torch.load(weights_only=True), which refuses to unpickle anything else. The tokenizer files lie
beside it, so the folder alone is enough.

    model, tokenizer, checkpoint = load_model("out-wikitext-tiny")  # or "gpt2", or a HF folder
"""

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import sys

import torch

from cli import UserError, parse_config
from files import atomic_write, check_writable, sha256_of, write_json
from model import GPT, GPTConfig
from tokenizer import BPETokenizer

CHECKPOINT_NAME = "ckpt.pt"


def is_checkpoint(folder):
    return os.path.isfile(os.path.join(folder, CHECKPOINT_NAME))


def check_out_dir(out_dir, fresh, overwrite):
    """Refuse, before any work, a run that would harm out_dir or could not save there: no name, a
    file in its place, a folder it cannot write into, or a trained model that a run from scratch
    (fresh) would replace without overwrite."""
    if not out_dir:
        raise UserError("--out_dir is empty: name the folder to write into (--out_dir=out)")
    check_writable(out_dir, "out_dir")
    if fresh and is_checkpoint(out_dir) and not overwrite:
        raise UserError(f"{out_dir} holds a trained model: continue it with --init_from=resume, "
                        f"choose another --out_dir, or replace it with --overwrite=True")


def save_checkpoint(checkpoint, out_dir):
    """Write out_dir/ckpt.pt atomically: a crash mid-save leaves the previous checkpoint intact.
    Returns its path. A write that fails is an OSError, as a full disk is for every other file
    (torch.save raises RuntimeError)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    try:
        return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    # "[enforce fail at inline_container.cc:...] . PytorchStreamWriter failed writing ...";
    # its usual cause, a full disk, says only "unexpected pos"
    except RuntimeError as e:
        first = (str(e).splitlines() or [""])[0]
        reason = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", first)[:100]
        free = shutil.disk_usage(out_dir).free / 1e6
        message = f"cannot write the checkpoint ({reason}; {free:,.1f} MB free there)"
        raise OSError(errno.EIO, message, path) from None


def checkpoint_sha256(folder):
    """The sha256 of folder/ckpt.pt, the weights a result was measured on (audit.py records it
    beside each result; the export's model card reports only the results of these weights); None
    without one."""
    path = os.path.join(folder, CHECKPOINT_NAME)
    return sha256_of(path) if os.path.isfile(path) else None


def record_result(folder, key, result):
    """Merge a result measured on a model folder's weights into its audit.json under key (audit.py's
    checks, evaluate.py's scores), atomically, with the checkpoint's sha256: export.py's model card
    reports only its own weights' results. Returns the file's path; None where the model is not a
    folder (a GPT-2 name), or it cannot be written (a warning: the measurement is not lost)."""
    if not os.path.isdir(folder):
        return None
    path = os.path.join(folder, "audit.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError):  # none yet, or a damaged file: nothing in it to keep
        results = {}
    results = results if isinstance(results, dict) else {}
    results[key] = result | {"checkpoint_sha256": checkpoint_sha256(folder)}
    try:
        return write_json(path, results)
    except OSError as e:  # a read-only folder, a full disk
        print(f"warning: could not write {path} ({e.strerror or e})", file=sys.stderr)
        return None


def read_checkpoint(out_dir, map_location="cpu"):
    """The checkpoint dict of out_dir, loaded without unpickling arbitrary objects, after checking
    that its model_config describes a GPT that its weights can fill (see check_model_config)."""
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py ...) or fix "
                        f"the folder's name")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: {first}")
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("model_config"), dict)):
        raise UserError(f"{path} is not a checkpoint of this project (it lacks the model's weights "
                        f"or shape): give a folder that train.py wrote")
    check_model_config(checkpoint, path)
    return checkpoint


def check_model_config(checkpoint, path):
    """Refuse, in one line and before any model is built, a model_config that is not a GPTConfig (an
    unknown key, a value of the wrong type, a shape GPTConfig refuses) or that describes more
    parameters than the weights hold."""
    config = checkpoint["model_config"]
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    problem = None
    for name, value in config.items():
        expected = type(defaults.get(name))
        if name not in defaults:
            problem = f"an unknown key '{name}'"
        # (True is not an int here)
        elif not (type(value) is expected or expected is float and type(value) is int):
            problem = f"{name}={value!r}, not {expected.__name__}"
        if problem:
            break
    if problem is None:
        try:
            needed = GPTConfig(**config).num_params()
        except ValueError as e:
            problem = str(e)
    if problem is None:
        held = sum(t.numel() for t in checkpoint["model"].values() if isinstance(t, torch.Tensor))
        if needed > held:
            problem = f"it describes {needed:,} parameters and the weights hold {held:,}"
    if problem:
        raise UserError(f"{path}: its model_config does not fit its weights ({problem}): the file "
                        f"was edited or damaged; train or copy it again")


def load_weights(module, weights, path):
    """module.load_state_dict(weights), every tensor present and of its shape, or one line naming
    the first that is not."""
    try:
        module.load_state_dict(weights)
    # "Error(s) in loading state_dict for GPT:\n\tMissing key(s) ...": the second line says which
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{path}: its model_config does not fit its weights ({lines[-1][:200]}): "
                        f"the file was edited or damaged; train or copy it again")


def read_tokenizer(folder):
    """The tokenizer saved in a folder, or one line that says what is wrong with its files."""
    try:
        return BPETokenizer.load(folder)
    except ValueError as e:
        raise UserError(str(e)) from None


def check_tokenizer(tokenizer, folder, vocab_size, owner, fix):
    """The tokenizer of a folder, refused in one line unless it has the vocab_size ids its owner
    (a model, or the folder's meta.json) counts on."""
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"vocab mismatch: the tokenizer in {folder} has {tokenizer.vocab_size:,} "
                        f"ids and {owner} {vocab_size:,}: {fix}")
    return tokenizer


def load_folder_tokenizer(folder, checkpoint):
    """The tokenizer beside a checkpoint, refused in one line unless it is the one the model was
    trained with: as many ids, and the same fingerprint where the checkpoint records it."""
    fix = ("copy the tokenizer files (vocab.json, merges.txt) of the run's data folder beside "
           "ckpt.pt")
    tokenizer = check_tokenizer(read_tokenizer(folder), folder,
                                checkpoint["model_config"]["vocab_size"], "its model", fix)
    if checkpoint.get("tokenizer_sha256") not in (None, tokenizer.fingerprint()):
        raise UserError(f"the tokenizer in {folder} is not the one its model was trained with: "
                        f"{fix}")
    return tokenizer


def unknown_word(folder):
    """The marker a model's training data wrote for rare words, from the meta.json beside it
    ('<unk>' in the tokenized WikiText-2), or None: no marker, or no meta.json (GPT-2)."""
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            word = json.load(f).get("unknown_word")
    except (OSError, ValueError, AttributeError):
        return None
    return word if isinstance(word, str) and word else None


def load_model(name_or_dir, device="cpu", dropout=None, cache_dir="data/cache", tokenizer_dir=""):
    """(GPT in eval mode, tokenizer, checkpoint dict) from a train.py or finetune_instruct.py
    folder, or GPT-2: gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once into cache_dir) or
    a Hugging Face folder, with an empty checkpoint dict. dropout: None keeps the model's own;
    tokenizer_dir: GPT-2 only, where its tokenizer is."""
    name_or_dir = str(name_or_dir)
    if not is_checkpoint(name_or_dir):
        from gpt2 import is_gpt2, load_gpt2  # GPT-2's weights: only when asked for
        if is_gpt2(name_or_dir):
            model, tokenizer = load_gpt2(name_or_dir, cache_dir, tokenizer_dir, dropout or 0.0,
                                         device)
            return model, tokenizer, {}
    checkpoint = read_checkpoint(name_or_dir, map_location=device)
    if "labels" in checkpoint:
        raise UserError(f"{name_or_dir} holds a fine-tuned classifier, not a language model: give "
                        f"the folder of a model that train.py or finetune_instruct.py wrote")
    config = checkpoint["model_config"] | ({} if dropout is None else {"dropout": dropout})
    model = GPT(GPTConfig(**config))
    load_weights(model, checkpoint["model"], os.path.join(name_or_dir, CHECKPOINT_NAME))
    return model.to(device).eval(), load_folder_tokenizer(name_or_dir, checkpoint), checkpoint


# ----------------------------------------------------------------------------- a training run

# What a trained model, its optimizer state and its random streams cannot change when it resumes
# (its dropouts can, and a shorter context); the token table's own rate is a group of its own
FIXED_ON_RESUME = {f.name for f in dataclasses.fields(GPTConfig) if "dropout" not in f.name} - {
    "vocab_size", "block_size"} | {"optimizer", "seed", "embedding_learning_rate"}
# What each command says for itself, in its config file or its flags, resumed or not
OWN_SETTINGS = ("out_dir", "init_from", "overwrite")


def resume_run(config):
    """The training run a command goes on with: (its settings, its state, notices). From scratch:
    the command's settings (config) at iteration 0. --init_from=resume: the run in out_dir, with the
    settings it was started with (resume_settings), from its checkpoint. Refused: a change its
    model's shape or optimizer cannot take, other data, a max_iters it has passed, a longer
    context."""
    check_out_dir(config.out_dir, fresh=config.init_from == "scratch", overwrite=config.overwrite)
    if config.init_from == "scratch":
        return config, {"iter_num": 0, "best_val_loss": float("inf"), "log_rows": []}, []
    out_dir, checkpoint = config.out_dir, read_checkpoint(config.out_dir)
    if "iter_num" not in checkpoint or "optimizer" not in checkpoint:
        raise UserError(f"{out_dir} holds a model that train.py did not write (fine-tuned, or "
                        f"exported), so there is no run to resume: start one from scratch in "
                        f"another --out_dir")
    config, notices = resume_settings(config, checkpoint, FIXED_ON_RESUME, OWN_SETTINGS)
    trained_with = checkpoint.get("tokenizer_sha256") or read_tokenizer(out_dir).fingerprint()
    if trained_with != read_tokenizer(config.data_dir).fingerprint():
        raise UserError(f"{config.data_dir} was tokenized with another tokenizer than the "
                        f"checkpoint in {out_dir}: resume with the data it was trained on")
    at, block_size = checkpoint["iter_num"], checkpoint["model_config"]["block_size"]
    if at > config.max_iters:
        raise UserError(f"the checkpoint is at iteration {at}, and --max_iters={config.max_iters}: "
                        f"raise --max_iters (and --lr_decay_iters) to train on")
    if config.block_size > block_size:
        raise UserError(f"block_size={config.block_size} is beyond the model's {block_size} "
                        f"positions")
    if at == config.max_iters:
        notices.append(f"{out_dir} is trained to --max_iters={at} already: nothing to do (raise "
                       f"--max_iters and --lr_decay_iters to train on)")
    return config, checkpoint | {"log_rows": read_log(out_dir, at)}, notices


def resume_settings(config, checkpoint, fixed, own):
    """The settings a run goes on with, and the lines that say what differs: those its checkpoint
    was started with, this command's flags on top, and its `own` settings (config's: from its config
    file and flags); a change to a `fixed` setting is refused. An older checkpoint keeps only its
    model's shape: the command's settings for the rest."""
    saved = checkpoint.get("train_config")
    if not isinstance(saved, dict):
        shape = {k: v for k, v in checkpoint["model_config"].items() if k != "vocab_size"}
        saved = dataclasses.asdict(config) | shape
    saved = {k: v for k, v in saved.items() if k not in own}
    resumed = parse_config(type(config), base=saved | {k: getattr(config, k) for k in own})
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(resumed).items()
               if k in saved and saved[k] != v}
    for name in sorted(fixed & changed.keys())[:1]:
        raise UserError(f"--{name} cannot change when resuming: the run was trained with "
                        f"{name}={saved[name]!r}; drop the flag, or start a new run in another "
                        f"--out_dir")
    # the config file's values (neither the default nor a flag's) that the run's own replace
    default = dataclasses.asdict(type(config)())
    from_file = [k for k, v in dataclasses.asdict(config).items()
                 if k in saved and v not in (default[k], getattr(resumed, k))]
    notices = []
    if from_file:
        notices.append("resuming with the run's own settings, not the config file's: " + ", ".join(
            f"{k}={saved[k]!r} (the file says {getattr(config, k)!r})" for k in from_file)
            + "; a --name=value flag changes one")
    if changed:
        notices.append("changed from the run's settings by this command: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return resumed, notices


def training_checkpoint(model, optimizer, scaler, data_generator, average=None, **values):
    """What a training run's checkpoint holds: all that resuming needs to go on exactly (weights,
    model_config, the optimizer's and the fp16 loss scaler's state, the random streams), and
    `values`. With an average (muon.Average) of the weights, the model is the average (what
    evaluate.py and sample.py read) and the trained weights lie beside it as trained_model."""
    rng = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if next(model.parameters()).is_cuda:
        rng["cuda"] = torch.cuda.get_rng_state()
    weights = {"model": model.state_dict()}
    if average is not None:
        weights = {"model": average.model.state_dict(), "trained_model": model.state_dict()}
    return weights | {"model_config": dataclasses.asdict(model.config), "rng": rng,
                      "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), **values}


def restore_training(checkpoint, model, optimizer, scaler, data_generator, out_dir, average=None):
    """Put a training run back where its checkpoint stopped. The optimizer keeps the settings it was
    made with (weight decay, betas, its learning-rate scale): only its state is the checkpoint's.
    An average starts from the checkpoint's (from its weights, where the run kept none)."""
    load_weights(model, checkpoint.get("trained_model", checkpoint["model"]), out_dir)
    if average is not None:
        load_weights(average.model, checkpoint["model"], out_dir)
    made = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (KeyError, ValueError, TypeError):
        raise UserError(f"the optimizer state in {out_dir} is not this optimizer's: resume with "
                        f"the --optimizer it was trained with")
    for group, settings in zip(optimizer.param_groups, made):
        group.update(settings)
    if checkpoint["scaler"]:  # (empty unless the run trained in float16)
        scaler.load_state_dict(checkpoint["scaler"])
    data_generator.set_state(checkpoint["rng"]["data"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if "cuda" in checkpoint["rng"] and next(model.parameters()).is_cuda:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])


def read_log(out_dir, up_to_iter):
    """The rows of out_dir/log.jsonl up to an iteration: those that its checkpoint has seen."""
    path = os.path.join(out_dir, "log.jsonl")
    rows = []
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            with contextlib.suppress(ValueError):  # a line cut short by a crash
                rows.append(json.loads(line))
    return [row for row in rows if row.get("iter", 0) <= up_to_iter]


def save_run(out_dir, log_rows, settings, meta, tokenizer, checkpoint=None):
    """Write a training run's checkpoint (if given: it records the settings and the tokenizer's
    fingerprint too), then what makes out_dir usable alone: log.jsonl and its curve (loss.png),
    config.json (settings), the data's meta.json and the tokenizer the run trains with (from memory:
    no file name a data folder lists is followed), each atomically. A save that fails is one line,
    and the last checkpoint there stays intact."""
    try:
        if checkpoint is not None:
            checkpoint = checkpoint | {"train_config": settings,
                                       "tokenizer_sha256": tokenizer.fingerprint()}
            print(f"saved checkpoint to {save_checkpoint(checkpoint, out_dir)}")
        rows = "".join(json.dumps(row) + "\n" for row in log_rows)
        atomic_write(os.path.join(out_dir, "log.jsonl"),
                     lambda tmp: tmp.write_text(rows, encoding="utf-8"))
        write_json(os.path.join(out_dir, "config.json"), settings)
        write_json(os.path.join(out_dir, "meta.json"), meta)
        tokenizer.save(out_dir)
        plot_losses(log_rows, os.path.join(out_dir, "loss.png"))
    except OSError as e:  # a full disk, a read-only folder
        if is_checkpoint(out_dir):
            then = "the last checkpoint there is intact: free some space, then --init_from=resume"
        else:
            then = "nothing was saved: free some space and run it again"
        raise UserError(f"cannot save into {out_dir} ({e.strerror or e}); {then}")


def plot_losses(rows, png_path):
    """Train and val loss curves of log rows, as a PNG."""
    import matplotlib  # only when a run saves: loading a model stays fast
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        points = [(r["iter"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("iteration"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
