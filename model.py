"""
A GPT language model, written out from scratch.

    token ids -> token embedding + position embedding
              -> num_hidden_layers x TransformerBlock (pre-norm: x + attn(ln(x)), x + mlp(ln(x)))
              -> final LayerNorm -> linear head tied to the token embedding -> next-token logits

Read top to bottom: the config, attention, the block, the model, generation with a KV cache, and the
checkpoint format that train.py writes and every other script loads.
"""

import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

import prepare
from cli import UserError
from tokenizer import load_tokenizer


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024          # longest context the model sees (learned positions exist only up to here)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    dropout: float = 0.0
    bias: bool = True               # biases in Linear layers and LayerNorms, as GPT-2 has them

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(f"hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads}; pick sizes where it is")
        for name in ("vocab_size", "block_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")


def pick_device(device="auto"):
    """'auto' picks cuda, then mps (Apple), then cpu; any other value is used as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


@functools.cache  # reads /proc/cpuinfo once, though fine-tuning asks every epoch
def has_fast_bf16(device_type):
    """True where bfloat16 matmuls run in hardware: GPUs from Ampere on, CPUs with AVX512-BF16 or AMX (Linux)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:  # without these instructions bf16 is emulated on the CPU and slower than fp32
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# ----------------------------------------------------------------------------- attention

class KVCache:
    """Keys and values of the tokens seen so far, per layer, so each new token costs one position, not all."""

    def __init__(self, config, batch_size, device, dtype):
        head_dim = config.hidden_size // config.num_attention_heads
        shape = (batch_size, config.num_attention_heads, config.block_size, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0  # positions filled

    def update(self, layer, k, v):
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class MultiHeadAttention(nn.Module):
    """Causal self-attention: every position mixes the values of itself and earlier positions."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)  # q, k, v in one matmul
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_flash = True  # torch's fused scaled_dot_product_attention; False runs the maths written out below

    def forward(self, x, kv_cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if self.use_flash:
            # with a cache the T new queries sit at positions past..past+T-1: an explicit mask says so,
            # except for a single new query, which may see every key
            mask = None if past == 0 or T == 1 else causal_mask(T, past + T, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=past == 0)
        else:
            y = self.attention_written_out(q, k, v, past, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge the heads back
        return self.resid_dropout(self.out_proj(y))

    def attention_written_out(self, q, k, v, past, dropout):
        """softmax(q k^T / sqrt(d) + causal mask) v, step by step."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, past+T)
        allowed = causal_mask(q.size(2), k.size(2), q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))  # a token never sees the future
        weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return weights @ v


def causal_mask(num_queries, num_keys, device):
    """True where query i (the last num_queries positions) may look at key j: j <= its own position."""
    offset = num_keys - num_queries
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=offset)


