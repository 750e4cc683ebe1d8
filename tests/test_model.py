"""The GPT in model.py: attention maths, causality, loss masking, init and optimizer set-up."""
import math

import pytest
import torch

from model import GPT, GPTConfig, MultiHeadAttention


def tiny_config(**kw):
    base = dict(vocab_size=97, block_size=32, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


def test_written_out_attention_equals_sdpa(model):
    idx = torch.randint(0, 97, (3, 32))
    fast, _ = model(idx)
    model.set_flash(False)
    slow, _ = model(idx)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("whole", [False, True], ids=["written positions", "whole cache"])
def test_written_out_attention_equals_sdpa_with_a_cache(whole):
    """Through the KV cache, reading the positions written so far (as a CPU does) or the whole cache
    with its future masked (as a GPU and a compiled step do): the maths written out equals SDPA's,
    and both equal attention over all positions at once."""
    torch.manual_seed(0)
    config = tiny_config()
    attn = MultiHeadAttention(config).eval()
    x = torch.randn(2, 10, config.hidden_size)
    bias = torch.full((config.block_size, config.block_size), float("-inf")).triu(1)  # GPT's

    def step(positions):  # what GPT.decode_mask hands every layer
        end = config.block_size if whole else int(positions.max()) + 1
        return torch.arange(2)[:, None], positions, end, bias[positions, :end].unsqueeze(-3)

    outs = []
    for flash in (True, False):
        attn.use_flash = flash
        shape = (2, 2, config.num_attention_heads, config.block_size, attn.head_dim)  # K and V
        attn.kv_cache = torch.zeros(shape)
        first = attn(x[:, :6], step(torch.arange(6)))  # a prompt of 6, then 4 more positions
        outs.append(torch.cat([first, attn(x[:, 6:], step(torch.arange(6, 10)))], dim=1))
    full = attn(x)  # no cache: all 10 positions at once
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(outs[0], full, atol=1e-5)


@pytest.mark.parametrize("flash", [True, False])
def test_a_token_never_sees_the_future(model, flash):
    model.set_flash(flash)
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97  # rewrite everything from position 12 on
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[0, :12], b[0, :12])
    assert not torch.allclose(a[0, 12:], b[0, 12:])


def test_targets_of_minus_100_are_ignored(model):
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    masked = targets.clone()
    masked[:, :10] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 97), targets[:, 10:].reshape(-1))
    assert torch.allclose(loss, expected)


def test_loss_of_an_untrained_model_is_near_uniform(model):
    _, loss = model(torch.randint(0, 97, (4, 32)), torch.randint(0, 97, (4, 32)))
    assert abs(loss.item() - math.log(97)) < 0.3


def test_weight_tying_and_residual_init():
    torch.manual_seed(0)
    m = GPT(tiny_config(num_hidden_layers=8, hidden_size=256, num_attention_heads=4))
    assert m.lm_head.weight is m.token_emb.weight
    scaled = m.blocks[0].attn.out_proj.weight.std().item()
    assert abs(scaled - 0.02 / math.sqrt(16)) < 0.001
    assert abs(m.blocks[0].attn.qkv_proj.weight.std().item() - 0.02) < 0.001


def test_parameter_count(model):
    config = model.config
    per_block = 4 * config.hidden_size + (3 + 1 + 8) * config.hidden_size ** 2 + (3 + 1 + 4 + 1) * config.hidden_size
    total = ((config.vocab_size + config.block_size) * config.hidden_size + config.num_hidden_layers * per_block
             + 2 * config.hidden_size)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - config.block_size * config.hidden_size



@pytest.mark.parametrize("choices", [{}, {"bias": True}, {"tie_embeddings": False}, {"position": "rope"},
                                     {"bias": True, "position": "rope", "tie_embeddings": False, "qk_norm": True}])
def test_the_config_counts_the_parameters_without_building_the_model(choices):
    config = GPTConfig(vocab_size=101, block_size=17, hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
                       **choices)
    assert config.num_params() == GPT(config).num_params(non_embedding=False)


