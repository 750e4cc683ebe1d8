"""
Muon (Jordan et al. 2024, "MomentUm Orthogonalized by Newton-Schulz"): SGD with Nesterov momentum whose update for a
weight matrix is replaced by the nearest semi-orthogonal matrix, so that every direction of the update moves the
weights by the same amount. For the hidden matrices of the transformer blocks; the embeddings, the output layer and
the vectors (norms, biases) stay with AdamW.

    optimizer = muon_with_adamw(model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

The matrices of one shape (every block's query-key-value projection, say) are orthogonalized
together: stacked, they go through one chain of batched matmuls instead of one chain each, a few
launches per shape rather than per matrix. Beside the optimizers, Average: a moving average of the
weights that training takes after each step (Polyak averaging), whichever optimizer made them.
"""

import copy

import torch


def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD, g = U S V^T), approximately, by a
    quintic Newton-Schulz iteration whose coefficients push every singular value towards 1 fast
    (Jordan et al.). g is one matrix (rows, cols) or a stack of them (count, rows, cols), each
    orthogonalized on its own: orthogonalize(torch.stack([a, b]))[1] equals orthogonalize(b)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    # each matrix over its own norm: singular values in [0, 1], where the iteration converges
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    if tall:
        # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def same_shape_batches(params):
    """params split into lists of one shape, dtype and device each, in order of first appearance:
    what one batched orthogonalize can take.
    [q0 (768, 256), o0 (256, 256), q1 (768, 256)] -> [[q0, q1], [o0]]"""
    batches = {}
    for p in params:
        batches.setdefault((p.shape, p.dtype, p.device), []).append(p)
    return list(batches.values())


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: momentum, then an orthogonalized step, scaled so that tall and wide
    matrices move alike; decoupled weight decay as AdamW has it (p *= 1 - lr * weight_decay; none by
    default)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        # the Newton-Schulz function that step() calls; a training loop may put a compiled one here
        self.orthogonalize = orthogonalize

    def batch_shapes(self):
        """(count, rows, cols) of each stack that step() orthogonalizes: a compiled orthogonalize
        warmed up on these has compiled every graph it will need."""
        params = [p for group in self.param_groups for p in group["params"]]
        return [(len(batch), *batch[0].shape) for batch in same_shape_batches(params)]

    def warm_up(self, orthogonalize):
        """orthogonalize run once on zeros of each stack's shape (no random stream moves): a
        compiled one makes every graph step() will need now. Returns its results."""
        device = self.param_groups[0]["params"][0].device
        return [orthogonalize(torch.zeros(shape, device=device), self.defaults["ns_steps"])
                for shape in self.batch_shapes()]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for params in same_shape_batches(with_grad):
                self.step_batch(params, group)

    def step_batch(self, params, group):
        """Momentum, the updates orthogonalized together, and the step: matrices of one shape."""
        grads = [p.grad for p in params]
        buffers = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in params]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, grads)
        # Nesterov: the gradient plus the momentum it leads to
        updates = torch._foreach_add(grads, buffers, alpha=group["momentum"])
        dtype = params[0].dtype
        stacked = torch.stack(updates).float()
        orthogonal = self.orthogonalize(stacked, group["ns_steps"]).to(dtype).unbind(0)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        # tall matrices step by sqrt(rows / cols) more, so that they move as much as wide ones
        rows, cols = params[0].shape
        scale = max(1.0, rows / cols) ** 0.5
        torch._foreach_add_(params, list(orthogonal), alpha=-group["lr"] * scale)


class Optimizers:
    """Several optimizers used as one: the training loop, the GradScaler and checkpoints see a single object."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state):
        for optimizer, one in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(one)


def muon_with_adamw(model, muon_lr, adamw_lr, weight_decay, betas, device_type="cpu",
                    muon_weight_decay=0.0, embedding_lr=0.0):
    """Muon for the 2-D weights of model.blocks, AdamW for the rest (embeddings, output layer,
    norms, biases; weight_decay on its matrices only). Muon's matrices decay by muon_weight_decay
    (decoupled, at Muon's learning rate; 0, the default, leaves them alone as Muon's authors did).
    embedding_lr > 0: the token table's own AdamW rate (in a group of its own; the output layer's
    too where they are tied), as the speedrun recipes give it: each row is one token's and moves
    only in the steps that token is in. Every param group records lr_scale, its learning rate
    over adamw_lr, so that one schedule (group["lr"] = schedule * lr_scale) drives both."""
    in_blocks = {id(p) for p in model.blocks.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() == 2 and id(p) in in_blocks]
    table = [model.token_emb.weight] if embedding_lr > 0 else []
    apart = {id(p) for p in matrices + table}
    others = [p for p in params if id(p) not in apart]
    muon = Muon([{"params": matrices, "lr_scale": muon_lr / adamw_lr}], lr=muon_lr,
                weight_decay=muon_weight_decay)
    groups = [{"params": [p for p in others if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}]
    if table:
        groups.append({"params": table, "weight_decay": weight_decay, "lr": embedding_lr,
                       "lr_scale": embedding_lr / adamw_lr})
    adamw = torch.optim.AdamW(groups, lr=adamw_lr, betas=betas, fused=device_type == "cuda")
    return Optimizers(muon, adamw)


class Average:
    """A moving average of a model's weights (Polyak averaging): after step t, the mean of the
    weights after each step, w_1..w_t, w_i weighted by decay^(t-i): about the last 1 / (1 - decay)
    steps. decay=0.5, after 3 steps: (w_1 + 2 w_2 + 4 w_3) / 7. average.model: a copy of the model
    holding the average, to evaluate and save.

        average = Average(model, decay=0.99)
        optimizer.step(); average.update(model, step)      # step: 1, 2, ... (the steps taken)
    """

    def __init__(self, model, decay):
        self.model, self.decay = copy.deepcopy(model), decay

    @torch.no_grad()
    def update(self, model, step):
        """Take in model's weights after step `step` (1 the first: the average is then w_1)."""
        share = (1 - self.decay) / (1 - self.decay ** step)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), share)
