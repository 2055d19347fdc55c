"""K-FAC against its papers' math on tiny layers, and distributed K-FAC against the single-process one.

* Linear least squares on a data set built so that the Fisher is exactly Kronecker-factored (every input with
  every residual): with zero damping the K-FAC step equals the Gauss-Newton / natural-gradient step computed
  directly from the Jacobians, and one step with LR 1 lands on the least-squares solution.
* Factors of tiny Linear, Conv1d and Conv2d layers against loops written from the definitions of Martens &
  Grosse (2015) and Grosse & Martens (2016, KFC), not from the library's unfold path.
* N real gloo workers (``scalelab train --nproc N``) against one process with the same global batch.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from scalelab.checkpoint import load_latest
from scalelab.config import load_config
from scalelab.errors import ConfigError
from scalelab.recipe import SGD, build_optimizer
from scalelab.recipe.kfac import KFAC, assign_owners, conv_patches, kfac_optimizer, step_damping
from scalelab.train import Trainer

F64 = torch.float64


# ---- linear least squares: K-FAC with zero damping == the exact Gauss-Newton step ---------------------------

def kronecker_data(n_in=3, n_out=2, n_x=6, seed=0):
    """Inputs x_j and residuals r_k with E[r r^T] = I and E[r] = m != 0; the data set is every (x_j, r_k).

    On such a product set the per-example gradients ā r^T have E[(ā ā^T) ⊗ (r r^T)] = E[ā ā^T] ⊗ E[r r^T] exactly,
    so the K-FAC approximation of the (empirical) Fisher is exact, and with E[r r^T] = I it is the Gauss-Newton
    matrix E[J^T J] of the squared loss too. E[r] != 0 keeps the gradient E[ā] m^T away from zero.
    """
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_x, n_in, generator=gen, dtype=F64)
    m = torch.tensor([0.6, -0.3], dtype=F64)[:n_out]
    c = torch.eye(n_out, dtype=F64) - torch.outer(m, m)                     # covariance I - m m^T
    evals, evecs = torch.linalg.eigh(c)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    s = [sign * n_out ** 0.5 * root[:, k] for k in range(n_out) for sign in (1, -1)]   # mean 0, cov C
    rs = torch.stack([m + sk for sk in s])
    assert torch.allclose(rs.T @ rs / len(rs), torch.eye(n_out, dtype=F64))
    pairs = list(itertools.product(range(n_x), range(len(rs))))
    return xs[[j for j, _ in pairs]], rs[[k for _, k in pairs]]


def least_squares_setup():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, r = kronecker_data()
    with torch.no_grad():
        t = model(x) - r                                   # targets that make the residuals exactly r
    return model, x, t


def ls_loss(y, t):
    return 0.5 * (y - t).pow(2).sum(1).mean()


def gauss_newton_step(model, x, t):
    """GN^{-1} grad with GN = mean_i J_i^T J_i (the loss's Hessian in y is I), theta = [W.flatten(), b]."""
    w, b = model.weight.detach(), model.bias.detach()

    def outputs(theta):
        return x @ theta[: w.numel()].reshape(w.shape).T + theta[w.numel():]

    theta = torch.cat([w.reshape(-1), b])
    jac = torch.autograd.functional.jacobian(outputs, theta)           # (N, out, P)
    gn = torch.einsum("nop,noq->pq", jac, jac) / len(x)
    grad = torch.autograd.grad(ls_loss(outputs(theta.requires_grad_()), t), theta)[0]
    return torch.linalg.solve(gn, grad), grad


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_zero_damping_step_is_the_gauss_newton_step(method):
    model, x, t = least_squares_setup()
    expected, grad = gauss_newton_step(model, x, t)
    kfac = KFAC(model, damping=0.0, kl_clip=0.0, method=method)
    ls_loss(model(x), t).backward()
    kfac.step()
    got = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert (got - grad).abs().max() > 0.1                 # the preconditioner did something

    # lr 1 along the Gauss-Newton direction solves a least-squares problem in one step
    with torch.no_grad():
        model.weight -= model.weight.grad
        model.bias -= model.bias.grad
    model.zero_grad()
    ls_loss(model(x), t).backward()
    assert model.weight.grad.abs().max() < 1e-10 and model.bias.grad.abs().max() < 1e-10


def test_damping_moves_the_step_towards_the_gradient():
    model, x, t = least_squares_setup()
    expected, grad = gauss_newton_step(model, x, t)
    kfac = KFAC(model, damping=10.0, kl_clip=0.0, method="eigen")
    ls_loss(model(x), t).backward()
    kfac.step()
    got = torch.cat([model.weight.grad.reshape(-1), model.bias.grad])
    # (F + 10 I)^{-1} g with F's eigenvalues ~1: much closer to g / 10 than to F^{-1} g
    assert (got - expected).abs().max() > 1e-2
    assert (got - grad / 10).norm() < (got - expected).norm()


def test_factored_tikhonov_damping_by_hand():
    # Martens & Grosse 2015 §6.3: pi = sqrt((tr A / dim A) / (tr G / dim G));
    # V~ = (G + sqrt(lam) / pi I)^-1 V (A + pi sqrt(lam) I)^-1
    model = nn.Linear(2, 1, bias=False).double()
    kfac = KFAC(model, damping=0.04, kl_clip=0.0, method="inverse")
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=F64)              # A = diag(2, 2)
    (model(x).sum() * 0.5).backward()                                  # mean of y_i: dℓ_i/dy_i = 1 -> G = [[1]]
    kfac.step()
    # pi = sqrt(2 / 1); A + pi * 0.2 I = (2 + 0.2 sqrt 2) I; G + 0.2 / pi = 1 + 0.1 sqrt 2
    g = torch.tensor([[1.0, 1.0]], dtype=F64)                          # dL/dW = mean of 1 * x_i = [1, 1]
    expected = g / ((2 + 0.2 * 2 ** 0.5) * (1 + 0.1 * 2 ** 0.5))
    torch.testing.assert_close(model.weight.grad, expected)


