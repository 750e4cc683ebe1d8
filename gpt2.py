"""
GPT-2's format and ours, both ways. OpenAI's GPT-2 weights as our GPT: downloaded from the Hugging Face Hub (checked,
cached) or read from a local folder in Hugging Face's format (model.safetensors + config.json), without pickle and
without `transformers`. And our GPT as a GPT-2 (GPT2LMHeadModel) or, with rotary positions, a GPT-NeoX
(GPTNeoXForCausalLM), for export.py; such a GPT-NeoX folder loads back here too.

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
from tokenizer import GPT2_MERGES_SHA256, GPT2_VOCAB_SHA256

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
# GPT-NeoX's names -> ours (our rotary model: GPTNeoXForCausalLM with a sequential residual computes the same)
NEOX_NAMES = {"gpt_neox.embed_in.weight": "token_emb.weight", "gpt_neox.final_layer_norm.weight": "ln_f.weight",
              "gpt_neox.final_layer_norm.bias": "ln_f.bias", "embed_out.weight": "lm_head.weight"}
NEOX_BLOCK_NAMES = {"input_layernorm": "ln_1", "attention.query_key_value": "attn.qkv_proj",
                    "attention.dense": "attn.out_proj", "post_attention_layernorm": "ln_2",
                    "mlp.dense_h_to_4h": "mlp.up_proj", "mlp.dense_4h_to_h": "mlp.down_proj"}


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


def neox_config(hf_config, dropout=0.0):
    """Our GPTConfig for a GPT-NeoX config.json of the kind export.py writes: rotary positions on every dimension,
    a sequential residual, tanh-GELU, LayerNorm; the output layer tied or not."""
    rope = hf_config.get("rope_parameters") or {}
    fraction = rope.get("partial_rotary_factor", hf_config.get("rotary_pct", 1.0))
    base = rope.get("rope_theta", hf_config.get("rotary_emb_base", 10000))
    checks = {"rotary_pct": (fraction, (1.0,)), "rope_theta": (base, (10000.0,)),
              "use_parallel_residual": (hf_config.get("use_parallel_residual", True), (False,)),
              "hidden_act": (hf_config.get("hidden_act"), ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"))}
    differs = [f"{name}={value}" for name, (value, allowed) in checks.items() if value not in allowed]
    if differs or hf_config.get("intermediate_size") != 4 * hf_config["hidden_size"]:
        raise UserError(f"this GPT-NeoX differs from our architecture ({', '.join(differs) or 'intermediate_size'}): "
                        f"only models that export.py writes load here")
    return GPTConfig(vocab_size=hf_config["vocab_size"], block_size=hf_config["max_position_embeddings"],
                     hidden_size=hf_config["hidden_size"], num_hidden_layers=hf_config["num_hidden_layers"],
                     num_attention_heads=hf_config["num_attention_heads"], dropout=dropout, bias=True,
                     position="rope", tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))


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


def hf_architecture(config):
    """'gpt2' for learned positions and a tied output layer (GPT2LMHeadModel), 'gpt_neox' for rotary positions
    (GPTNeoXForCausalLM, tied or not); a UserError naming the setting that neither computes."""
    differs = [f"{name}={getattr(config, name)}" for name, value in GPT2_CHOICES.items()
               if name not in ("position", "tie_embeddings") and getattr(config, name) != value]
    if differs:
        raise UserError(f"neither GPT-2 nor GPT-NeoX computes {', '.join(differs)}: transformers and llama.cpp would "
                        f"compute something else; export a model trained without it")
    if config.position == "rope":
        return "gpt_neox"
    if not config.tie_embeddings:
        raise UserError("GPT-2 ties its output layer to the token embedding: a model with learned positions and "
                        "tie_embeddings=False has no Hugging Face architecture here; train it with position=rope")
    return "gpt2"


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


def neox_state_dict(model):
    """Our rotary GPT's weights under GPTNeoXForCausalLM's names. Its fused qkv layer holds each head's q, k, v
    together ((heads, 3, head_dim) rows), ours all q, then all k, then all v ((3, heads, head_dim)); a bias=False
    model's biases are zeros."""
    ours, c = model.state_dict(), model.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    zeros = lambda size: torch.zeros(size, dtype=ours["token_emb.weight"].dtype)  # noqa: E731
    theirs = {hf: ours[name] for hf, name in NEOX_NAMES.items() if name in ours}
    theirs.setdefault("gpt_neox.final_layer_norm.bias", zeros(c.hidden_size))
    if c.tie_embeddings:
        theirs.pop("embed_out.weight", None)
    for i in range(c.num_hidden_layers):
        for hf, name in NEOX_BLOCK_NAMES.items():
            weight = ours[f"blocks.{i}.{name}.weight"]
            bias = ours.get(f"blocks.{i}.{name}.bias", zeros(weight.size(0)))
            if name == "attn.qkv_proj":
                weight = weight.view(3, heads, head_dim, -1).transpose(0, 1).reshape(3 * c.hidden_size, -1)
                bias = bias.view(3, heads, head_dim).transpose(0, 1).reshape(-1)
            theirs[f"gpt_neox.layers.{i}.{hf}.weight"] = weight.contiguous()
            theirs[f"gpt_neox.layers.{i}.{hf}.bias"] = bias.contiguous()
    return theirs