def test_weight_decay_on_matrices_only(model):
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_equals_the_big_batch(model):
    """Two micro-batches of 4, each loss / 2, give the gradients of one batch of 8 (fp32, no dropout)."""
    model.train()
    idx, targets = torch.randint(0, 97, (8, 32)), torch.randint(0, 97, (8, 32))
    model(idx, targets)[1].backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):
        (model(idx[half], targets[half])[1] / 2).backward()
    for g, p in zip(big, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_bad_shapes_are_one_clear_error():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        tiny_config(hidden_size=50, num_attention_heads=4)
    m = GPT(tiny_config())
    with pytest.raises(ValueError, match="longer than block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


# ----------------------------------------------------------------------------- choices beyond GPT-2

VARIANTS = [dict(position="rope"), dict(qk_norm=True), dict(activation="relu2"), dict(tie_embeddings=False),
            dict(logit_softcap=5.0), dict(embedding_dropout=0.3), dict(zero_init_residual=True),
            dict(position="rope", qk_norm=True, activation="relu2", tie_embeddings=False, logit_softcap=15.0)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v))
def test_every_variant_learns(variant):
    torch.manual_seed(0)
    m = GPT(tiny_config(**variant)).train()
    idx = torch.randint(0, 97, (4, 16))
    optimizer = m.configure_optimizer(0.0, 3e-3, (0.9, 0.95), "cpu")
    losses = []
    for _ in range(30):  # learn one batch by heart
        loss = m(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_rope_scores_depend_on_distance_only():
    from model import rotary_angles, rotate
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda i, j: (rotate(q, rotary_angles(torch.tensor([i]), 8)) *  # noqa: E731
                          rotate(k, rotary_angles(torch.tensor([j]), 8))).sum().item()
    assert score(7, 3) == pytest.approx(score(107, 103), rel=1e-4) != pytest.approx(score(7, 4), rel=1e-4)
    assert not hasattr(GPT(tiny_config(position="rope")), "pos_emb")


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(1)
    m = GPT(tiny_config(embedding_dropout=0.5)).train()
    idx = torch.tensor([[5, 6, 5, 7, 5] * 4])
    x = m.embed(idx)[0]
    fives = x[idx[0] == 5]
    assert torch.equal(fives, fives[:1].expand_as(fives))  # the same word, the same fate, everywhere
    kept = [w for w in range(97) if m.embed(torch.tensor([[w]])).abs().sum() > 0]
    assert 0 < len(kept) < 97
    assert torch.equal(m.eval().embed(idx), m.token_emb(idx))  # evaluation drops nothing


@pytest.mark.parametrize("place", ["input", "attention", "residual", "head"])
def test_a_dropout_place_drops_in_training_only(place):
    """Dropout at one place (the others at 0): the training forward is random, evaluation the
    model's own."""
    rates = {"dropout": 0.0, "attention_dropout": 0.0, "residual_dropout": 0.0, "head_dropout": 0.0}
    rates["dropout" if place == "input" else f"{place}_dropout"] = 0.5
    torch.manual_seed(0)
    m, plain = GPT(tiny_config(**rates)), GPT(tiny_config())
    plain.load_state_dict(m.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    m.train(), plain.train()
    assert not torch.equal(m(idx)[0], m(idx)[0]) and torch.equal(plain(idx)[0], plain(idx)[0])
    m.eval(), plain.eval()
    assert torch.equal(m(idx)[0], plain(idx)[0])


def test_dropout_places_without_a_rate_of_their_own_take_dropouts():
    """attention_dropout and residual_dropout below 0 (the default, and every older checkpoint)
    take dropout's rate, as when it was one setting; head_dropout is 0 unless set."""
    m = GPT(tiny_config(dropout=0.2))
    attn = m.blocks[0].attn
    assert (m.dropout.p, attn.dropout, attn.resid_dropout.p) == (0.2, 0.2, 0.2)
    assert m.blocks[1].mlp.dropout.p == 0.2 and m.config.head_dropout == 0.0
    m = GPT(tiny_config(dropout=0.2, attention_dropout=0.0, residual_dropout=0.1))
    assert (m.dropout.p, m.blocks[0].attn.dropout, m.blocks[0].mlp.dropout.p) == (0.2, 0.0, 0.1)


def test_softcap_untied_and_zero_init():
    m = GPT(tiny_config(logit_softcap=2.0, tie_embeddings=False, zero_init_residual=True))
    assert m.lm_head.weight is not m.token_emb.weight
    assert all(b.attn.out_proj.weight.abs().sum() == 0 and b.mlp.down_proj.weight.abs().sum() == 0 for b in m.blocks)
    logits, _ = m(torch.randint(0, 97, (2, 8)) * 0 + 3)
    assert logits.abs().max() < 2.0


def test_muon_orthogonalizes_and_learns():
    from muon import muon_with_adamw, orthogonalize
    g = torch.randn(48, 16)
    singular = torch.linalg.svdvals(orthogonalize(g))
    assert singular.min() > 0.5 and singular.max() < 1.5  # every direction moves by about the same amount
    torch.manual_seed(0)
    m = GPT(tiny_config()).train()
    optimizer = muon_with_adamw(m, muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    assert len(optimizer.param_groups) == 3 and optimizer.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 3e-3)
    idx = torch.randint(0, 97, (4, 16))
    first = m(idx[:, :-1], idx[:, 1:])[1].item()
    for _ in range(30):
        m(idx[:, :-1], idx[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert m(idx[:, :-1], idx[:, 1:])[1].item() < first - 1.0
    state = optimizer.state_dict()
    fresh = muon_with_adamw(m, 0.02, 3e-3, 0.0, (0.9, 0.95))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.optimizers[0].state[m.blocks[0].attn.qkv_proj.weight]["momentum"],
                       optimizer.optimizers[0].state[m.blocks[0].attn.qkv_proj.weight]["momentum"])
