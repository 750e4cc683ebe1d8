"""
A run's folder and its checkpoint: the one place that writes and reads ckpt.pt and the log beside it, decides what a
run may write into a folder (and guards it while it does), and turns a folder (or a GPT-2 name) into a model.

A checkpoint is out_dir/ckpt.pt: a dict of tensors and plain values (model weights, "model_config", and whatever the
writer adds: optimizer state, RNG state, labels, ...), written atomically and read with torch.load(weights_only=True),
which refuses to unpickle anything else. The tokenizer files lie beside it, so the folder alone is enough.

    model, tokenizer, checkpoint = load_model("out-wikitext-tiny")      # or "gpt2", or a Hugging Face folder
"""

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch

from cli import UserError, atomic_write, check_writable, write_json
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

CHECKPOINT_NAME = "ckpt.pt"


def is_checkpoint(folder):
    return os.path.isfile(os.path.join(folder, CHECKPOINT_NAME))


def check_out_dir(out_dir, fresh, overwrite):
    """Refuse, before any work, a run that would harm out_dir or could not save there: a file in its place, a folder
    it cannot write into, or a trained model that a run from scratch (fresh) would replace without overwrite."""
    check_writable(out_dir, "out_dir")
    if fresh and is_checkpoint(out_dir) and not overwrite:
        raise UserError(f"{out_dir} holds a trained model: continue it with --init_from=resume, choose another "
                        f"--out_dir, or replace it with --overwrite=True")


def save_checkpoint(checkpoint, out_dir):
    """Write out_dir/ckpt.pt atomically: a crash mid-save leaves the previous checkpoint intact. Returns its path.
    A write that fails is an OSError, as a full disk is for every other file (torch.save raises RuntimeError)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    try:
        return atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    except RuntimeError as e:  # "[enforce fail at inline_container.cc:...] . PytorchStreamWriter failed writing ..."
        reason = re.sub(r"^\[enforce fail at [^\]]*\][ .]*", "", (str(e).splitlines() or [""])[0])[:100]
        free = shutil.disk_usage(out_dir).free / 1e6  # (its usual cause, a full disk, says only "unexpected pos")
        raise OSError(errno.EIO, f"cannot write the checkpoint ({reason}; {free:,.1f} MB free there)", path) from None


def read_checkpoint(out_dir, map_location="cpu"):
    """The checkpoint dict of out_dir, loaded without unpickling arbitrary objects, after checking that its
    model_config describes a GPT that its weights can fill (see check_model_config)."""
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py ...) or fix the folder's name")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise UserError(f"cannot read checkpoint {path}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("model_config"), dict)):
        raise UserError(f"{path} is not a checkpoint of this project (it lacks the model's weights or shape): "
                        f"give a folder that train.py wrote")
    check_model_config(checkpoint, path)
    return checkpoint


def check_model_config(checkpoint, path):
    """Refuse, in one line and before any model is built, a model_config that is not a GPTConfig (an unknown key, a
    value of the wrong type, a shape GPTConfig refuses) or that describes more parameters than the weights hold."""
    config, defaults = checkpoint["model_config"], {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    problem = None
    for name, value in config.items():
        expected = type(defaults.get(name))
        if name not in defaults:
            problem = f"an unknown key '{name}'"
        elif not (type(value) is expected or expected is float and type(value) is int):  # (True is not an int here)
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
        raise UserError(f"{path}: its model_config does not fit its weights ({problem}): the file was edited or "
                        f"damaged; train or copy it again")


def load_weights(module, weights, path):
    """module.load_state_dict(weights), every tensor present and of its shape, or one line naming the first that
    is not."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:  # "Error(s) in loading state_dict for GPT:\n\tMissing key(s) ...": the second line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UserError(f"{path}: its model_config does not fit its weights ({lines[-1][:200]}): the file was "
                        f"edited or damaged; train or copy it again")