def neox_to_ours(tensors, config):
    """A GPTNeoXForCausalLM state dict (as neox_state_dict writes it) under our names."""
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    ours = {}
    for name, tensor in tensors.items():
        if name in NEOX_NAMES:
            ours[NEOX_NAMES[name]] = tensor
            continue
        m = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m and m[2] in NEOX_BLOCK_NAMES:
            if m[2] == "attention.query_key_value":
                tensor = tensor.view(heads, 3, head_dim, -1).transpose(0, 1).reshape(tensor.shape)
            ours[f"blocks.{m[1]}.{NEOX_BLOCK_NAMES[m[2]]}.{m[3]}"] = tensor
    if config.tie_embeddings and "token_emb.weight" in ours:
        ours["lm_head.weight"] = ours["token_emb.weight"]
    return ours


def neox_hf_config(config, eos_id=None):
    """GPTNeoXForCausalLM's config.json for our rotary GPTConfig: rotary on every dimension of a head (base 10000,
    written both as transformers 4 and 5 read it), a sequential residual, tanh-GELU, LayerNorm eps 1e-5."""
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "intermediate_size": 4 * config.hidden_size,
            "hidden_act": "gelu_pytorch_tanh", "rotary_pct": 1.0, "rotary_emb_base": 10000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
            "max_position_embeddings": config.block_size, "layer_norm_eps": 1e-5, "use_parallel_residual": False,
            "attention_bias": True, "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
            "hidden_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "bos_token_id": eos_id,
            "eos_token_id": eos_id, "torch_dtype": "float32"}


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
    hf = json.loads((folder / "config.json").read_text())
    neox = hf.get("model_type") == "gpt_neox"
    model = GPT(neox_config(hf, dropout) if neox else gpt2_config(hf, dropout))
    try:
        tensors = load_file(folder / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {folder / 'model.safetensors'} ({e}); delete it to download it again")
    try:
        renamed = neox_to_ours(tensors, model.config) if neox else gpt2_state_dict(tensors)
        missing, unexpected = model.load_state_dict(renamed, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise UserError(f"{folder / 'model.safetensors'} does not match config.json: {str(e).splitlines()[-1].strip()}")
    if missing or unexpected:
        raise UserError(f"{folder / 'model.safetensors'} does not match config.json: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    has_tokenizer = any((folder / f).is_file() for f in ("vocab.json", "encoder.json"))
    if not tokenizer_dir:
        tokenizer_dir = folder if has_tokenizer else download_gpt2("gpt2", cache_dir, ("vocab.json", "merges.txt"))
    from data import load_tokenizer  # its files' errors as one line
    return model.to(device).eval(), load_tokenizer(tokenizer_dir)
