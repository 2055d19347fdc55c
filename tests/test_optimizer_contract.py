"""The contract every scalelab optimizer keeps, one table for all of them (in the manner of optax's test table).

Each optimizer in ``scalelab.recipe.OPTIMIZERS`` (SGD, LARS, LAMB, RMSprop warm-up, AdamW, K-FAC, Neumann):
converges on a quadratic (a bare parameter vector, and least squares through an ``nn.Linear``, where K-FAC has a
layer to precondition) and on Rosenbrock; keeps parameter and state dtypes; ``state_dict`` round-trips through
``torch.save``/``torch.load(weights_only=True)`` and resumes bit for bit; param groups are independent; a torch LR
scheduler drives it; parameters without gradient are skipped and a closure's loss is returned; and 2 real gloo
workers (separate processes, DDP) train exactly like one process emulating them (``parallel.emulate_workers``).

K-FAC on a bare parameter has no layer to precondition: there it is its base update (momentum SGD), which is what
the fallback for unsupported parameters promises.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scalelab.config import ModelConfig, RecipeConfig
from scalelab.models import build_model
from scalelab.parallel.runtime import exit_worker
from scalelab.recipe import (LAMB, LARS, OPTIMIZERS, SGD, AdamW, LRSchedule, Neumann, RMSpropWarmup,
                             build_optimizer, eval_weights, kfac_optimizer, param_groups)
from scalelab.recipe.norm import set_emulated_workers

F64 = torch.float64


def _kfac(p, lr, model=None):
    return kfac_optimizer(SGD(p, lr=lr, momentum=0.9), model if model is not None else nn.Module(),
                          damping=1e-2, kl_clip=1e-3)


# name -> (constructor(params, lr, model), LR for the quadratic, for Rosenbrock, for least squares through a
# Linear layer); no weight decay: known optimum
CONTRACT = {
    "sgd": (lambda p, lr, model=None: SGD(p, lr=lr, momentum=0.9), 0.1, 0.002, 0.1),
    "lars": (lambda p, lr, model=None: LARS(p, lr=lr, weight_decay=0.0, trust_coef=0.01), 0.5, 0.5, 2.0),
    "lamb": (lambda p, lr, model=None: LAMB(p, lr=lr, weight_decay=0.0), 0.05, 0.05, 0.05),
    "adamw": (lambda p, lr, model=None: AdamW(p, lr=lr, weight_decay=0.0), 0.5, 0.5, 0.1),
    "rmsprop_warmup": (lambda p, lr, model=None: RMSpropWarmup(p, lr=lr, steps_per_epoch=10, center_epochs=2.0,
                                                               period_epochs=2.0), 0.1, 0.002, 0.1),
    "kfac": (_kfac, 0.1, 0.002, 0.1),
    "neumann": (lambda p, lr, model=None: Neumann(p, lr=lr, beta=0.0, mu_steps=20, burnin_steps=10,
                                                  reset_steps=100), 0.1, 0.002, 0.2),
}
NAMES = list(CONTRACT)


def param(*values, dtype=F64):
    return nn.Parameter(torch.tensor(values, dtype=dtype))


def quadratic_grads(p, a=(1.0, 3.0, 0.5), c=(0.2, -0.4, 1.0)):
    """Gradient of 0.5 * sum(a (w - c)^2) (a position-dependent gradient, so trajectories can diverge)."""
    a, c = torch.tensor(a, dtype=p.dtype), torch.tensor(c, dtype=p.dtype)
    return a * (p.detach() - c)


def test_contract_covers_every_registered_optimizer():
    assert set(CONTRACT) == set(OPTIMIZERS)


def minimise(name, grad_fn, w0, steps, lr):
    make, *_ = CONTRACT[name]
    w = param(*w0)
    opt = make([w], lr)
    sched = LRSchedule(peak=lr, total_steps=steps, decay="cosine")   # LARS and LAMB need a decaying LR
    for t in range(steps):
        opt.param_groups[0]["lr"] = sched(t)
        w.grad = grad_fn(w.detach())
        opt.step()
    with eval_weights(opt):
        return w.detach().clone()


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_quadratic(name):
    a, c = torch.tensor([1.0, 2.0, 4.0], dtype=F64), torch.tensor([0.5, -0.3, 0.2], dtype=F64)
    w = minimise(name, lambda w: a * (w - c), [1.0, -1.5, 2.0], 200, CONTRACT[name][1])
    torch.testing.assert_close(w, c, rtol=0, atol=1e-3)


def rosenbrock_grad(w):
    x, y = w[0].item(), w[1].item()   # f = (1 - x)^2 + 100 (y - x^2)^2
    return torch.tensor([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)], dtype=w.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_rosenbrock(name):
    w = minimise(name, rosenbrock_grad, [-1.0, 1.5], 2000, CONTRACT[name][2])
    torch.testing.assert_close(w, torch.ones(2, dtype=F64), rtol=0, atol=2e-2)


def least_squares_problem():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=gen, dtype=F64) * torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=F64)
    w_true, b_true = torch.randn(2, 4, generator=gen, dtype=F64), torch.randn(2, generator=gen, dtype=F64)
    return x, x @ w_true.T + b_true, w_true, b_true


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_least_squares_through_a_layer(name):
    """A quadratic in (W, b) reached through nn.Linear: the case K-FAC preconditions (badly scaled inputs)."""
    make, _, _, lr = CONTRACT[name]
    x, y, w_true, b_true = least_squares_problem()
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    opt = make(list(model.parameters()), lr, model)
    steps = 200
    sched = LRSchedule(peak=lr, total_steps=steps, decay="cosine")
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = sched(t)
        opt.zero_grad()
        (0.5 * (model(x) - y).pow(2).sum(1).mean()).backward()
        opt.step()
    with eval_weights(opt):
        torch.testing.assert_close(model.weight.detach(), w_true, rtol=0, atol=2e-3)
        torch.testing.assert_close(model.bias.detach(), b_true, rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_keeps_dtype(name, dtype):
    make, lr, *_ = CONTRACT[name]
    w = param(1.0, -2.0, 3.0, dtype=dtype)
    opt = make([w], lr)
    for _ in range(12):   # past Neumann's burn-in
        w.grad = quadratic_grads(w)
        opt.step()
    assert w.dtype == dtype and torch.isfinite(w).all()
    for value in opt.state[w].values():
        if isinstance(value, torch.Tensor):
            assert value.dtype == dtype
    # through a model: K-FAC's factors are kept in at least float32 and the parameters keep their dtype
    model = nn.Linear(3, 2).to(dtype)
    opt = make(list(model.parameters()), lr, model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3, dtype=dtype)).pow(2).mean().backward()
        opt.step()
    assert model.weight.dtype == dtype and torch.isfinite(model.weight).all()
    if name == "kfac":
        assert opt.kfac.layers[0].A.dtype == torch.promote_types(dtype, torch.float32)


def two_group_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def train(model, opt, lr, steps, start=0):
    """Deterministic steps on a fixed batch with a changing LR (so the momentum correction is exercised)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen, dtype=F64), torch.randn(8, 1, generator=gen, dtype=F64)
    for t in range(start, start + steps):
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 + 0.5 * math.sin(t))
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_is_bit_identical(name):
    make, lr, *_ = CONTRACT[name]
    steps = 14 if name == "neumann" else 10          # Neumann: split after its burn-in
    straight = two_group_model()
    opt = make(param_groups(straight, 0.01), lr, straight)
    train(straight, opt, lr, steps)

    first = two_group_model()
    opt = make(param_groups(first, 0.01), lr, first)
    train(first, opt, lr, steps // 2 + 1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = two_group_model()
    resumed.load_state_dict(ckpt["model"])
    opt = make(param_groups(resumed, 0.01), lr, resumed)
    opt.load_state_dict(ckpt["opt"])
    train(resumed, opt, lr, steps - steps // 2 - 1, start=steps // 2 + 1)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_are_independent(name):
    """Two groups with their own LR in one optimizer == one optimizer per group.

    Neumann's regulariser uses the norm of the whole parameter vector, which couples the groups by design (the
    paper); with it off (alpha = beta = 0) the groups are independent.
    """
    make, lr, *_ = CONTRACT[name]
    if name == "neumann":
        make = lambda p, lr: Neumann(p, lr=lr, alpha=0.0, beta=0.0, burnin_steps=2, reset_steps=3)  # noqa: E731
    a1, b1 = param(1.0, -2.0, 3.0), param(0.5, 0.1, -1.0)
    a2, b2 = param(1.0, -2.0, 3.0), param(0.5, 0.1, -1.0)
    joint = make([{"params": [a1]}, {"params": [b1], "lr": lr / 3}], lr)
    split = [make([a2], lr), make([b2], lr / 3)]
    for _ in range(6):
        for p in (a1, b1, a2, b2):
            p.grad = quadratic_grads(p)
        joint.step()
        for opt in split:
            opt.step()
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)


@pytest.mark.parametrize("name", NAMES)
def test_works_with_torch_lr_scheduler(name):
    make, lr, *_ = CONTRACT[name]
    w1, w2 = param(1.0, -2.0, 3.0), param(1.0, -2.0, 3.0)
    opt1, opt2 = make([w1], lr), make([w2], lr)
    sched = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.3)
    for t in range(14):
        opt2.param_groups[0]["lr"] = lr * 0.3 ** (t // 2)
        for w, opt in ((w1, opt1), (w2, opt2)):
            w.grad = quadratic_grads(w)
            opt.step()
        sched.step()
    assert torch.equal(w1, w2)
    assert w1.tolist() != [1.0, -2.0, 3.0]


@pytest.mark.parametrize("name", NAMES)
def test_skips_params_without_grad_and_returns_closure_loss(name):
    make, lr, *_ = CONTRACT[name]
    w, frozen = param(1.0, -2.0), param(3.0, 4.0)
    opt = make([w, frozen], lr)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert frozen.tolist() == [3.0, 4.0] and not opt.state[frozen]
    assert w.tolist() != [1.0, -2.0]


# ---- 2 real gloo workers == one process emulating them ---------------------------------------------------

WORKERS, STEPS, BATCH = 2, 8, 32
LRS = {"sgd": 0.1, "lars": 2.0, "lamb": 0.01, "adamw": 0.01, "rmsprop_warmup": 0.1, "kfac": 0.1, "neumann": 0.05}


def _recipe(name):
    # K-FAC refreshes its inverses every 3 steps; Neumann leaves its burn-in after 2 and resets m at step 4
    return RecipeConfig(optimizer=name, base_lr=LRS[name], base_batch=BATCH, weight_decay=1e-3,
                        kfac_inverse_every=3, neumann_burnin_epochs=1.0, neumann_reset_epochs=1.0,
                        rms_center_epochs=1.0, rms_period_epochs=1.0)


def _net():
    torch.manual_seed(0)
    return build_model(ModelConfig(name="mlp", width=8, depth=2, norm="bn"), (6,), 3).double()


def _batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(BATCH, 6, generator=gen, dtype=F64), torch.randint(0, 3, (BATCH,), generator=gen))
            for _ in range(STEPS)]


