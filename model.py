"""
A GPT language model, written out from scratch. Imports nothing but torch: copy this file alone into a project.

    token ids -> token embedding + position embedding
              -> num_hidden_layers x TransformerBlock (pre-norm: x + attn(ln(x)), x + mlp(ln(x)))
              -> final LayerNorm -> linear head tied to the token embedding -> next-token logits

Read top to bottom: the config, attention (with its KV cache), the block, the model, generation.

    model = GPT(GPTConfig(vocab_size=8192, block_size=256, hidden_size=384, num_hidden_layers=6, num_attention_heads=6))
    logits, loss = model(idx, targets)           # idx, targets: (B, T) token ids
    new = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=200)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


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
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}; pick sizes where it is")
        for name in ("vocab_size", "block_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


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