# ----------------------------------------------------------------------------- the block and the model

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=config.bias)
        self.down_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))  # GPT-2's GELU


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)  # pre-norm: the residual stream itself is never normalised
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_emb = nn.Embedding(config.block_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.token_emb.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down_proj.weight"):
                # GPT-2: each block adds two residual branches; shrink them so the stream's variance stays ~1
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_hidden_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; the position table is left out of the non-embedding count (the tied token
        table is counted, since it is also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def set_flash(self, enabled):
        for block in self.blocks:
            block.attn.use_flash = enabled

    def hidden_states(self, idx, kv_cache=None):
        """The final-layer representation of every position: (B, T, hidden_size)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.dropout(self.token_emb(idx) + self.pos_emb(pos))
        for layer, block in enumerate(self.blocks):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None):
        """Logits for every position and, given targets, the mean cross-entropy (targets of -100 ignored)."""
        logits = self.lm_head(self.hidden_states(idx, kv_cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------------- training helpers

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only: biases, norms' gains are left alone."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused=True runs the whole update in a few kernels on CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per parameter, plus attention's score matmuls."""
        c = self.config
        return 6 * self.num_params() + 12 * c.num_hidden_layers * c.hidden_size * seq_len

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: the share of the device's peak that the useful maths uses."""
        return self.flops_per_token(self.config.block_size) * tokens_per_second / peak_flops

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None):
        """Yield the next token ids, shape (B,), one step at a time (callers stream or collect them).

        With the cache, each step feeds one token. When the context would pass block_size, the oldest
        tokens are dropped: the learned positions then shift, so the cache is rebuilt from the last
        block_size // 2 tokens. Half a block keeps the rebuild rare (once per block_size // 2 steps)
        while the model still sees a long context.
        """
        block = self.config.block_size
        cache = None
        next_input = idx[:, -block:]
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None or cache.length + next_input.size(1) > block:
                    next_input = idx[:, -(block // 2 or 1):] if cache is not None else idx[:, -block:]
                    cache = KVCache(self.config, idx.size(0), idx.device, self.token_emb.weight.dtype)
                hidden = self.hidden_states(next_input, kv_cache=cache)
            else:
                hidden = self.hidden_states(idx[:, -block:])
            logits = self.lm_head(hidden[:, -1, :])  # only the last position's prediction is needed
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            next_input = next_id[:, None]
            yield next_id

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) extended by max_new_tokens sampled tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from (B, vocab) logits. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the most likely tokens until their probability reaches top_p (the first is always kept)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_NAME = "ckpt.pt"


def save_checkpoint(checkpoint, out_dir):
    """Write atomically: a crash mid-save leaves the previous checkpoint intact."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows
    return path


def read_checkpoint(out_dir, map_location="cpu"):
    """The checkpoint dict of out_dir, loaded without unpickling arbitrary objects."""
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py ...) or fix --out_dir")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}")


def load_model(out_dir, device="cpu"):
    """Load a checkpoint folder: (model in eval mode, its tokenizer, the checkpoint dict)."""
    checkpoint = read_checkpoint(out_dir, map_location=device)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    return model, load_tokenizer(out_dir), checkpoint


# ----------------------------------------------------------------------------- pretrained GPT-2 weights

GPT2_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 355M, 774M, 1558M parameters
HF_URL = "https://huggingface.co/{name}/resolve/main/{file}"
GPT2_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
# GPT-2's tokenizer: the same bytes for every size, and the same as OpenAI's encoder.json / vocab.bpe
GPT2_TOKENIZER_SHA256 = {"vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                         "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
# Hugging Face's names -> ours. Their Conv1D layers store weights as (in, out); nn.Linear wants (out, in).
GPT2_NAMES = {"wte.weight": "token_emb.weight", "wpe.weight": "pos_emb.weight",
              "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
GPT2_BLOCK_NAMES = {"ln_1": "ln_1", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
                    "ln_2": "ln_2", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def hub_sha256(url):
    """The sha256 the Hugging Face Hub publishes for a large (LFS) file, or None (offline, or a small file).
    The Hub answers HEAD with it in X-Linked-Etag before redirecting to its CDN."""
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
    folder = Path(cache_dir) / name
    for file in files:
        url = HF_URL.format(name=name, file=file)
        sha256 = GPT2_TOKENIZER_SHA256.get(file) or (hub_sha256(url) if file.endswith(".safetensors") else None)
        prepare.download(url, folder / file, sha256, desc=f"{name} {file}", offline_hint=(
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


def is_gpt2(name_or_dir):
    """A GPT-2 model name, or a Hugging Face folder (model.safetensors) rather than a train.py checkpoint."""
    if os.path.isfile(os.path.join(name_or_dir, CHECKPOINT_NAME)):
        return False
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


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + (alpha / rank) * B A x.

    A is (rank, in) and B is (out, rank), so a 768 x 768 layer trains 2 * 768 * rank numbers instead of 768 * 768.
    B starts at zero: training starts exactly from the pretrained model.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear uses for its own weight
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """The plain nn.Linear with the update folded into its weight: no extra cost at inference."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A)
        return self.base


LORA_TARGETS = ("qkv_proj", "out_proj", "up_proj", "down_proj")  # attention and MLP projections of every block


def add_lora(model, rank=8, alpha=16):
    """Wrap every attention and MLP projection of model.blocks in a LoRALinear; returns the model."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name in LORA_TARGETS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


def merge_lora(model):
    """Fold every LoRALinear back into a plain nn.Linear, in place; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def merged_state_dict(model):
    """model.state_dict() with each LoRA update folded into its weight, under the plain layers' names: it loads
    into a model without LoRA, and the training model keeps its adapters."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            delta = module.scale * (module.lora_B @ module.lora_A).detach()
            state[f"{name}.weight"] = state.pop(f"{name}.base.weight") + delta
            if f"{name}.base.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base.bias")
            del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state


# ----------------------------------------------------------------------------- inference optimization

class Int8Linear(nn.Module):
    """An nn.Linear for CPU inference with int8 weights (one scale per output row). Each call quantizes its input
    on the fly (one scale per call), multiplies in int8 (fbgemm / oneDNN) and returns float32: a quarter of the
    weight memory to stream per token, which is what bounds the speed of generating one token at a time."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # symmetric: a row's largest weight maps to 127
        zero = torch.zeros(weight.size(0), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are marked deprecated, yet remain the way to reach the kernels
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated", category=UserWarning)
            qweight = torch.quantize_per_channel(weight, scale.double(), zero, axis=0, dtype=torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        # reduce_range: 7-bit activations, so 16-bit pair sums cannot overflow on x86 CPUs without VNNI
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True)


def quantize_int8(model):
    """Replace every nn.Linear of a float32 model by an Int8Linear, in place, for CPU inference; returns the model.

    The output head is tied to the token embedding. It gets its own int8 copy: in a small model it is the largest
    matrix, so most of the gain. The input lookup keeps the float table (a lookup costs nothing to speed up), so
    the tie is broken and the model is for inference only.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