def load_folder_tokenizer(folder, checkpoint):
    """The tokenizer beside a checkpoint, refused in one line unless it is the one the model was trained with: the
    same number of ids, and the same fingerprint where the checkpoint records it."""
    tokenizer = load_tokenizer(folder)
    vocab_size, recorded = checkpoint["model_config"]["vocab_size"], checkpoint.get("tokenizer_sha256")
    fix = "copy the tokenizer files (vocab.json, merges.txt) of the run's data folder beside ckpt.pt"
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"the tokenizer in {folder} has {tokenizer.vocab_size:,} ids and its model {vocab_size:,}: "
                        f"{fix}")
    if recorded not in (None, tokenizer.fingerprint()):
        raise UserError(f"the tokenizer in {folder} is not the one its model was trained with: {fix}")
    return tokenizer


def load_model(name_or_dir, device="cpu", dropout=None, cache_dir="data/cache", tokenizer_dir=""):
    """(GPT in eval mode, tokenizer, checkpoint dict) from a train.py or finetune_instruct.py folder, or GPT-2:
    gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once into cache_dir) or a Hugging Face folder, with an
    empty checkpoint dict. dropout: None keeps the model's own; tokenizer_dir: GPT-2 only, where its tokenizer is."""
    name_or_dir = str(name_or_dir)
    if not is_checkpoint(name_or_dir):
        from gpt2 import is_gpt2, load_gpt2  # GPT-2's weights: only when asked for
        if is_gpt2(name_or_dir):
            model, tokenizer = load_gpt2(name_or_dir, cache_dir, tokenizer_dir, dropout or 0.0, device)
            return model, tokenizer, {}
    checkpoint = read_checkpoint(name_or_dir, map_location=device)
    if "labels" in checkpoint:
        raise UserError(f"{name_or_dir} holds a fine-tuned classifier, not a language model: give the folder of a "
                        f"model that train.py or finetune_instruct.py wrote")
    config = checkpoint["model_config"] | ({} if dropout is None else {"dropout": dropout})
    model = GPT(GPTConfig(**config))
    load_weights(model, checkpoint["model"], os.path.join(name_or_dir, CHECKPOINT_NAME))
    return model.to(device).eval(), load_folder_tokenizer(name_or_dir, checkpoint), checkpoint


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an advisory lock on `folder` (made if missing) while the block runs: a second process that asks for it
    gets a UserError naming the first one's PID. The lock file, folder/.lock, goes when the lock does, and so does
    a folder made for it that is still empty. (Where there is no fcntl, as on Windows, nothing is locked.)"""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 20).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{folder} is in use by another run (PID {holder}): wait for it to end, or choose another "
                        f"--out_dir")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made and not any(folder.iterdir()):
            folder.rmdir()


# ----------------------------------------------------------------------------- a training run's folder

def read_log(out_dir, up_to_iter):
    """The rows of out_dir/log.jsonl up to an iteration: those that the checkpoint there has seen."""
    path = os.path.join(out_dir, "log.jsonl")
    rows = []
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            with contextlib.suppress(ValueError):  # a line cut short by a crash
                rows.append(json.loads(line))
    return [row for row in rows if row.get("iter", 0) <= up_to_iter]


def save_run(out_dir, log_rows, settings, source_dir, source_files, checkpoint=None):
    """Write a training run's checkpoint (if given), then what makes out_dir usable alone: log.jsonl and its curve
    (loss.png), config.json (settings) and the files of source_dir that it needs (meta.json, the tokenizer), each
    atomically. A save that fails is one line, and the last checkpoint there stays intact."""
    try:
        if checkpoint is not None:
            print(f"saved checkpoint to {save_checkpoint(checkpoint, out_dir)}")
        rows = "".join(json.dumps(row) + "\n" for row in log_rows)
        atomic_write(os.path.join(out_dir, "log.jsonl"), lambda tmp: tmp.write_text(rows, encoding="utf-8"))
        write_json(os.path.join(out_dir, "config.json"), settings)
        for name in source_files:
            source = os.path.join(source_dir, name)
            atomic_write(os.path.join(out_dir, name), lambda tmp: shutil.copyfile(source, tmp))
        plot_losses(log_rows, os.path.join(out_dir, "loss.png"))
    except OSError as e:  # a full disk, a read-only folder
        then = ("the last checkpoint there is intact: free some space, then --init_from=resume"
                if is_checkpoint(out_dir) else "nothing was saved: free some space and run it again")
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
