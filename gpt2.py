"""
GPT-2's format and ours, both ways. OpenAI's GPT-2 weights as our GPT: downloaded from the Hugging Face Hub (checked,
cached) or read from a local folder in Hugging Face's format (model.safetensors + config.json), without pickle and
without `transformers`. And our GPT as a GPT-2 (GPT2LMHeadModel), for export.py.

    model, tokenizer = load_gpt2("gpt2")              # gpt2 | gpt2-medium | gpt2-large | gpt2-xl, or a folder
    tensors, config = hf_state_dict(model), hf_config(model.config, eos_id=tokenizer.eot_id)
"""

import json
import os
import re
from pathlib import Path
from urllib.parse import urljoin

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cli import UserError
from model import GPT, GPTConfig
from tokenizer import GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256, load_tokenizer

GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 355M, 774M, 1558M parameters
HF_URL = "https://huggingface.co/{name}/resolve/main/{file}"
GPT2_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
TOKENIZER_SHA256 = {"vocab.json": GPT2_VOCAB_SHA256, "merges.txt": GPT2_MERGES_SHA256}
# Hugging Face's names -> ours. Their Conv1D layers store weights as (in, out); nn.Linear wants (out, in).
GPT2_NAMES = {"wte.weight": "token_emb.weight", "wpe.weight": "pos_emb.weight",
              "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
GPT2_BLOCK_NAMES = {"ln_1": "ln_1", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
                    "ln_2": "ln_2", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def hub_sha256(url):
    """The sha256 the Hugging Face Hub publishes for a large (LFS) file, or None (offline, or a small file).
    The Hub answers HEAD with it in X-Linked-Etag before redirecting to its CDN."""
    import requests  # the network: only for a download

    try:
        for _ in range(5):  # a renamed repo (gpt2 -> openai-community/gpt2) redirects within the Hub first
            r = requests.head(url, allow_redirects=False, timeout=10)
            etag = r.headers.get("X-Linked-Etag", "").strip('"')
            if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
                return etag
            if not r.is_redirect:
                return None
            url = urljoin(url, r.headers["Location"])
    except requests.RequestException:
        return None  # offline: a cached copy is used as it is
    return None


def download_gpt2(name, cache_dir="data/cache", files=GPT2_FILES):
    """Fetch GPT-2 `name` from the Hugging Face Hub into cache_dir/name (kept for next time); returns that folder."""
    if name not in GPT2_MODELS:
        raise UserError(f"unknown model '{name}': use one of {', '.join(GPT2_MODELS)}, a checkpoint folder, or a "
                        f"folder holding model.safetensors + config.json")
    from download import download  # the network: only when the weights are not here yet

    folder = Path(cache_dir) / name
    for file in files:
        url = HF_URL.format(name=name, file=file)
        sha256 = TOKENIZER_SHA256.get(file) or (hub_sha256(url) if file.endswith(".safetensors") else None)
        download(url, folder / file, sha256, desc=f"{name} {file}", offline_hint=(
            f"without the network, put {', '.join(files)} of {name} in a folder and pass that folder instead"))
    return folder


def gpt2_config(hf_config, dropout=0.0):
    """Our GPTConfig for a Hugging Face GPT-2 config.json: GPT-2 has biases, tanh-GELU and learned positions."""
    if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"this GPT-2 uses activation {hf_config['activation_function']}; only tanh-GELU is built in")
    return GPTConfig(vocab_size=hf_config["vocab_size"], block_size=hf_config["n_positions"],
                     hidden_size=hf_config["n_embd"], num_hidden_layers=hf_config["n_layer"],
                     num_attention_heads=hf_config["n_head"], dropout=dropout, bias=True)


def gpt2_state_dict(tensors):
    """Rename a Hugging Face GPT-2 state dict to ours, transposing the Conv1D weights."""
    ours = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("transformer.")  # GPT2LMHeadModel files have the prefix, the original ones not
        if name in GPT2_NAMES:
            ours[GPT2_NAMES[name]] = tensor
            continue
        m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
        if m and m[2] in GPT2_BLOCK_NAMES:
            transpose = m[2] in GPT2_CONV1D and m[3] == "weight"
            ours[f"blocks.{m[1]}.{GPT2_BLOCK_NAMES[m[2]]}.{m[3]}"] = tensor.t() if transpose else tensor
        # anything else is lm_head.weight (tied to wte) or attn.bias / attn.masked_bias (causal-mask buffers)
    if "token_emb.weight" in ours:
        ours["lm_head.weight"] = ours["token_emb.weight"]
    return ours


GPT2_CHOICES = {"position": "learned", "activation": "gelu", "qk_norm": False, "tie_embeddings": True,
                "logit_softcap": 0.0}  # what GPT2LMHeadModel computes; dropout and initialisation do not matter


def check_gpt2_compatible(config):
    """Refuse a model that GPT2LMHeadModel would compute differently (rotary positions, ReLU², ...)."""
    differs = [f"{name}={getattr(config, name)}" for name, value in GPT2_CHOICES.items()
               if getattr(config, name) != value]
    if differs:
        raise UserError(f"this model is no GPT-2 ({', '.join(differs)}): transformers' GPT2LMHeadModel would compute "
                        f"something else; export a model trained with GPT-2's choices")


def hf_state_dict(model):
    """Our GPT's weights under GPT2LMHeadModel's names: Conv1D weights transposed, the biases a bias=False model lacks
    written as zeros (a zero bias adds nothing). The output layer is left out: GPT-2 ties it to wte."""
    ours = model.state_dict()
    zeros = lambda size: torch.zeros(size, dtype=ours["token_emb.weight"].dtype)  # noqa: E731
    theirs = {f"transformer.{hf}": ours[name] for hf, name in GPT2_NAMES.items() if name in ours}
    theirs.setdefault("transformer.ln_f.bias", zeros(model.config.hidden_size))
    for i in range(model.config.num_hidden_layers):
        for hf, name in GPT2_BLOCK_NAMES.items():
            weight = ours[f"blocks.{i}.{name}.weight"]
            bias = ours.get(f"blocks.{i}.{name}.bias", zeros(weight.size(0)))
            theirs[f"transformer.h.{i}.{hf}.weight"] = weight.t().contiguous() if hf in GPT2_CONV1D else weight
            theirs[f"transformer.h.{i}.{hf}.bias"] = bias
    return theirs


def hf_config(config, eos_id=None):
    """GPT2LMHeadModel's config.json for our GPTConfig: tanh-GELU ("gelu_new"), LayerNorm eps 1e-5, tied embeddings,
    no dropout (it is for inference)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.hidden_size,
            "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads, "n_inner": None,
            "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": True, "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32"}


def is_gpt2(name_or_dir):
    """A GPT-2 model name, or a folder in Hugging Face's format (model.safetensors)."""
    return name_or_dir in GPT2_MODELS or os.path.isfile(os.path.join(name_or_dir, "model.safetensors"))


def load_gpt2(name_or_dir, cache_dir="data/cache", tokenizer_dir="", dropout=0.0, device="cpu"):
    """GPT-2 in Hugging Face's format (model.safetensors + config.json; no pickle) as our GPT, with its tokenizer.

    name_or_dir: gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once into cache_dir), or a local folder.
    The tokenizer comes from tokenizer_dir, else the folder itself, else GPT-2's files are downloaded.
    Returns (model in eval mode, tokenizer).
    """
    folder = Path(name_or_dir)
    if not folder.is_dir():
        folder = download_gpt2(str(name_or_dir), cache_dir)
    for file in ("config.json", "model.safetensors"):
        if not (folder / file).is_file():
            raise UserError(f"{folder} has no {file}: a GPT-2 folder holds Hugging Face's config.json and "
                            f"model.safetensors (save_pretrained(dir, safe_serialization=True) writes them)")
    model = GPT(gpt2_config(json.loads((folder / "config.json").read_text()), dropout))
    try:
        tensors = load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {folder / 'model.safetensors'} ({e}); delete it to download it again")
    try:
        missing, unexpected = model.load_state_dict(gpt2_state_dict(tensors), strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise UserError(f"{folder / 'model.safetensors'} does not match config.json: {str(e).splitlines()[-1].strip()}")
    if missing or unexpected:
        raise UserError(f"{folder / 'model.safetensors'} does not match config.json: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    has_tokenizer = any((folder / f).is_file() for f in ("vocab.json", "encoder.json"))
    if not tokenizer_dir:
        tokenizer_dir = folder if has_tokenizer else download_gpt2("gpt2", cache_dir, ("vocab.json", "merges.txt"))
    return model.to(device).eval(), load_tokenizer(tokenizer_dir)
