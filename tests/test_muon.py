"""Muon: Newton-Schulz batched over matrices of one shape (the same steps as one matrix at a time),
compiled or not, and decoupled weight decay on its matrices, an option that is off by default."""
import torch

from model import GPT, GPTConfig
from muon import Average, Muon, muon_with_adamw, orthogonalize, same_shape_batches
from runtime import compile_or_eager


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=97, block_size=32, hidden_size=48, num_hidden_layers=3,
                       num_attention_heads=4, dropout=0.0, bias=True, position="rope",
                       tie_embeddings=False)
    return GPT(config)


def block_matrices(model):
    return [p for p in model.blocks.parameters() if p.dim() == 2]


def grads_for(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=generator) for p in params]


def one_matrix_at_a_time(model, steps, lr=0.02, momentum=0.95, weight_decay=0.0):
    """The reference: Muon's step written out per matrix (momentum, Nesterov, orthogonalize, decay,
    the scaled step) on the blocks' matrices of model, with the gradients of grads_for."""
    matrices = block_matrices(model)
    buffers = [torch.zeros_like(p) for p in matrices]
    with torch.no_grad():
        for step in range(steps):
            for p, buffer, grad in zip(matrices, buffers, grads_for(matrices, step)):
                buffer.mul_(momentum).add_(grad)
                update = orthogonalize(grad.add(buffer, alpha=momentum).float()).to(p.dtype)
                p.mul_(1 - lr * weight_decay)
                p.add_(update, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)


def batched(model, steps, compile=False, **options):
    """Muon's own step on the blocks' matrices, the same gradients as the reference; compile: its
    Newton-Schulz compiled as train.py does it."""
    matrices = block_matrices(model)
    optimizer = Muon(matrices, lr=0.02, **options)
    if compile:
        optimizer.orthogonalize = compile_or_eager(orthogonalize, optimizer.warm_up, dynamic=False)
    for step in range(steps):
        for p, grad in zip(matrices, grads_for(matrices, step)):
            p.grad = grad
        optimizer.step()
    return optimizer


def test_a_stack_is_orthogonalized_matrix_by_matrix():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 10.0, 0.01, 3.0, 0.5])
    for shape in [(5, 48, 16), (3, 16, 48), (4, 24, 24)]:  # tall, wide, square
        stack = torch.randn(shape, generator=generator) * scales[:shape[0], None, None]
        together = orthogonalize(stack)
        for g, o in zip(stack, together):
            torch.testing.assert_close(o, orthogonalize(g), rtol=1e-5, atol=1e-6)
            # each on its own scale, not the stack's
            singular = torch.linalg.svdvals(o)
            assert singular.min() > 0.5 and singular.max() < 1.5


def test_same_shape_batches_keep_order_and_split_by_shape_and_dtype():
    a, b, c = torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(3, 2)
    d = torch.zeros(3, 2, dtype=torch.float64)
    batches = same_shape_batches([a, b, c, d])
    assert [[id(p) for p in batch] for batch in batches] == [[id(a), id(c)], [id(b)], [id(d)]]


