"""The Neumann optimizer against the equations of Krishnan, Xiao & Saurous (2017) on a quadratic with known Hessian.

The reference below is written on one flat vector with the Hessian H explicit (∇f(w) = H w - b), from the
algorithm as stated in the paper (Algorithm 2; /work/shared/ALGORITHMS.md §1); the optimizer works per tensor
with autograd-style gradients, so the two share no code.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from scalelab.config import load_config
from scalelab.errors import ConfigError
from scalelab.recipe import Neumann, build_optimizer, eval_weights
from scalelab.recipe.neumann import neumann_inner, neumann_mu

F64 = torch.float64


def quadratic(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    H = q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=F64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=F64)
    return H, b


def test_inner_loop_is_the_neumann_series_and_tends_to_newton():
    # Algorithm 1 on a quadratic: η m_K = -η Σ_{j=0..K} (I - ηH)^j ∇f(w)  ->  -H^{-1} ∇f(w)
    H, b = quadratic()
    w = torch.randn(5, dtype=F64)
    grad = lambda x: H @ x - b                                                # noqa: E731
    eta = 0.2                                                                 # ‖I - ηH‖ = 0.9 < 1
    for k in (0, 1, 5):
        series = sum(torch.linalg.matrix_power(torch.eye(5, dtype=F64) - eta * H, j) for j in range(k + 1))
        torch.testing.assert_close(neumann_inner(grad, w, eta, k), -eta * series @ grad(w))
    newton = -torch.linalg.solve(H, grad(w))
    assert (neumann_inner(grad, w, eta, 300) - newton).norm() < 1e-10
    assert (neumann_inner(grad, w, eta, 5) - newton).norm() > 1e-2           # not there after a few terms


def reference(H, b, w0, steps, lr, alpha, beta, gamma, mu_max, mu_steps, burnin, reset):
    """Algorithm 2 on the flat vector; returns (w, m, v, mu) after every step."""
    w, m, v, mu = w0.clone(), torch.zeros_like(w0), None, 0.0
    out, period, since = [], reset, 0
    for t in range(steps):
        g = H @ w - b
        if t < burnin:                                                        # vanilla SGD burn-in
            w = w - lr * g
        else:
            n = t - burnin
            if n == 0 or since >= period:                                     # reset: m <- -η ∇f
                if n == 0:
                    v = w.clone()
                else:
                    period *= 2
                since = 0
                m = -lr * g
            else:
                mu = min(mu_max, 1 - 1 / (1 + (1 + n / mu_steps)))
                u = w - v
                un = u.norm()
                # v_0 = w_0 makes u = 0 on the first step after a start: the regulariser's term is then 0
                d = g + (alpha * un ** 2 - beta / un ** 2) * u / un if un > 0 else g
                m = mu * m - lr * d
                w = w + mu * m - lr * d
                v = w + gamma * (v - w)
            since += 1
        out.append((w.clone(), m.clone(), None if v is None else v.clone(), mu))
    return out


def test_algorithm_2_on_a_quadratic():
    H, b = quadratic()
    w0 = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=F64)
    kw = dict(lr=0.1, alpha=0.3, beta=1e-3, gamma=0.9, mu_max=0.8, mu_steps=4)
    ref = reference(H, b, w0, 20, burnin=2, reset=3, **kw)
    # the optimizer on two tensors (the regulariser's norm is over all of them) and a frozen one
    p1, p2 = nn.Parameter(w0[:3].clone()), nn.Parameter(w0[3:].clone())
    frozen = nn.Parameter(torch.ones(2, dtype=F64))
    opt = Neumann([p1, p2, frozen], burnin_steps=2, reset_steps=3, **kw)
    for t in range(20):
        g = H @ torch.cat([p1.detach(), p2.detach()]) - b
        p1.grad, p2.grad = g[:3].clone(), g[3:].clone()
        opt.step()
        w, m, v, mu = ref[t]
        torch.testing.assert_close(torch.cat([p1.detach(), p2.detach()]), w, rtol=1e-12, atol=1e-12)
        if t >= 2:
            torch.testing.assert_close(torch.cat([opt.state[p1]["m"], opt.state[p2]["m"]]), m)
            torch.testing.assert_close(torch.cat([opt.state[p1]["v"], opt.state[p2]["v"]]), v)
    assert frozen.tolist() == [1.0, 1.0] and not opt.state[frozen]
    # resets at Neumann steps 0, 3, 3 + 6 = 9 and 9 + 12 = 21: m = -η ∇f there
    assert opt.state["neumann"]["period"] == 12
    # the output is w - μ m, and the stored (displaced) weights come back bit for bit
    stored = torch.cat([p1.detach(), p2.detach()]).clone()
    with eval_weights(opt):
        torch.testing.assert_close(torch.cat([p1.detach(), p2.detach()]), w - mu * m)
    assert torch.equal(torch.cat([p1.detach(), p2.detach()]), stored)


def test_converges_to_the_minimum_of_the_quadratic():
    H, b = quadratic()
    p = nn.Parameter(torch.zeros(5, dtype=F64))
    opt = Neumann([p], lr=0.1, beta=0.0, alpha=0.0, mu_steps=10, burnin_steps=5, reset_steps=50)
    for _ in range(400):
        p.grad = H @ p.detach() - b
        opt.step()
    with eval_weights(opt):
        torch.testing.assert_close(p.detach(), torch.linalg.solve(H, b), rtol=0, atol=1e-6)


def test_momentum_schedule():
    # μ ∝ 1 - 1/(1+t): 0.5 at the start, 0.9 at its peak (here after 8 units of mu_steps)
    assert neumann_mu(0, 10) == 0.5
    assert neumann_mu(30, 10) == pytest.approx(0.8)
    assert neumann_mu(80, 10) == pytest.approx(0.9) and neumann_mu(10_000, 10) == 0.9


def test_state_dict_round_trip():
    H, b = quadratic()
    make = lambda p: Neumann([p], lr=0.1, mu_steps=3, burnin_steps=1, reset_steps=2)   # noqa: E731
    a = nn.Parameter(torch.zeros(5, dtype=F64))
    opt = make(a)
    for _ in range(4):
        a.grad = H @ a.detach() - b
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    c = nn.Parameter(a.detach().clone())
    opt_c = make(c)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(6):
        for p, o in ((a, opt), (c, opt_c)):
            p.grad = H @ p.detach() - b
            o.step()
    assert torch.equal(a, c)


def test_build_from_config():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))                  # 26 parameters
    cfg = load_config(None, ["recipe.optimizer=neumann", "recipe.neumann_burnin_epochs=0.5",
                             "recipe.neumann_reset_epochs=2"])
    opt = build_optimizer(cfg.recipe, model, steps_per_epoch=10)
    assert isinstance(opt, Neumann)
    assert opt.hyper == dict(alpha=1e-7, beta=pytest.approx(26e-5), gamma=0.99, mu_max=0.9, mu_steps=10,
                             burnin_steps=5, reset_steps=20)
    with pytest.raises(ConfigError, match="recipe.neumann_gamma: 1.0 is out of range"):
        load_config(None, ["recipe.neumann_gamma=1"])
