"""
Checkpoints: the one place that writes and reads them, and that turns a name or a folder into a model.

A checkpoint is out_dir/ckpt.pt: a dict of tensors and plain values (model weights, "model_config", and whatever the
writer adds: optimizer state, RNG state, labels, ...), written atomically and read with torch.load(weights_only=True),
which refuses to unpickle anything else. The tokenizer files lie beside it, so the folder alone is enough.

    model, tokenizer, checkpoint = load_model("out-wikitext-small")     # or "gpt2", or a Hugging Face folder
    model, tokenizer, _ = load_for_inference("out-wikitext-small", device="auto", dtype="auto", quantize="none")
"""

import os

import torch

from cli import UserError
from common import atomic_write
from gpt2 import is_gpt2, load_gpt2
from model import GPT, GPTConfig
from quantize import quantize_int8
from runtime import compile_or_eager, pick_device, pick_dtype
from tokenizer import load_tokenizer

CHECKPOINT_NAME = "ckpt.pt"


def is_checkpoint(folder):
    return os.path.isfile(os.path.join(folder, CHECKPOINT_NAME))


def save_checkpoint(checkpoint, out_dir):
    """Write out_dir/ckpt.pt atomically: a crash mid-save leaves the previous checkpoint intact. Returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    return atomic_write(os.path.join(out_dir, CHECKPOINT_NAME), lambda tmp: torch.save(checkpoint, tmp))


def read_checkpoint(out_dir, map_location="cpu"):
    """The checkpoint dict of out_dir, loaded without unpickling arbitrary objects."""
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py ...) or fix --out_dir")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise UserError(f"cannot read checkpoint {path}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("model_config"), dict)):
        raise UserError(f"{path} is not a checkpoint of this project (it lacks the model's weights or shape): "
                        f"give a folder that train.py wrote")
    return checkpoint


def load_model(name_or_dir, device="cpu", dropout=None, cache_dir="data/cache", tokenizer_dir=""):
    """(GPT in eval mode, tokenizer, checkpoint dict) from a train.py or finetune_instruct.py folder, or GPT-2:
    gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once into cache_dir) or a Hugging Face folder, with an
    empty checkpoint dict. dropout: None keeps the model's own; tokenizer_dir: GPT-2 only, where its tokenizer is."""
    name_or_dir = str(name_or_dir)
    if not is_checkpoint(name_or_dir) and is_gpt2(name_or_dir):
        model, tokenizer = load_gpt2(name_or_dir, cache_dir, tokenizer_dir, dropout or 0.0, device)
        return model, tokenizer, {}
    checkpoint = read_checkpoint(name_or_dir, map_location=device)
    if "labels" in checkpoint:
        raise UserError(f"{name_or_dir} holds a fine-tuned classifier, not a language model: give the folder of a "
                        f"model that train.py or finetune_instruct.py wrote")
    config = checkpoint["model_config"] | ({} if dropout is None else {"dropout": dropout})
    model = GPT(GPTConfig(**config))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), load_tokenizer(name_or_dir), checkpoint


def load_for_inference(name_or_dir, device="auto", dtype="auto", quantize="none", compile=False):
    """(model, tokenizer, checkpoint dict) ready to generate or score: on `device`, weights in `dtype` (the rule of
    runtime.pick_dtype), optionally int8 (CPU, float32) and compiled."""
    if quantize not in ("none", "int8"):
        raise UserError(f"--quantize must be none or int8, got '{quantize}'")
    device = "cpu" if quantize == "int8" and device == "auto" else pick_device(device)
    ptdtype = pick_dtype("float32" if quantize == "int8" and dtype == "auto" else dtype, device)
    if quantize == "int8" and (device != "cpu" or ptdtype != torch.float32):
        raise UserError("--quantize=int8 runs on the CPU in float32: add --device=cpu --dtype=float32 "
                        "(on a GPU use --dtype=bfloat16 instead)")
    model, tokenizer, checkpoint = load_model(name_or_dir, device)
    model.to(dtype=ptdtype)  # weights in the compute dtype: no autocast needed, and the KV cache follows them
    if quantize == "int8":
        quantize_int8(model)
    if compile:
        compile_decoding(model, device)
    return model, tokenizer, checkpoint


def compile_decoding(model, device):
    """torch.compile the one-token decode step, the step that generation repeats; on a GPU with CUDA graphs
    ("reduce-overhead"), which replay the whole step as one launch. With a static KVCache its shapes never change,
    so it compiles once. The prompt's prefill runs eagerly. Where compiling fails: a warning, and eager decoding."""

    def warm_up(decode):
        model.decode_one_token = decode
        for _ in model.generate_tokens(torch.zeros(1, 3, dtype=torch.long, device=device), 3, temperature=0):
            pass

    model.static_kv_cache = True  # the same shapes at every step: one graph
    mode = "reduce-overhead" if device.startswith("cuda") else "default"
    model.decode_one_token = compile_or_eager(model.decode_one_token, warm_up, mode=mode, fullgraph=True)