def test_batched_step_equals_the_step_one_matrix_at_a_time():
    for weight_decay in (0.0, 0.1):
        reference, ours = tiny_gpt(), tiny_gpt()
        one_matrix_at_a_time(reference, steps=4, weight_decay=weight_decay)
        optimizer = batched(ours, steps=4, weight_decay=weight_decay)
        for p, q in zip(reference.parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    h = ours.config.hidden_size
    assert optimizer.batch_shapes() == [(3, 3 * h, h), (3, h, h), (3, 4 * h, h), (3, h, 4 * h)]


def test_compiled_newton_schulz_gives_the_eager_step():
    eager, compiled = tiny_gpt(), tiny_gpt()
    # the query-key-value matrices only: one graph to compile (seconds on a CPU)
    for model in (eager, compiled):
        for block in model.blocks:
            block.mlp, block.attn.out_proj = torch.nn.Identity(), torch.nn.Identity()
    batched(eager, steps=2)
    optimizer = batched(compiled, steps=2, compile=True)
    assert optimizer.orthogonalize is not orthogonalize and len(optimizer.batch_shapes()) == 1
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def zero_gradient_step(model, **options):
    """One muon_with_adamw step with every gradient zero: only weight decay can move a weight."""
    optimizer = muon_with_adamw(model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.0,
                                betas=(0.9, 0.99), **options)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer


def test_muon_matrices_have_no_weight_decay_by_default():
    model, before = tiny_gpt(), tiny_gpt()
    optimizer = zero_gradient_step(model)
    assert optimizer.optimizers[0].param_groups[0]["weight_decay"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


def test_muon_weight_decay_shrinks_only_muon_matrices():
    model, before = tiny_gpt(), tiny_gpt()
    zero_gradient_step(model, muon_weight_decay=0.1)
    in_blocks = {id(p) for p in block_matrices(model)}
    for p, q in zip(model.parameters(), before.parameters()):
        # decoupled, at Muon's learning rate
        expected = q * (1 - 0.02 * 0.1) if id(p) in in_blocks else q
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-7)


def test_muon_weight_decay_is_decoupled_from_the_gradient():
    plain, decayed, start = tiny_gpt(), tiny_gpt(), tiny_gpt()
    batched(plain, steps=1)
    batched(decayed, steps=1, weight_decay=0.5)
    for p, q, p0 in zip(*(block_matrices(m) for m in (plain, decayed, start))):
        torch.testing.assert_close(q - p, -0.02 * 0.5 * p0, rtol=1e-4, atol=1e-7)


def test_the_embedding_learning_rate_moves_the_token_table_only():
    """Adam's first step moves a weight by its rate times the sign of its gradient: with every
    gradient zero but the token table's, the table moves by embedding_lr and nothing else moves."""
    for embedding_lr, moved in ((0.0, 1e-3), (0.1, 0.1)):
        model, before = tiny_gpt(), tiny_gpt()
        optimizer = muon_with_adamw(model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.0,
                                    betas=(0.9, 0.99), embedding_lr=embedding_lr)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        model.token_emb.weight.grad.fill_(1.0)
        optimizer.step()
        for (name, p), q in zip(model.named_parameters(), before.parameters()):
            expected = q - moved if name == "token_emb.weight" else q
            torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    scales = [g.get("lr_scale", 1.0) for g in optimizer.optimizers[1].param_groups]
    assert scales == [1.0, 1.0, 100.0]  # the schedule's multiple for the table's group


def test_muon_weight_decay_survives_a_resume():
    optimizer = zero_gradient_step(tiny_gpt(), muon_weight_decay=0.1)
    fresh = muon_with_adamw(tiny_gpt(), 0.02, 1e-3, 0.0, (0.9, 0.99))
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.optimizers[0].param_groups[0]["weight_decay"] == 0.1


def test_the_average_weighs_step_i_by_decay_to_the_steps_since():
    """Average: after 3 steps at decay 0.5, (w_1 + 2 w_2 + 4 w_3) / 7, worked out by hand; the
    model it averages is left alone, and a tied matrix is averaged once, still tied."""
    model = GPT(GPTConfig(vocab_size=11, block_size=8, hidden_size=8, num_hidden_layers=1,
                          num_attention_heads=2))
    average = Average(model, decay=0.5)
    seen = []
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step * step))  # w_1 = 1, w_2 = 4, w_3 = 9
        seen.append([p.clone() for p in model.parameters()])
        average.update(model, step)
    for p, q in zip(average.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, torch.full_like(p, (1 + 2 * 4 + 4 * 9) / 7))
        assert torch.equal(q, torch.full_like(q, 9.0))
    assert average.model.lm_head.weight is average.model.token_emb.weight


def test_warm_up_runs_newton_schulz_once_per_stack_shape_on_zeros():
    optimizer = muon_with_adamw(tiny_gpt(), 0.02, 1e-3, 0.0, (0.9, 0.99)).optimizers[0]
    shapes = []
    results = optimizer.warm_up(
        lambda g, steps: shapes.append((tuple(g.shape), steps, g.abs().sum().item())))
    assert shapes == [(shape, 5, 0.0) for shape in optimizer.batch_shapes()] and len(results) == 4

