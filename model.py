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
    dropout: float = 0.0
    bias: bool = True               # biases in Linear layers and LayerNorms, as GPT-2 has them
    # choices beyond GPT-2 (the README's recipe study); the defaults are GPT-2's: its weights load
    position: str = "learned"       # learned: a table of block_size positions; rope: rotary (q, k)
    activation: str = "gelu"        # gelu: GPT-2's tanh GELU; relu2: ReLU squared
    qk_norm: bool = False           # RMS-normalise each head's queries and keys before attention
    tie_embeddings: bool = True     # the output layer is the token embedding; False: its own matrix
    logit_softcap: float = 0.0      # > 0: logits = softcap * tanh(logits / softcap), bounded
    embedding_dropout: float = 0.0  # training: drop whole words, the same rows in the whole batch
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

    def num_params(self):
        """The parameters of a GPT of this shape, without building it (= GPT(c).num_params(False)):
        per block 12 h^2 (attention 4 h^2, MLP 8 h^2) and the norms' gains (+ biases, with bias)."""
        h, bias = self.hidden_size, self.bias
        block = 12 * h * h + 2 * h + (11 * h if bias else 0)
        tables = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        positions = self.block_size * h if self.position == "learned" else 0
        return tables + positions + self.num_hidden_layers * block + h * (2 if bias else 1)


# ----------------------------------------------------------------------------- attention

class KVCache:
    """The keys and values of every position so far, for one attention layer: buffers (batch, heads,
    block_size, head_dim) allocated once, written in place. `rows` gives a cache sharing them.
    On a CPU, attention reads the positions written so far (less to read: faster). On a GPU, and in
    torch.compile, it reads the whole buffer, the positions not written yet masked: every one-token
    step has the same shapes, so a compiled step (CUDA graphs) is made once."""

    def __init__(self, k, v):
        self.k, self.v = k, v
        self.positions = torch.arange(k.size(2), device=k.device)
        self.row_index = torch.arange(k.size(0), device=k.device)[:, None]

    def rows(self, start, stop):
        """The cache of rows start..stop-1, sharing these buffers."""
        return KVCache(self.k[start:stop], self.v[start:stop])

    def update(self, input_pos, k, v):
        """Write k, v (B, heads, T, head_dim) at input_pos: (T,), the same in every row, or (B, T),
        a row's own (sequences of different lengths decoding together). Returns the keys and values
        to attend to, and the mask: True where query i may see key j (j <= its position)."""
        rows = self.row_index
        self.k[rows, :, input_pos], self.v[rows, :, input_pos] = k.transpose(1, 2), v.transpose(1, 2)
        whole = k.is_cuda or torch.compiler.is_compiling()
        end = self.positions.numel() if whole else int(input_pos.max()) + 1
        if not whole and input_pos.dim() == 1 and k.size(2) == 1:  # one new token in every row:
            return self.k[:, :, :end], self.v[:, :, :end], None    # no mask, SDPA's fastest kernel
        mask = self.positions[:end] <= input_pos[..., None]  # (T, end), or (B, T, end): a row's own
        return self.k[:, :, :end], self.v[:, :, :end], mask.unsqueeze(-3)