# ---- factors on tiny layers, by hand -------------------------------------------------------------------

def test_linear_factors_by_hand():
    model = nn.Linear(2, 3).double()
    kfac = KFAC(model, factor_decay=0.5, factor_every=1)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=F64)
    u = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]], dtype=F64)   # dℓ_i/dy_i
    (model(x) * u).sum(1).mean().backward()
    kfac.step()
    # ā_1 = [1, 2, 1], ā_2 = [3, -1, 1]; A = (ā_1 ā_1^T + ā_2 ā_2^T) / 2
    A = torch.tensor([[1 + 9, 2 - 3, 1 + 3], [2 - 3, 4 + 1, 2 - 1], [1 + 3, 2 - 1, 1 + 1]], dtype=F64) / 2
    G = torch.tensor([[1, 0, 2], [0, 1, -1], [2, -1, 4 + 1]], dtype=F64) / 2
    layer = kfac.layers[0]
    torch.testing.assert_close(layer.A, A)
    torch.testing.assert_close(layer.G, G)
    # second step: running average A <- 0.5 A + 0.5 A_new with A_new from x2
    model.zero_grad()
    x2 = torch.tensor([[0.0, 1.0]], dtype=F64)
    u2 = torch.tensor([[2.0, 0.0, 0.0]], dtype=F64)
    (model(x2) * u2).sum(1).mean().backward()
    kfac.step()
    A2 = torch.tensor([[0, 0, 0], [0, 1, 1], [0, 1, 1]], dtype=F64)
    G2 = torch.tensor([[4, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=F64)
    torch.testing.assert_close(layer.A, 0.5 * A + 0.5 * A2)
    torch.testing.assert_close(layer.G, 0.5 * G + 0.5 * G2)


def test_conv1d_factors_by_hand():
    # KFC: Ω = E_batch[Σ_t ā_t ā_t^T], Γ = (1/T) E_batch[Σ_t Ds_t Ds_t^T]
    conv = nn.Conv1d(1, 2, kernel_size=2, padding=1).double()
    kfac = KFAC(conv)
    x = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, -1.0, 2.0]]], dtype=F64)     # M = 2, L = 3 -> T = 4
    y = conv(x)
    u = torch.arange(16, dtype=F64).reshape(2, 2, 4) / 10 - 0.7              # dℓ_i / dy_i
    (y * u).sum((1, 2)).mean().backward()
    kfac.step()
    M, T = 2, 4
    omega, gamma = torch.zeros(3, 3, dtype=F64), torch.zeros(2, 2, dtype=F64)
    for i in range(M):
        padded = [0.0] + x[i, 0].tolist() + [0.0]
        for t in range(T):
            a = torch.tensor([padded[t], padded[t + 1], 1.0], dtype=F64)
            omega += torch.outer(a, a) / M
            ds = u[i, :, t]
            gamma += torch.outer(ds, ds) / (M * T)
    torch.testing.assert_close(kfac.layers[0].A, omega)
    torch.testing.assert_close(kfac.layers[0].G, gamma)
    assert kfac.layers[0].A.shape == (3, 3) and kfac.layers[0].G.shape == (2, 2)


