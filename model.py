"""
A GPT language model, written out from scratch. Imports nothing but torch: copy this file alone.

    token ids -> token embedding (+ learned positions, or rotary ones inside attention)
              -> num_hidden_layers x TransformerBlock (pre-norm: x + attn(ln(x)), x + mlp(ln(x)))
              -> final LayerNorm -> output layer (the token embedding, or its own) -> logits

Read top to bottom: the config, attention (with its KV cache), the block, the model, generation.

    model = GPT(GPTConfig(vocab_size=8192, block_size=256, hidden_size=384, num_hidden_layers=6,
                          num_attention_heads=6))
    logits, loss = model(idx, targets)           # idx, targets: (B, T) token ids
    new = model.generate(idx, max_new_tokens=50, temperature=0.8, top_k=200)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024          # the longest context (learned positions exist up to here)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    dropout: float = 0.0            # training: on the embeddings, and where the next two are < 0
    bias: bool = True               # biases in Linear layers and LayerNorms, as GPT-2 has them
    # choices beyond GPT-2 (the README's recipe study); the defaults are GPT-2's: its weights load
    position: str = "learned"       # learned: a table of block_size positions; rope: rotary (q, k)
    activation: str = "gelu"        # gelu: GPT-2's tanh GELU; relu2: ReLU squared
    qk_norm: bool = False           # RMS-normalise each head's queries and keys before attention
    tie_embeddings: bool = True     # the output layer is the token embedding; False: its own matrix
    logit_softcap: float = 0.0      # > 0: logits = softcap * tanh(logits / softcap), bounded
    embedding_dropout: float = 0.0  # training: drop whole words, the same rows in the whole batch
    attention_dropout: float = -1.0  # on attention weights (< 0: dropout's)
    residual_dropout: float = -1.0  # on the branches into the residual stream (< 0: dropout's)
    head_dropout: float = 0.0       # on the final states, before the output layer
    zero_init_residual: bool = False  # the projections into the residual stream start at zero

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}; pick sizes where it is")
        for name in ("vocab_size", "block_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.position not in ("learned", "rope") or self.activation not in ("gelu", "relu2"):
            raise ValueError(f"position must be learned or rope, activation gelu or relu2; got "
                             f"{self.position}, {self.activation}")
        if self.position == "rope" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("rope rotates pairs of dimensions: hidden_size / num_attention_heads must be even")

    def dropout_at(self, place):
        """attention or residual: the place's own dropout, or dropout's where that is < 0."""
        own = getattr(self, f"{place}_dropout")
        return self.dropout if own < 0 else own

    def num_params(self):
        """The parameters of a GPT of this shape, without building it (= GPT(c).num_params(False)):
        per block 12 h^2 (attention 4 h^2, MLP 8 h^2) and the norms' gains (+ biases, with bias)."""
        h, bias = self.hidden_size, self.bias
        block = 12 * h * h + 2 * h + (11 * h if bias else 0)
        tables = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        positions = self.block_size * h if self.position == "learned" else 0
        return tables + positions + self.num_hidden_layers * block + h * (2 if bias else 1)


# ----------------------------------------------------------------------------- attention

