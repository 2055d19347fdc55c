"""The recipe optimizers against their papers' update rules on tiny tensors (the shared contract of every
optimizer is in test_optimizer_contract.py).

Expected values are worked out by hand from the papers' equations (written in the comments) in plain Python
floats; they do not call the library's own building blocks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scalelab.config import RecipeConfig
from scalelab.errors import ConfigError
from scalelab.recipe import LAMB, LARS, SGD, AdamW, RMSpropWarmup, build_optimizer, param_groups, sgd_weight
from scalelab.recipe.parts import trust_ratio

F64 = torch.float64


def param(*values, dtype=F64):
    return nn.Parameter(torch.tensor(values, dtype=dtype))


def run_fixed(opt, p, grad, steps, lrs=None):
    """Take ``steps`` steps with the same gradient; return the parameter after each step as a list."""
    out = []
    for t in range(steps):
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[t]
        p.grad = torch.tensor(grad, dtype=p.dtype)
        opt.step()
        out.append(p.detach().tolist())
    return out


def close(actual, expected, tol=1e-12):
    assert actual == pytest.approx(expected, rel=tol, abs=tol)


# ---- SGD (Goyal et al. 2017) -------------------------------------------------------------------------------

def test_sgd_by_hand():
    # w = [1, -2], g = [0.5, 1], lr 0.1, m 0.9, wd 0.1; d = g + wd w; v = m v + lr d; w -= v
    w = param(1.0, -2.0)
    out = run_fixed(SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1), w, [0.5, 1.0], 3)
    close(out[0], [0.94, -2.08])            # d = [0.6, 0.8], v = [0.06, 0.08]
    close(out[1], [0.8266, -2.2312])        # d = [0.594, 0.792], v = [0.1134, 0.1512]
    close(out[2], [0.666274, -2.444968])    # d = [0.58266, 0.77688], v = [0.160326, 0.213768]


def test_sgd_momentum_correction_by_hand():
    # w = 1, g = 1, m = 0.9, lr 0.1 then 0.2. Step 1: v = 0.1, w = 0.9.
    # Corrected: v = 0.9 * (0.2 / 0.1) * 0.1 + 0.2 = 0.38 -> w = 0.52 (torch's u-form: u = 1.9).
    # Uncorrected: v = 0.9 * 0.1 + 0.2 = 0.29 -> w = 0.61.
    w = param(1.0)
    close(run_fixed(SGD([w], lr=0.1), w, [1.0], 2, lrs=[0.1, 0.2])[-1], [0.52])
    w = param(1.0)
    close(run_fixed(SGD([w], lr=0.1, momentum_correction=False), w, [1.0], 2, lrs=[0.1, 0.2])[-1], [0.61])


def test_sgd_nesterov_by_hand():
    # w = 1, g = 1, lr 0.1, m 0.9: v1 = 0.1, w1 = 1 - (0.9 * 0.1 + 0.1) = 0.81;
    # v2 = 0.19, w2 = 0.81 - (0.9 * 0.19 + 0.1) = 0.539
    w = param(1.0)
    out = run_fixed(SGD([w], lr=0.1, momentum=0.9, nesterov=True), w, [1.0], 2)
    close(out[0], [0.81])
    close(out[1], [0.539])


def quadratic_grads(p, a=(1.0, 3.0, 0.5), c=(0.2, -0.4, 1.0)):
    """Gradient of 0.5 * sum(a (w - c)^2) (a position-dependent gradient, so trajectories can diverge)."""
    a, c = torch.tensor(a, dtype=p.dtype), torch.tensor(c, dtype=p.dtype)
    return a * (p.detach() - c)


def run_pair(ours, ref, lrs):
    """Run two optimizers over their own copy of the same parameter with the same LR sequence."""
    (p,), (q,) = ours.param_groups[0]["params"], ref.param_groups[0]["params"]
    for lr in lrs:
        for opt, x in ((ours, p), (ref, q)):
            opt.param_groups[0]["lr"] = lr
            x.grad = quadratic_grads(x)
            opt.step()
    return p.detach(), q.detach()


LRS = [0.1, 0.5, 0.05, 0.3, 0.3, 1.0, 0.01, 0.2]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_correction_equals_torch_sgd_under_changing_lr(nesterov):
    p, q = param(1.0, -1.0, 2.0), param(1.0, -1.0, 2.0)
    ours = SGD([p], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    a, b = run_pair(ours, ref, LRS)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sgd_without_correction_differs_when_lr_changes():
    p, q = param(1.0, -1.0, 2.0), param(1.0, -1.0, 2.0)
    ours = SGD([p], lr=0.1, momentum=0.9, momentum_correction=False)
    a, b = run_pair(ours, torch.optim.SGD([q], lr=0.1, momentum=0.9), LRS)
    assert (a - b).abs().max() > 1e-2          # a wide margin, not rounding
    p, q = param(1.0, -1.0, 2.0), param(1.0, -1.0, 2.0)   # ...but equal while the LR is constant
    ours = SGD([p], lr=0.1, momentum=0.9, momentum_correction=False)
    a, b = run_pair(ours, torch.optim.SGD([q], lr=0.1, momentum=0.9), [0.1] * 8)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- trust ratio, LARS (You, Gitman, Ginsburg 2017) --------------------------------------------------------

def test_trust_ratio_and_zero_norms():
    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    assert trust_ratio(t(5.0), t(2.0)).item() == 2.5
    assert trust_ratio(t(5.0), t(1.0), coef=0.1, denominator=t(2.0)).item() == 0.25
    assert trust_ratio(t(0.0), t(2.0), coef=0.1).item() == 1.0     # ||w|| = 0
    assert trust_ratio(t(5.0), t(0.0), coef=0.1, denominator=t(1.0)).item() == 1.0   # ||g|| = 0


def test_lars_by_hand():
    # w = [3, 4], g = [0.6, 0.8], wd 0.2, eta 0.1, lr 2, m 0.9.
    # step 1: ||w|| = 5, ||g|| = 1, local = 0.1 * 5 / (1 + 0.2 * 5) = 0.25, d = g + 0.2 w = [1.2, 1.6],
    #         v = 2 * 0.25 * d = [0.6, 0.8], w = [2.4, 3.2]
    # step 2: ||w|| = 4, local = 0.1 * 4 / (1 + 0.8) = 2/9, d = [1.08, 1.44], lr * local * d = [0.48, 0.64],
    #         v = 0.9 * [0.6, 0.8] + [0.48, 0.64] = [1.02, 1.36], w = [1.38, 1.84]
    w = param(3.0, 4.0)
    out = run_fixed(LARS([w], lr=2.0, momentum=0.9, weight_decay=0.2, trust_coef=0.1), w, [0.6, 0.8], 2)
    close(out[0], [2.4, 3.2])
    close(out[1], [1.38, 1.84])


def test_lars_zero_norms_use_ratio_one():
    # ||w|| = 0: ratio 1, v = 0.1 * (g + 0) -> w = [-0.1, -0.1]
    w = param(0.0, 0.0)
    close(run_fixed(LARS([w], lr=0.1, weight_decay=0.2), w, [1.0, 1.0], 1)[0], [-0.1, -0.1])
    # ||g|| = 0: ratio 1 (not eta * 5 / (0 + 0.2 * 5) = 0.001), v = 0.1 * 0.2 * [3, 4] -> w = [2.94, 3.92]
    w = param(3.0, 4.0)
    close(run_fixed(LARS([w], lr=0.1, weight_decay=0.2), w, [0.0, 0.0], 1)[0], [2.94, 3.92])


def linear_model(weight, bias):
    model = nn.Linear(len(weight), 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight], dtype=F64))
        model.bias.copy_(torch.tensor(bias, dtype=F64))
    return model


def set_grads(model, weight_grad, bias_grad):
    model.weight.grad = torch.tensor([weight_grad], dtype=F64)
    model.bias.grad = torch.tensor(bias_grad, dtype=F64)


def test_lars_excludes_bias_from_decay_and_trust_ratio():
    model = linear_model([3.0, 4.0], [1.0])
    opt = LARS(param_groups(model, weight_decay=0.2), lr=2.0, trust_coef=0.1)
    set_grads(model, [0.6, 0.8], [0.5])
    opt.step()
    close(model.weight.detach().flatten().tolist(), [2.4, 3.2])   # as in test_lars_by_hand
    close(model.bias.detach().tolist(), [0.0])            # v = 2 * 0.5 (no ratio 0.1*1/0.6, no decay)


# ---- LAMB (You et al. 2019) --------------------------------------------------------------------------------

def test_lamb_by_hand():
    # Constant g: the bias-corrected moments are exactly g and g^2 at every step, so r = g / (|g| + eps).
    g, wd, lr, eps = [0.6, 0.8], 0.01, 0.1, 1e-6
    r = [gi / (abs(gi) + eps) for gi in g]
    w = param(3.0, 4.0)
    out = run_fixed(LAMB([w], lr=lr, eps=eps, weight_decay=wd), w, g, 2)
    expected, prev = [], [3.0, 4.0]
    for _ in range(2):
        u = [ri + wd * wi for ri, wi in zip(r, prev)]              # u = r + wd w
        ratio = math.hypot(*prev) / math.hypot(*u)                  # ||w|| / ||u||, phi = identity
        prev = [wi - lr * ratio * ui for wi, ui in zip(prev, u)]
        expected.append(prev)
    close(out[0], expected[0])
    close(out[1], expected[1])
    # The step has length lr * ||w||, whatever the gradient's scale: the point of the trust ratio.
    assert math.dist(out[0], [3.0, 4.0]) == pytest.approx(0.1 * 5.0)


def test_lamb_without_bias_correction_by_hand():
    # m = 0.1 g, v = 0.001 g^2 after one step; r = 0.1 g / (sqrt(0.001) |g| + eps); wd 0
    w = param(3.0, 4.0)
    out = run_fixed(LAMB([w], lr=0.1, eps=1e-6, weight_decay=0.0, bias_correction=False), w, [0.6, 0.8], 1)
    r = [0.1 * gi / (math.sqrt(0.001) * gi + 1e-6) for gi in (0.6, 0.8)]
    ratio = 5.0 / math.hypot(*r)
    close(out[0], [3.0 - 0.1 * ratio * r[0], 4.0 - 0.1 * ratio * r[1]])


def test_lamb_zero_norms():
    # ||w|| = 0: ratio 1, w = -lr * r = -0.1 * [1, -1] / (1 + eps)
    w = param(0.0, 0.0)
    close(run_fixed(LAMB([w], lr=0.1, eps=1e-6), w, [1.0, -1.0], 1)[0], [-0.1 / (1 + 1e-6), 0.1 / (1 + 1e-6)])
    # ||u|| = 0 (zero gradient, no decay): ratio 1, u = 0, nothing moves and nothing becomes NaN
    w = param(3.0, 4.0)
    assert run_fixed(LAMB([w], lr=0.1, weight_decay=0.0), w, [0.0, 0.0], 2)[-1] == [3.0, 4.0]


def test_lamb_excludes_bias_from_decay_and_trust_ratio():
    model = linear_model([3.0, 4.0], [2.0])
    opt = LAMB(param_groups(model, weight_decay=0.01), lr=0.1, eps=1e-6)
    set_grads(model, [0.6, 0.8], [0.5])
    opt.step()
    # bias: u = r = 0.5 / (0.5 + eps), ratio 1 -> 2 - 0.1 u (with the ratio it would be 2 - 0.1 * 2 = 1.8)
    close(model.bias.detach().tolist(), [2.0 - 0.1 * 0.5 / (0.5 + 1e-6)])
    u = [0.6 / (0.6 + 1e-6) + 0.03, 0.8 / (0.8 + 1e-6) + 0.04]
    ratio = 5.0 / math.hypot(*u)
    close(model.weight.detach().flatten().tolist(), [3.0 - 0.1 * ratio * u[0], 4.0 - 0.1 * ratio * u[1]])


# ---- AdamW (Loshchilov & Hutter 2019) ----------------------------------------------------------------------

def test_adamw_by_hand():
    # w = 1, g = 0.5 constant, lr 0.1, wd 0.1: w <- w (1 - 0.01) - 0.1 * m_hat / (sqrt(v_hat) + eps),
    # and m_hat / sqrt(v_hat) = g / |g| at every step for a constant gradient.
    w = param(1.0)
    out = run_fixed(AdamW([w], lr=0.1, eps=1e-8, weight_decay=0.1), w, [0.5], 2)
    step = 0.1 * 0.5 / (0.5 + 1e-8)
    close(out[0], [0.99 - step])
    close(out[1], [(0.99 - step) * 0.99 - step])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adamw_equals_torch_adamw(dtype, tol):
    p, q = param(1.0, -1.0, 2.0, dtype=dtype), param(1.0, -1.0, 2.0, dtype=dtype)
    ours = AdamW([p], lr=0.1, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    ref = torch.optim.AdamW([q], lr=0.1, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05, foreach=False)
    a, b = run_pair(ours, ref, LRS)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- RMSprop warm-up (Akiba, Suzuki, Fukuda 2017) ----------------------------------------------------------

def test_sgd_weight_pieces():
    bc, bp = 10.0, 5.0
    assert sgd_weight(0.0, bc, bp) == pytest.approx(0.5 * math.exp(-4.0))
    assert sgd_weight(bc, bc, bp) == 0.5
    assert sgd_weight(bc - 1e-9, bc, bp) == pytest.approx(0.5)               # continuous at bc
    h = 1e-6                                                                  # ...and so is the slope, 1/bp
    assert (sgd_weight(bc, bc, bp) - sgd_weight(bc - h, bc, bp)) / h == pytest.approx(1 / bp, rel=1e-4)
    assert (sgd_weight(bc + h, bc, bp) - sgd_weight(bc, bc, bp)) / h == pytest.approx(1 / bp, rel=1e-4)
    assert sgd_weight(bc + 1.0, bc, bp) == pytest.approx(0.7)                 # 0.5 + 1/5, not 0.5 + 2/5
    assert sgd_weight(bc + bp / 2 - 1e-12, bc, bp) == pytest.approx(1.0)     # reaches 1 at the switch
    assert sgd_weight(bc + bp / 2, bc, bp) == 1.0
    assert sgd_weight(100.0, bc, bp) == 1.0
    grid = [sgd_weight(e / 10, bc, bp) for e in range(200)]
    assert all(a <= b <= 1.0 for a, b in zip(grid, grid[1:]))


def test_rmsprop_warmup_by_hand():
    # w = 1, g = 2, lr 0.1, mu1 0.9, mu2 0.99, eps 1e-8, ratio 0.03, bc = 1, bp = 2, one step per epoch.
    # s <- 0.99 s + 0.01 g^2; d <- 0.9 d - (a_sgd + a_rms / (sqrt(s) + eps)) g; w <- w + 0.1 d
    w = param(1.0)
    opt = RMSpropWarmup([w], lr=0.1, momentum=0.9, rms_decay=0.99, eps=1e-8, rms_lr_ratio=0.03,
                        center_epochs=1.0, period_epochs=2.0, steps_per_epoch=1)
    out = run_fixed(opt, w, [2.0], 3)
    a_sgd = 0.5 * math.exp(2 * (0 - 1) / 2)                       # e = 0 < bc: exponential piece
    d1 = -(a_sgd + (1 - a_sgd) * 0.03 / (math.sqrt(0.04) + 1e-8)) * 2.0       # s1 = 0.01 * 4
    w1 = 1.0 + 0.1 * d1
    d2 = 0.9 * d1 - (0.5 + 0.5 * 0.03 / (math.sqrt(0.0796) + 1e-8)) * 2.0     # e = 1 = bc: 0.5; s2 = 0.0796
    w2 = w1 + 0.1 * d2
    d3 = 0.9 * d2 - 1.0 * 2.0                                     # e = 2 = bc + bp/2: pure momentum SGD
    close(out[0], [w1])
    close(out[1], [w2])
    close(out[2], [w2 + 0.1 * d3])


# ---- the contract every optimizer keeps (quadratic, Rosenbrock, dtypes, resume, groups, schedulers, workers)
# is in tests/test_optimizer_contract.py.


# ---- param groups and build_optimizer ----------------------------------------------------------------------

def test_param_groups_split_and_exclusion():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2), nn.LayerNorm(2))
    decay, no_decay = param_groups(model, 5e-4)
    assert [p.shape for p in decay["params"]] == [(3, 4), (2, 3)]
    assert (decay["weight_decay"], decay["trust"]) == (5e-4, True)
    assert len(no_decay["params"]) == 6 and (no_decay["weight_decay"], no_decay["trust"]) == (0.0, False)
    (only,) = param_groups(model, 5e-4, exclude_bn_bias=False)
    assert len(only["params"]) == 8 and only["trust"] and only["weight_decay"] == 5e-4
    (norm_only,) = param_groups(nn.BatchNorm1d(3), 5e-4)          # empty groups are dropped
    assert norm_only["trust"] is False


@pytest.mark.parametrize("name,cls", [("sgd", SGD), ("lars", LARS), ("lamb", LAMB), ("adamw", AdamW),
                                      ("rmsprop_warmup", RMSpropWarmup)])
def test_build_optimizer(name, cls):
    cfg = RecipeConfig(optimizer=name, base_lr=0.2, weight_decay=1e-3)
    opt = build_optimizer(cfg, nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), steps_per_epoch=7)
    assert type(opt) is cls
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2]
    assert [(g["weight_decay"], g["trust"]) for g in opt.param_groups] == [(1e-3, True), (0.0, False)]
    if name == "rmsprop_warmup":
        assert opt.param_groups[0]["steps_per_epoch"] == 7
    scaled = build_optimizer(cfg, nn.Linear(2, 2), steps_per_epoch=7, global_batch=1024)   # linear: x4
    assert scaled.param_groups[0]["lr"] == pytest.approx(0.8)


def test_build_optimizer_unknown_name():
    cfg = RecipeConfig()
    cfg.optimizer = "adagrad"
    with pytest.raises(ConfigError, match="unknown recipe.optimizer 'adagrad'; known: adamw, kfac, lamb"):
        build_optimizer(cfg, nn.Linear(2, 2), steps_per_epoch=1)
