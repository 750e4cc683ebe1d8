"""
Muon (Jordan et al. 2024, "MomentUm Orthogonalized by Newton-Schulz"): SGD with Nesterov momentum whose update for a
weight matrix is replaced by the nearest semi-orthogonal matrix, so that every direction of the update moves the
weights by the same amount. For the hidden matrices of the transformer blocks; the embeddings, the output layer and
the vectors (norms, biases) stay with AdamW.

    optimizer = muon_with_adamw(model, muon_lr=0.02, adamw_lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
"""

import torch


def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD, g = U S V^T), approximately, by a quintic
    Newton-Schulz iteration whose coefficients push every singular value towards 1 fast (Jordan et al.)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)  # singular values in [0, 1], where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: momentum, then an orthogonalized step, scaled so that tall and wide matrices move
    alike; decoupled weight decay as AdamW has it."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buffer.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buffer, alpha=group["momentum"])  # Nesterov
                update = orthogonalize(update.float(), group["ns_steps"]).to(p.dtype)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)


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


def muon_with_adamw(model, muon_lr, adamw_lr, weight_decay, betas, device_type="cpu"):
    """Muon for the 2-D weights of model.blocks, without weight decay; AdamW for the rest (embeddings, output layer,
    norms, biases; decay on its matrices only). Every param group records lr_scale, its learning rate over adamw_lr,
    so that one schedule (group["lr"] = schedule * lr_scale) drives both."""
    in_blocks = {id(p) for p in model.blocks.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() == 2 and id(p) in in_blocks]
    others = [p for p in params if id(p) not in {id(m) for m in matrices}]
    muon = Muon([{"params": matrices, "lr_scale": muon_lr / adamw_lr}], lr=muon_lr)  # no decay, as its authors
    adamw = torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}],
                              lr=adamw_lr, betas=betas, fused=device_type == "cuda")
    return Optimizers(muon, adamw)