def cached_attention(q, k, v, bias):
    """Attention of the new queries over the KV cache's keys, bias added; on a GPU not with cuDNN's
    kernel, which plans each new shape for hundreds of ms (a first sample: 16 tok/s on an H100)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class MultiHeadAttention(nn.Module):
    """Causal self-attention: every position mixes the values of itself and earlier positions."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)  # q, k, v
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = config.dropout_at("attention")
        self.resid_dropout = nn.Dropout(config.dropout_at("residual"))
        self.qk_norm = config.qk_norm
        self.use_flash = True  # torch's fused attention; False: the maths written out below
        self.kv_cache = None   # keys, values (2, batch, heads, block_size, head_dim) while decoding

    def forward(self, x, step=None, angles=None):
        """x (B, T, C) -> (B, T, C). With step (GPT.decode_mask), keys and values go into the KV
        cache. angles: the rotary cos and sin of the positions (a rope model)."""
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if angles is not None:
            q, k = rotate(q, angles), rotate(k, angles)
        dropout = self.dropout if self.training else 0.0
        if step is None:  # training and scoring: each token sees itself and the ones before it
            if self.use_flash:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:
                causal = torch.full((T, T), float("-inf"), dtype=q.dtype, device=x.device).triu(1)
                y = self.attention_written_out(q, k, v, causal, dropout)
        else:  # generating: K and V into the cache in one copy, then the cache up to `end`
            rows, input_pos, end, bias = step
            self.kv_cache[:, rows, :, input_pos] = torch.stack([k, v]).permute(1, 3, 0, 2, 4)
            k, v = self.kv_cache[:, :, :, :end]
            y = (cached_attention if self.use_flash else self.attention_written_out)(q, k, v, bias)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge the heads back
        return self.resid_dropout(self.out_proj(y))

    def attention_written_out(self, q, k, v, bias, dropout=0.0):
        """softmax(q k^T / sqrt(d) + bias) v, step by step: bias -inf on a query's future keys."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, keys)
        if bias is not None:
            scores = scores + bias
        weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return weights @ v


def rotary_angles(positions, head_dim, base=10000.0):
    """(cos, sin) of the rotation that rotary position embeddings (Su et al. 2021) give each pair of
    a head's dimensions: pair i turns by position * base^(-2i / head_dim). positions (T,) or (B, T)
    -> (1, T, head_dim/2) or (B, 1, T, head_dim/2), to broadcast over (B, heads, T, head_dim/2)."""
    freqs = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = (positions.float()[..., None] * freqs).unsqueeze(-3)
    return angles.cos(), angles.sin()


def rotate(x, angles):
    """x (B, heads, T, head_dim), each pair (x1, x2) of its dimensions turned: (x1 cos - x2 sin,
    x1 sin + x2 cos). Queries and keys so rotated have dot products that depend on distance only."""
    cos, sin = angles
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# ----------------------------------------------------------------------------- block and model

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=config.bias)
        self.down_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout_at("residual"))
        self.relu2 = config.activation == "relu2"

    def forward(self, x):
        x = self.up_proj(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")  # GPT-2's: tanh
        return self.dropout(self.down_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, step=None, angles=None):
        x = x + self.attn(self.ln_1(x), step, angles)  # pre-norm: the residual stream stays
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_emb.weight  # weight tying: one matrix in and out
        for module in self.modules():  # GPT-2's initialisation
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down_proj.weight"):
                # GPT-2 shrinks the 2 residual branches a block adds: the stream's variance stays ~1
                std = 0.0 if config.zero_init_residual else 0.02 / math.sqrt(2 * config.num_hidden_layers)
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves the position table out (not the token table)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding and hasattr(self, "pos_emb") else n

    def set_flash(self, enabled):
        for block in self.blocks:
            block.attn.use_flash = enabled

    def hidden_states(self, idx, input_pos=None):
        """The final-layer states of idx (B, T): (B, T, hidden_size). The T tokens are positions
        0..T-1, or with input_pos ((T,), or (B, T): per row), they extend the KV cache."""
        if input_pos is None and idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than block_size={self.config.block_size}")
        positions = torch.arange(idx.size(1), device=idx.device) if input_pos is None else input_pos
        x, angles = self.embed(idx), None
        step = None if input_pos is None else self.decode_mask(idx, input_pos)
        if self.config.position == "learned":
            x = x + self.pos_emb(positions)
        elif input_pos is None:
            angles = rotary_angles(positions, self.config.hidden_size // self.config.num_attention_heads)
        else:  # read from the table of every position's (setup_kv_cache)
            angles = tuple(t[0, input_pos].unsqueeze(-3) for t in self.rotary_table)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, step, angles)
        return self.ln_f(x)

    def embed(self, idx):
        """The token embeddings of idx. embedding_dropout drops whole words in training (Gal &
        Ghahramani 2016): rows of the vocabulary zeroed for the whole batch, the rest scaled up."""
        weight, p = self.token_emb.weight, self.config.embedding_dropout
        if self.training and p > 0:
            keep = torch.rand(weight.size(0), 1, device=weight.device) >= p  # words kept
            weight = weight * (keep.to(weight.dtype) / (1 - p))
        return F.embedding(idx, weight)

    def logits(self, hidden):
        """Next-token logits of final-layer states; logit_softcap squashes them into (-cap, cap)."""
        logits = self.lm_head(F.dropout(hidden, self.config.head_dropout, self.training))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx, targets=None):
        """Logits for every position and, given targets, the mean cross-entropy (-100: ignored)."""
        logits = self.logits(self.hidden_states(idx))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not biases or norms' gains); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    # ------------------------------------------------------------------------- generation

    tokens_per_call = 1  # tokens a call of decode_tokens decodes (runtime.compile_decoding sets it)

    def setup_kv_cache(self, batch_size):
        """Decoding's buffers for batch_size sequences, in the weights' dtype and device, kept while
        they fit (a compiled step keeps its graph): KV caches; causal bias, rotary cos and sin by
        position; decode_tokens' tokens (B, block_size + 1) by position, pos, noise, suppress."""
        w, c, kv = self.token_emb.weight, self.config, self.blocks[0].attn.kv_cache
        fits = (self.tokens_per_call, batch_size, batch_size, w.dtype, w.device)
        if kv is not None and (*self.noise.shape[:2], kv.size(1), kv.dtype, kv.device) == fits:
            return
        head_dim, block, device = c.hidden_size // c.num_attention_heads, c.block_size, w.device
        for b in self.blocks:
            b.attn.kv_cache = w.new_zeros(2, batch_size, c.num_attention_heads, block, head_dim)
        self.causal_bias = w.new_full((block, block), float("-inf")).triu(1)  # row i: 0 up to i
        self.rotary_table = rotary_angles(torch.arange(block, device=device), head_dim)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, block + 1, dtype=torch.long, device=device)
        self.noise = torch.ones(self.tokens_per_call, batch_size, c.vocab_size, device=device)
        self.suppress = w.new_zeros(c.vocab_size)

    def decode_mask(self, idx, input_pos):
        """(rows, input_pos, end, bias) for every layer: idx (B, T) at input_pos ((T,), or (B, T))
        reads cached positions 0..end-1, bias added (-inf: the future): on a CPU those written so
        far (one token a row: no bias); on a GPU, and compiled, all (the same shapes every step)."""
        rows, bias = torch.arange(idx.size(0), device=idx.device)[:, None], self.causal_bias
        if input_pos.is_cuda or torch.compiler.is_compiling():
            return rows, input_pos, self.config.block_size, bias[input_pos].unsqueeze(-3)
        end, one = int(input_pos.max()) + 1, input_pos.dim() == 1 and idx.size(1) == 1
        return rows, input_pos, end, None if one else bias[input_pos, :end].unsqueeze(-3)

    def prefill(self, idx, every_position=False):
        """Run the prompt idx (B, T) as positions 0..T-1 into the KV cache; the next-token logits
        (B, vocab), or with every_position those after each token (B, T, vocab), to score it."""
        hidden = self.hidden_states(idx, torch.arange(idx.size(1), device=idx.device))
        return self.logits(hidden if every_position else hidden[:, -1])

    def decode_one_token(self, idx, input_pos):
        """The next-token logits (B, vocab) after idx (B, 1) at input_pos ((1,), or (B, 1))."""
        return self.logits(self.hidden_states(idx, input_pos)[:, -1])

    def decode_tokens(self, steps, sampling):
        """Decode `steps` tokens in place, the same shapes every call (compiled: one CUDA graph):
        the newest token, tokens[:, pos], runs through the cache; next_token samples the next."""
        for step in range(steps):
            logits = self.decode_one_token(self.tokens[:, self.pos], self.pos)
            self.next_token(logits, step, *sampling)

    def next_token(self, logits, step, temperature, top_k, top_p, suppress):
        """Sample after logits (B, vocab) with noise[step]; write it at pos + 1; move pos on."""
        logits = logits + self.suppress if suppress else logits
        new = sample_next_token(logits, temperature, top_k, top_p, noise=self.noise[step])
        self.tokens[:, self.pos + 1] = new[:, None]
        self.pos.add_(1)

    def tokens_kept_when_full(self):
        """A full KV cache is rebuilt from its last block_size // 2 tokens (positions cannot slide)."""
        return max(1, self.config.block_size // 2)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, suppress_ids=None):
        """Yield the next token ids, shape (B,), one step at a time; suppress_ids are never sampled.
        With the cache: the prompt once (prefill), then decode_tokens, no host sync; a full cache is
        rebuilt. Without (the reference for the cache), every step runs the whole context again."""
        block, sampling = self.config.block_size, (temperature, top_k, top_p, bool(suppress_ids))
        for _ in range(0 if use_cache else max_new_tokens):
            logits = self.logits(self.hidden_states(idx[:, -block:])[:, -1])
            logits[:, suppress_ids or []] = float("-inf")
            idx = torch.cat([idx, sample_next_token(logits, *sampling[:3], generator)[:, None]], 1)
            yield idx[:, -1]
        new, p, per_call = 0, block, self.tokens_per_call  # p: the newest token's position
        if use_cache:
            self.setup_kv_cache(idx.size(0))
            self.suppress.fill_(0.0)[suppress_ids or []] = float("-inf")
        while use_cache and new < max_new_tokens:
            n = per_call if p + per_call <= block and new + per_call <= max_new_tokens else 1
            for i in range(n if temperature >= 1e-5 else 0):  # the draws torch.multinomial makes
                self.noise[i].exponential_(1, generator=generator)
            if p == block:  # the prompt, or a full cache: (re)built from its last tokens
                context = self.tokens[:, -self.tokens_kept_when_full():] if new else idx[:, -block:]
                p = context.size(1)
                self.tokens[:, :p] = context
                self.pos.fill_(p - 1)
                self.next_token(self.prefill(context), 0, *sampling)
            else:
                self.decode_tokens(n, sampling)
                p += n
            yield from self.tokens[:, p + 1 - n:p + 1].clone().unbind(1)
            new += n

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) extended by max_new_tokens sampled tokens."""
        return torch.column_stack([idx, *self.generate_tokens(idx, max_new_tokens, **kwargs)])


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, noise=None):
    """One token per row of (B, vocab) logits; greedy at temperature 0 (or below 1e-5: overflow).
    Sampled as torch.multinomial does: argmax(probs / noise), noise Exp(1) draws given or drawn."""
    if temperature < 1e-5:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus: the most likely tokens until their probability reaches top_p (the first always)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        remove_sorted[:, 0] = False  # even for a top_p that float32 rounds to 0
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator) if noise is None else noise
    return (probs / noise).argmax(dim=-1)