def cached_attention(q, k, v, mask):
    """Attention of the new queries over the KV cache's keys, as the mask allows. On a GPU, not with
    cuDNN's kernel, which PyTorch may pick for a masked call: it plans each new shape for hundreds
    of ms (a first sample ran at 16 tok/s on an H100). A CPU has no cuDNN; picking costs it ~10%."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MultiHeadAttention(nn.Module):
    """Causal self-attention: every position mixes the values of itself and earlier positions."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)  # q, k, v
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        self.use_flash = True  # torch's fused attention; False: the maths written out below
        self.kv_cache = None   # a KVCache while generating (GPT.setup_kv_cache)

    def forward(self, x, input_pos=None, angles=None):
        """x (B, T, C) -> (B, T, C). With input_pos ((T,) or (B, T): these tokens' positions), keys
        and values go into the KV cache. angles: rotary_angles of the positions (a rope model)."""
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim): each head attends in its own subspace
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if angles is not None:
            q, k = rotate(q, angles), rotate(k, angles)
        dropout = self.dropout if self.training else 0.0
        if input_pos is None:  # training and scoring: each token sees itself and the ones before it
            if self.use_flash:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # i sees 0..i
                y = self.attention_written_out(q, k, v, causal, dropout)
        else:  # generating: the new tokens see the cache up to their own positions
            k, v, mask = self.kv_cache.update(input_pos, k, v)
            y = cached_attention(q, k, v, mask) if self.use_flash else self.attention_written_out(q, k, v, mask, 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge the heads back
        return self.resid_dropout(self.out_proj(y))

    def attention_written_out(self, q, k, v, allowed, dropout):
        """softmax(q k^T / sqrt(d), where allowed) v, step by step; allowed None: every key."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, keys)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))  # a token never sees the future
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
        self.dropout = nn.Dropout(config.dropout)
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

    def forward(self, x, input_pos=None, angles=None):
        x = x + self.attn(self.ln_1(x), input_pos, angles)  # pre-norm: the residual stream stays
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
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("down_proj.weight"):
                # GPT-2: each block adds two residual branches; shrink them so the stream's
                # variance stays ~1 (or start them at zero: each block begins as the identity)
                std = 0.0 if config.zero_init_residual else 0.02 / math.sqrt(2 * config.num_hidden_layers)
                nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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
        if self.config.position == "learned":
            x = x + self.pos_emb(positions)
        else:
            angles = rotary_angles(positions, self.config.hidden_size // self.config.num_attention_heads)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, input_pos, angles)
        return self.ln_f(x)

    def embed(self, idx):
        """The token embeddings of idx. embedding_dropout drops whole words in training (Gal &
        Ghahramani 2016): rows of the vocabulary zeroed for the whole batch, the rest scaled up."""
        p = self.config.embedding_dropout
        if not (self.training and p > 0):
            return self.token_emb(idx)
        weight = self.token_emb.weight
        keep = (torch.rand(weight.size(0), 1, device=weight.device) >= p).to(weight.dtype) / (1 - p)
        return F.embedding(idx, weight * keep)

    def logits(self, hidden):
        """Next-token logits of final-layer states; logit_softcap squashes them into (-cap, cap)."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx, targets=None):
        """Logits for every position and, given targets, the mean cross-entropy (-100: ignored)."""
        logits = self.logits(self.hidden_states(idx))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)

    # ------------------------------------------------------------------------- training helpers

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (not biases or norms' gains); fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per parameter, plus attention's."""
        return 6 * self.num_params() + 12 * self.config.num_hidden_layers * self.config.hidden_size * seq_len

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: the share of the device's peak that the useful maths uses."""
        return self.flops_per_token(self.config.block_size) * tokens_per_second / peak_flops

    # ------------------------------------------------------------------------- generation

    def setup_kv_cache(self, batch_size):
        """A KVCache for batch_size sequences in every attention layer, in the weights' dtype and
        device; one that fits already is kept (a compiled decode step keeps its graph)."""
        w = self.token_emb.weight
        for attn in (block.attn for block in self.blocks):
            cache = attn.kv_cache
            if cache is None or (cache.k.size(0), cache.k.dtype, cache.k.device) != (batch_size, w.dtype, w.device):
                shape = (batch_size, attn.num_heads, self.config.block_size, attn.head_dim)
                attn.kv_cache = KVCache(w.new_zeros(shape), w.new_zeros(shape))

    def prefill(self, idx, every_position=False):
        """Run the prompt idx (B, T) as positions 0..T-1 into the KV cache; the next-token logits
        (B, vocab), or with every_position those after each token (B, T, vocab), to score it."""
        positions = torch.arange(idx.size(1), device=idx.device)
        hidden = self.hidden_states(idx, positions)
        return self.logits(hidden if every_position else hidden[:, -1])

    def decode_one_token(self, idx, input_pos):
        """The next-token logits (B, vocab) after one token per sequence, idx (B, 1), at input_pos
        ((1,), or (B, 1): per row), through the KV cache. Shapes alike at every step: compile once."""
        return self.logits(self.hidden_states(idx, input_pos)[:, -1])

    def tokens_kept_when_full(self):
        """A sequence that fills the KV cache goes on from its last block_size // 2 tokens, the
        cache rebuilt from them (learned positions cannot slide): rare rebuilds, a long context."""
        return max(1, self.config.block_size // 2)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, suppress_ids=None):
        """Yield the next token ids, shape (B,), one step at a time; suppress_ids are never sampled.
        With the cache, the prompt runs once (prefill), then each step one token (decode_one_token),
        and a full cache is rebuilt (tokens_kept_when_full). Without it (the reference the cache is
        tested against), every step runs the whole context (its last block_size tokens) again."""
        block = self.config.block_size
        if use_cache:
            self.setup_kv_cache(idx.size(0))
            logits, length = self.prefill(idx[:, -block:]), min(idx.size(1), block)  # cached
            input_pos = torch.tensor([length], device=idx.device)  # where the next token goes
        else:
            logits = self.logits(self.hidden_states(idx[:, -block:])[:, -1])
        for step in range(max_new_tokens):
            if suppress_ids:
                logits[:, suppress_ids] = float("-inf")
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield next_id
            if step == max_new_tokens - 1:
                break
            idx = torch.cat([idx, next_id[:, None]], dim=1)
            if not use_cache:
                logits = self.logits(self.hidden_states(idx[:, -block:])[:, -1])
            elif length < block:
                logits = self.decode_one_token(next_id[:, None], input_pos)
                input_pos += 1
                length += 1
            else:  # the cache is full: rebuild it
                length = self.tokens_kept_when_full()
                logits, input_pos = self.prefill(idx[:, -length:]), torch.tensor([length], device=idx.device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) extended by max_new_tokens sampled tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1) if new else idx


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of (B, vocab) logits; greedy at temperature 0 (or below 1e-5: overflow)."""
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
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