def test_conv2d_factors_by_hand():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=1, bias=False).double()
    kfac = KFAC(conv)
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    y = conv(x)                                                               # (2, 3, 2, 2): T = 4
    u = torch.randn_like(y)
    (y * u).sum((1, 2, 3)).mean().backward()
    kfac.step()
    M, T = 2, 4
    omega, gamma = torch.zeros(8, 8, dtype=F64), torch.zeros(3, 3, dtype=F64)
    for i in range(M):
        for r in range(2):
            for c in range(2):
                a = x[i, :, r:r + 2, c:c + 2].reshape(-1)                     # (C_in, kh, kw), the weight's order
                omega += torch.outer(a, a) / M
                gamma += torch.outer(u[i, :, r, c], u[i, :, r, c]) / (M * T)
    torch.testing.assert_close(kfac.layers[0].A, omega)
    torch.testing.assert_close(kfac.layers[0].G, gamma)


@pytest.mark.parametrize("conv", [
    nn.Conv1d(3, 4, 5, stride=2, padding=2), nn.Conv1d(3, 4, 3, padding="same", dilation=2),
    nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), nn.Conv2d(3, 4, 3, stride=2, padding=1),
    nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"), nn.Conv2d(3, 4, 2, dilation=2)],
    ids=["1d-stride", "1d-same-dilated", "1d-circular", "2d-stride", "2d-same-reflect", "2d-dilated"])
def test_conv_patches_reproduce_the_convolution(conv):
    conv = conv.double()
    x = torch.randn(2, 3, *((11,) if isinstance(conv, nn.Conv1d) else (9, 8)), dtype=F64)
    patches = conv_patches(conv, x)                                           # (M, C k, T)
    out = conv.weight.reshape(4, -1) @ patches + conv.bias[:, None]
    torch.testing.assert_close(out, conv(x).reshape(2, 4, -1))


def test_unsupported_layers_are_listed_and_keep_their_gradient(capsys):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
            self.grouped = nn.Conv1d(4, 4, 1, groups=2)                       # not used in forward; listed

        def forward(self, x):
            return self.body(x)

    net = Net().double()
    model = net.body
    kfac = KFAC(net, log=print)
    line = capsys.readouterr().out.strip()
    assert line == ("kfac: preconditioning 2 layers (body.0, body.3); base update for 2: body.1 (BatchNorm1d), "
                    "grouped (Conv1d, groups=2)")
    x = torch.randn(8, 3, dtype=F64)
    model(x).pow(2).mean().backward()
    bn_grad = model[1].weight.grad.clone()
    w_grad = model[0].weight.grad.clone()
    kfac.step()
    assert torch.equal(model[1].weight.grad, bn_grad)
    assert not torch.allclose(model[0].weight.grad, w_grad)


def test_kl_clipping_scales_the_step():
    # Ba et al. 2017 §5: nu = min(1, sqrt(kappa / (lr^2 Σ ṽ·g)))
    model, x, t = least_squares_setup()
    ref = KFAC(model, damping=1e-3, kl_clip=0.0)
    ls_loss(model(x), t).backward()
    g = torch.cat([model.weight.grad.reshape(-1), model.bias.grad]).clone()
    ref.step()
    v = torch.cat([model.weight.grad.reshape(-1), model.bias.grad]).clone()
    model2, x, t = least_squares_setup()
    clipped = KFAC(model2, damping=1e-3, kl_clip=1e-3)
    ls_loss(model2(x), t).backward()
    clipped.step(lr=0.5)
    nu = min(1.0, (1e-3 / (0.25 * (v * g).sum().item())) ** 0.5)
    assert nu < 0.5
    torch.testing.assert_close(torch.cat([model2.weight.grad.reshape(-1), model2.bias.grad]), v * nu)