def _train(name, model, forward, shard):
    opt = build_optimizer(_recipe(name), model, steps_per_epoch=2)
    for t, (x, y) in enumerate(_batches()):
        for g in opt.param_groups:
            g["lr"] = LRS[name] * (1 + t) / STEPS
        opt.zero_grad()
        x, y = shard(x), shard(y)
        nn.functional.cross_entropy(forward(x), y).backward()
        opt.step()
    with eval_weights(opt):
        return {k: v.detach().clone() for k, v in model.named_parameters()}


def _worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    share = BATCH // world
    for name in NAMES:
        model = _net()
        ddp = nn.parallel.DistributedDataParallel(model)
        results[name] = _train(name, model, ddp, lambda t: t[rank * share:(rank + 1) * share])
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    exit_worker()  # as every worker of scalelab's own jobs leaves: gloo's static destructors may abort


def test_real_gloo_workers_equal_emulated_workers(tmp_path):
    mp.spawn(_worker, args=(WORKERS, str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=WORKERS,
             join=True)
    real = torch.load(tmp_path / "out.pt", weights_only=True)
    for name in NAMES:
        model = _net()
        set_emulated_workers(model, WORKERS, 1)                         # BN per worker, in one process
        emulated = _train(name, model, model, lambda t: t)
        model = _net()
        plain = _train(name, model, model, lambda t: t)                 # one BN over the whole batch
        for key, p in emulated.items():
            torch.testing.assert_close(real[name][key], p, rtol=1e-9, atol=1e-11, msg=f"{name}: {key}")
        assert max((real[name][k] - p).abs().max().item() for k, p in plain.items()) > 1e-6, name
