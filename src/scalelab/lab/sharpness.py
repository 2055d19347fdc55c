"""``scalelab sharpness RUN_DIR [RUN_DIR ...]``: the epsilon-sharpness of trained minima (Keskar et al. 2017).

Keskar, Mudigere, Nocedal, Smelyanskiy, Tang 2017, "On Large-Batch Training for Deep Learning: Generalization
Gap and Sharp Minima" (arXiv 1609.04836), §2.2.2, Metric 2.1. For parameters ``x``, the training loss ``f`` and
a matrix ``A`` (n x p; the identity for the full space, or a random n x p for a random subspace):

    C_eps = { z in R^p : |z_i| <= eps (|(A^+ x)_i| + 1) }                       (a per-coordinate, scale-aware box)
    phi_{x,f}(eps, A) = 100 * (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x))

The maximisation is inexact, as in the paper: a fixed number of L-BFGS-B iterations (10) with the box as bounds,
minimising ``-f(x + A y)`` with autograd gradients. The paper reports ``eps`` of 1e-3 and 5e-4 and finds large-batch
minima markedly sharper than small-batch ones.

Choices the paper leaves open, made here: ``f`` is the mean cross-entropy in eval mode (BN with its running
statistics, so ``f`` is a deterministic function of ``x``) over the first ``--samples`` training examples (all of
them with 0); the ascent starts from a uniformly random point of the box (seeded), so a point where the gradient is
exactly zero does not stall it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from scalelab.errors import CheckpointError, ConfigError, DataError

LossGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


def epsilon_sharpness(loss_grad: LossGrad, x: np.ndarray, eps: float, A: np.ndarray | None = None,
                      maxiter: int = 10, seed: int = 0) -> dict[str, float]:
    """Keskar's Metric 2.1 for a function given as ``loss_grad(w) -> (f(w), df/dw)`` at ``x``.

    Args:
        loss_grad: the loss and its gradient at a flat parameter vector (float64 numpy).
        x: the minimum (flat vector).
        eps: the box size.
        A: n x p matrix of the subspace; None for the full space (``A = I``).
        maxiter: L-BFGS-B iterations (10 in the paper).
        seed: seed of the random start point in the box.

    Returns:
        ``{"sharpness", "f0", "f_max", "eps", "maxiter", "evaluations"}``.

    Example:
        >>> h = np.array([1.0, 4.0])                  # f(w) = 0.5 sum h w^2, minimum at 0, box |y_i| <= eps
        >>> r = epsilon_sharpness(lambda w: (0.5 * float(h @ w**2), h * w), np.zeros(2), 0.1)
        >>> round(r["sharpness"], 6)                  # 100 * 0.5 * (1 + 4) * 0.01 / (1 + 0)
        2.5
    """
    from scipy.optimize import minimize

    x = np.asarray(x, dtype=np.float64)
    if eps <= 0:
        raise ConfigError(f"eps must be > 0, got {eps}")
    if A is None:
        radius = eps * (np.abs(x) + 1.0)
        to_w = (lambda y: x + y)
        back = (lambda g: g)
    else:
        A = np.asarray(A, dtype=np.float64)
        radius = eps * (np.abs(np.linalg.pinv(A) @ x) + 1.0)
        to_w = (lambda y: x + A @ y)
        back = (lambda g: A.T @ g)
    f0, _ = loss_grad(x)
    n_eval = [0]

    def neg(y: np.ndarray) -> tuple[float, np.ndarray]:
        n_eval[0] += 1
        f, g = loss_grad(to_w(y))
        return -f, -back(g)

    y0 = np.random.default_rng(seed).uniform(-radius, radius)
    res = minimize(neg, y0, jac=True, method="L-BFGS-B", bounds=list(zip(-radius, radius)),
                   options={"maxiter": maxiter})
    f_max = max(-float(res.fun), float(loss_grad(to_w(y0))[0]))
    return {"sharpness": 100.0 * (f_max - f0) / (1.0 + f0), "f0": float(f0), "f_max": f_max, "eps": eps,
            "maxiter": maxiter, "evaluations": n_eval[0]}


def model_loss_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> LossGrad:
    """``w -> (mean cross-entropy, gradient)`` of ``model`` in eval mode at the flat parameters ``w``."""
    params = [p for p in model.parameters()]
    model.eval()

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(w).to(params[0].dtype), params)
        for p in params:
            p.grad = None
        total = 0.0
        for i in range(0, len(x), batch):
            loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum") / len(x)
            loss.backward()
            total += loss.item()
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        return total, g.double().numpy()

    return loss_grad


def load_run_model(run_dir: Path):
    """The model of a run directory at its latest checkpoint, with the run's config and dataset."""
    from scalelab import checkpoint as ckpt
    from scalelab.config import from_dict
    from scalelab.data import load_dataset
    from scalelab.models import build_model

    state = ckpt.load_latest(Path(run_dir) / "checkpoints", log=lambda m: None)
    if state is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to measure (train with an --out directory)")
    cfg = from_dict(state["config"])
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes).double()
    model.load_state_dict(state["model"])
    return model, cfg, data, state