def test_intervals_and_damping_schedule():
    model = nn.Linear(2, 2).double()
    kfac = KFAC(model, factor_every=2, inverse_every=3, damping=step_damping(1.0, [2, 4], 0.5))
    seen = []
    for step in range(6):
        model.zero_grad()
        model(torch.randn(4, 2, dtype=F64) * (step + 1)).sum().backward()
        layer = kfac.layers[0]
        before = (None if layer.A is None else layer.A.clone()), {k: v.clone() for k, v in layer.inv.items()}
        kfac.step()
        seen.append((before[0] is None or not torch.equal(layer.A, before[0]),
                     not before[1] or any(not torch.equal(layer.inv[k], before[1][k]) for k in before[1])))
    assert [s[0] for s in seen] == [True, False, True, False, True, False]    # factors at 0, 2, 4
    assert [s[1] for s in seen] == [True, False, False, True, False, False]   # inverses at 0, 3
    assert [step_damping(1.0, [2, 4], 0.5)(s) for s in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_assign_owners_balances_by_cost():
    # 8 -> rank 0, 7 -> rank 1, the first 1 -> rank 1 (7 < 8), the second -> rank 0 (tie at 8): loads 9 and 8
    assert assign_owners([8.0, 1.0, 1.0, 7.0], 2) == [0, 1, 0, 1]
    assert assign_owners([1.0, 1.0, 1.0, 1.0], 4) == [0, 1, 2, 3]
    assert assign_owners([5.0, 3.0], 1) == [0, 0]


def test_state_dict_round_trip_resumes_exactly():
    def run(model, opt, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            x = torch.randn(16, 3, generator=gen, dtype=F64)
            model(x).pow(2).mean().backward()
            opt.step()

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        return model, kfac_optimizer(SGD(model.parameters(), lr=0.1), model, inverse_every=3, factor_every=2)

    a, opt_a = make()
    run(a, opt_a, 4, 1)
    run(a, opt_a, 4, 2)
    b, opt_b = make()
    run(b, opt_b, 4, 1)
    state = opt_b.state_dict()
    assert set(state["kfac"]["layers"]) == {"0", "2"} and state["kfac"]["steps"] == 4
    c, opt_c = make()
    c.load_state_dict(b.state_dict())
    opt_c.load_state_dict(state)
    run(c, opt_c, 4, 2)
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)


def test_build_optimizer_and_config():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    cfg = load_config(None, ["recipe.optimizer=kfac", "recipe.kfac_inverse_every=7", "recipe.kfac_method=inverse"])
    opt = build_optimizer(cfg.recipe, model, steps_per_epoch=10)
    assert type(opt).__name__ == "KFACSGD" and opt.kfac.inverse_every == 7 and opt.kfac.method == "inverse"
    cfg = load_config(None, ["recipe.optimizer=lamb", "recipe.precondition=kfac"])
    opt = build_optimizer(cfg.recipe, model, steps_per_epoch=10)
    assert type(opt).__name__ == "KFACLAMB" and len(opt.kfac.layers) == 2
    assert type(build_optimizer(load_config(None, []).recipe, model, 10)).__name__ == "SGD"
    with pytest.raises(ConfigError, match=r"recipe.kfac_method: 'cholesky' is not allowed; choose one of: eigen"):
        load_config(None, ["recipe.kfac_method=cholesky"])
    with pytest.raises(ConfigError, match=r"recipe.precondition: 'shampoo' is not allowed; choose one of: none, kfac"):
        load_config(None, ["recipe.precondition=shampoo"])
    with pytest.raises(ConfigError, match="recipe.kfac_factor_decay: 1.0 is out of range"):
        load_config(None, ["recipe.kfac_factor_decay=1"])
    with pytest.raises(ConfigError, match="parallel.backup_workers: K-FAC"):
        load_config(None, ["recipe.optimizer=kfac", "parallel.backup_workers=1"])


# ---- distributed K-FAC: N gloo workers == one process on the same global batch ----------------------------

BASE = ["data.name=synthetic", "data.n_train=512", "data.n_test=128", "model.name=mlp", "model.width=16",
        "model.depth=2", "train.batch_size=64", "train.max_steps=8", "train.eval_every=8", "train.log_every=4",
        "recipe.optimizer=kfac", "recipe.base_lr=0.1", "recipe.base_batch=64", "recipe.warmup_epochs=0",
        "recipe.kfac_inverse_every=3", "recipe.kfac_factor_every=2", "train.progress=false",
        "train.dtype=float64"]
CNN = ["data.name=mnist1d", "data.n_train=256", "data.n_test=64", "model.name=cnn1d", "model.width=8",
       "model.depth=2", "model.norm=bn", "recipe.kfac_method=inverse"]


def _real(tmp_path, cache_dir, nproc, overrides):
    out = tmp_path / f"ddp{nproc}"
    env = {**os.environ, "SCALELAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "scalelab", "train", "--nproc", str(nproc), "--out", str(out),
                           *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("kfac: preconditioning") == 1        # one line, from rank 0
    return load_latest(out / "checkpoints")


def _single(tmp_path, cache_dir, overrides, emulate=1):
    os.environ["SCALELAB_CACHE"] = str(cache_dir)
    cfg = load_config(None, [*overrides, f"parallel.emulate_workers={emulate}"])
    out = tmp_path / f"one{emulate}"
    Trainer(cfg, out).run()
    return load_latest(out / "checkpoints")


def _assert_same(real, single, what):
    for name, p in single["model"].items():
        if "running" in name or name.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(real["model"][name], p, rtol=1e-5, atol=1e-7, msg=f"{what}: {name}")
    for name, layer in single["optimizer"]["kfac"]["layers"].items():
        torch.testing.assert_close(real["optimizer"]["kfac"]["layers"][name]["A"], layer["A"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(real["optimizer"]["kfac"]["layers"][name]["G"], layer["G"], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("nproc", [1, 2, 4])
def test_distributed_kfac_equals_single_process(tmp_path, cache_dir, nproc):
    """mlp without BN: N workers with B/N each == one process with B (factors all-reduced, inverses broadcast)."""
    overrides = [*BASE, "model.norm=none"]
    real = _real(tmp_path, cache_dir, nproc, overrides)
    _assert_same(real, _single(tmp_path, cache_dir, overrides), f"N={nproc}")
    # comm_bytes counts K-FAC's own collectives on top of DDP's gradient all-reduce (rank 0's summary)
    summary = json.loads((tmp_path / f"ddp{nproc}" / "summary.json").read_text())
    ring = lambda nbytes: 2 * (nproc - 1) * nbytes // nproc
    layers = real["optimizer"]["kfac"]["layers"].values()
    dims = [(la["A"].shape[0], la["G"].shape[0]) for la in layers]
    ddp = 8 * ring(sum(p.numel() * 8 for p in real["model"].values()))            # float64 gradients, 8 steps
    factors = 4 * ring(sum(8 * (a * a + g * g) for a, g in dims))                   # steps 0, 2, 4, 6
    owners = assign_owners([a ** 3 + g ** 3 for a, g in dims], nproc)
    inverse_bytes = [8 * sum(t.numel() for k, t in la.items() if k not in ("A", "G")) for la in layers]
    inverses = 3 * (nproc - 1) * sum(b for b, o in zip(inverse_bytes, owners) if o == 0)   # steps 0, 3, 6
    extra = summary["comm_bytes"] - ddp - factors - inverses
    assert 0 <= extra < 256, (summary["comm_bytes"], ddp, factors, inverses)      # + the loss at 2 log steps


def test_distributed_kfac_conv_with_bn_equals_emulated_workers(tmp_path, cache_dir):
    """Conv layers (KFC) and BN statistics per worker: 2 gloo workers == parallel.emulate_workers=2."""
    overrides = [*BASE, *CNN]
    real = _real(tmp_path, cache_dir, 2, overrides)
    assert set(real["optimizer"]["kfac"]["layers"]) == {"features.0", "features.3", "classifier.1"}
    _assert_same(real, _single(tmp_path, cache_dir, overrides, emulate=2), "cnn1d + bn, N=2 vs emulated")
    # not vacuous: one BN over the whole batch is a different run
    plain = _single(tmp_path, cache_dir, overrides, emulate=1)
    assert max((real["model"][n] - p).abs().max().item() for n, p in plain["model"].items()
               if "running" not in n and not n.endswith("num_batches_tracked")) > 1e-4


@pytest.mark.parametrize("optimizer", ["kfac", "neumann"])
def test_trainer_resume_is_exact(tmp_path, optimizer):
    """Killed after step 6 of 12 (its later checkpoints and summary removed), the run resumes to the same bits."""
    overrides = [*BASE, "model.norm=none", "train.max_steps=12", "train.checkpoint_every=6", "train.eval_every=6",
                 f"recipe.optimizer={optimizer}", "recipe.neumann_burnin_epochs=0.25",
                 "recipe.neumann_reset_epochs=0.5"]
    cfg = load_config(None, overrides)
    straight = Trainer(cfg, tmp_path).run()
    (tmp_path / "checkpoints" / "ckpt-000000012.pt").unlink()
    (tmp_path / "summary.json").unlink()
    resumed = Trainer(cfg, tmp_path, resume=True).run()
    assert resumed["params_sha256"] == straight["params_sha256"] and resumed["steps"] == 12