def run_sharpness(run_dir: Path, eps_list: list[float], samples: int = 4096, maxiter: int = 10,
                  subspace: int = 0, seed: int = 0) -> dict[str, Any]:
    """Sharpness of a run's final model for each ``eps``; also written to ``RUN_DIR/sharpness.json``."""
    run_dir = Path(run_dir)
    model, cfg, data, state = load_run_model(run_dir)
    n = min(samples or len(data.x_train), len(data.x_train))
    x, y = data.x_train[:n].double(), data.y_train[:n]
    lg = model_loss_grad(model, x, y, cfg.train.eval_batch)
    w0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().double().numpy().copy()
    A = None
    if subspace:
        A = np.random.default_rng(seed + 1).standard_normal((len(w0), subspace))
    rows = [epsilon_sharpness(lg, w0, eps, A, maxiter, seed) for eps in eps_list]
    with torch.no_grad():  # leave the model as loaded
        torch.nn.utils.vector_to_parameters(torch.from_numpy(w0), list(model.parameters()))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    result = {"run_dir": str(run_dir), "batch": cfg.train.batch_size, "optimizer": cfg.recipe.optimizer,
              "step": state["counters"]["step"], "test_acc": summary.get("final_test_acc"),
              "samples": n, "subspace": subspace or None, "params": len(w0), "results": rows}
    (run_dir / "sharpness.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_results(results: list[dict[str, Any]]) -> str:
    eps_list = [r["eps"] for r in results[0]["results"]]
    head = f"{'run':<32} {'opt':>6} {'batch':>6} {'test acc':>8} {'f(x)':>9} " + " ".join(
        f"{'sharp@' + format(e, 'g'):>14}" for e in eps_list)
    lines = [head]
    for r in results:
        acc = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
        lines.append(f"{Path(r['run_dir']).name[:32]:<32} {r['optimizer']:>6} {r['batch']:>6} {acc:>8} "
                     f"{r['results'][0]['f0']:>9.4f} " + " ".join(f"{x['sharpness']:>14.3f}"
                                                                    for x in r["results"]))
    lines.append("sharpness: 100 (max over the eps-box of f(x+y) - f(x)) / (1 + f(x)), 10 L-BFGS-B iterations "
                 "(Keskar et al. 2017)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories with checkpoints")
    p.add_argument("--eps", default="1e-3,5e-4", help="box sizes (default 1e-3,5e-4 as in the paper)")
    p.add_argument("--samples", type=int, default=4096, help="training examples in f (default 4096; 0 = all)")
    p.add_argument("--iters", type=int, default=10, help="L-BFGS-B iterations (default 10, the paper's)")
    p.add_argument("--subspace", type=int, default=0, help="random subspace dimension p (0 = full space)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    try:
        eps_list = [float(e) for e in args.eps.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--eps {args.eps!r}: expected numbers separated by commas") from None
    if not eps_list or args.iters < 1 or args.samples < 0 or args.subspace < 0:
        raise ConfigError("need --eps values, --iters >= 1, --samples >= 0, --subspace >= 0")
    results = []
    for d in args.run_dirs:
        if not Path(d).is_dir():
            raise DataError(f"{d}: not a run directory")
        results.append(run_sharpness(Path(d), eps_list, args.samples, args.iters, args.subspace, args.seed))
    print(json.dumps(results, indent=1) if args.json else format_results(results))
    return 0
