"""The Neumann optimizer (Krishnan, Xiao, Saurous 2017): a Neumann series of the minibatch Hessian inverse.

Newton's step on a minibatch solves ``H m = -∇f̂``. The Neumann (Richardson) iteration
``m_k = (I - ηH) m_{k-1} - ∇f̂(w)`` converges to ``-(ηH)⁻¹ ∇f̂`` when ``0 < ηH < 2``, and on a quadratic
``∇f̂(w + η m) = ∇f̂(w) + η H m``, so the Hessian-vector product needs no Hessian: ``m_k = m_{k-1} -
∇f̂(w + η m_{k-1})`` (the paper's Algorithm 1; :func:`neumann_inner` here). Algorithm 2, which this optimizer
implements, fuses the inner loop with the outer one (one fresh minibatch per step), adds momentum ``μ`` (the
"mini-batch convexification" of non-convex Hessians: ``μ = λmax / (|λmin| + λmax)``) and a regulariser that
pulls ``w`` towards ``v``, an exponential moving average of the weights:
``ĝ(w) = f̂(w) + (α/3)‖w - v‖³ + β / ‖w - v‖``.

Per step ``t`` after the burn-in (``u = w - v``, norms over the whole parameter vector of all groups)::

    t = first step of a period (K steps since the last reset):   m <- -η ∇f̂(w)          (w, v unchanged)
    otherwise:   d = ∇f̂(w) + (α ‖u‖² - β / ‖u‖²) u / ‖u‖        (the regulariser's term is 0 while u = 0)
                 m <- μ(t) m - η d
                 w <- w + μ(t) m - η d
                 v <- w + γ (v - w)

The stored ``w`` are the displaced parameters at which the next gradient is taken; the solution the paper
returns is ``w - μ m``: :meth:`Neumann.eval_weights` swaps it in for evaluation. Before the first Neumann step
the optimizer runs plain SGD for ``burnin_steps`` (the paper: a few epochs of vanilla SGD), then starts with
``v = w`` and ``m = 0``.

Schedules and defaults (paper, Table 1 and §3; only η is tuned): ``α = 1e-7``, ``β = 1e-5 × number of
variables``, ``γ = 0.99``; ``μ(t) = min(μ_max, 1 - 1/(1 + τ))`` with ``τ = 1 + (steps since the burn-in) /
mu_steps`` (``mu_steps``: steps per epoch, so μ starts at 0.5 and reaches ``μ_max = 0.9`` after 8 epochs; the
paper gives μ only as proportional to ``1 - 1/(1+t)`` from 0.5 to 0.9); the period ``K`` starts at
``reset_steps`` (the paper: 10 epochs) and doubles after every reset. η is the group's ``lr``, which the
trainer sets from the recipe's schedule (the paper decays it as 1/t).

Reference:
    Krishnan, Xiao, Saurous. "Neumann Optimizer: A Practical Optimization Algorithm for Deep Neural
    Networks", ICLR 2018, arXiv 1712.03298 (Algorithms 1 and 2, §3, Table 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from scalelab.recipe.parts import add_decayed_weights, ensure_state, params_with_grads, run_closure

__all__ = ["Neumann", "neumann_inner", "neumann_mu"]


def neumann_mu(steps_since_burnin: int, mu_steps: int, mu_max: float = 0.9) -> float:
    """``μ(t) = min(mu_max, 1 - 1/(1 + τ))``, ``τ = 1 + steps_since_burnin / mu_steps``: 0.5 at the start."""
    tau = 1.0 + steps_since_burnin / mu_steps
    return min(mu_max, 1.0 - 1.0 / (1.0 + tau))


def neumann_inner(grad: Callable[[Tensor], Tensor], w: Tensor, eta: float, iters: int) -> Tensor:
    """Algorithm 1's inner loop: ``m_0 = -∇f̂(w)``, ``m_k = m_{k-1} - ∇f̂(w + η m_{k-1})``; returns ``η m_K``.

    On a quadratic with Hessian ``H`` this is the Neumann series ``η m_K = -η Σ_{j<=K} (I - ηH)^j ∇f̂(w)``,
    which tends to the Newton step ``-H⁻¹ ∇f̂(w)`` as K grows when ``‖I - ηH‖ < 1``.
    """
    m = -grad(w)
    for _ in range(iters):
        m = m - grad(w + eta * m)
    return eta * m


class Neumann(torch.optim.Optimizer):
    """The Neumann optimizer, Algorithm 2 of Krishnan, Xiao & Saurous (2017); see the module docstring.

    Args:
        params: parameters or param groups (groups may set ``lr`` and ``weight_decay``; a ``trust`` key is
            accepted and ignored).
        lr: η.
        alpha: cubic regulariser α.
        beta: repulsive regulariser β; ``None`` = ``1e-5 ×`` the number of parameters (paper's default).
        gamma: γ of the moving average ``v``.
        mu_max: the peak momentum (0.9).
        mu_steps: steps per unit of the momentum schedule's ``τ`` (the trainer passes steps per epoch).
        burnin_steps: plain-SGD steps before the Neumann iterations start.
        reset_steps: the first period ``K`` between resets of ``m``; it doubles after every reset.
        weight_decay: L2 decay added to the minibatch gradient (part of ``f̂``).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = Neumann([w], lr=0.1, beta=0.0, burnin_steps=0, reset_steps=100)
        >>> for _ in range(3):
        ...     w.grad = w.detach().clone()       # f = ||w||^2 / 2
        ...     _ = opt.step()
        >>> with opt.eval_weights():
        ...     [round(x, 4) for x in w.tolist()]
        [0.7421, -0.7421]

    Reference:
        Krishnan, Xiao, Saurous. arXiv 1712.03298 (Algorithm 2, Table 1).
    """

    def __init__(self, params, lr: float = 0.01, alpha: float = 1e-7, beta: float | None = None,
                 gamma: float = 0.99, mu_max: float = 0.9, mu_steps: int = 100, burnin_steps: int = 0,
                 reset_steps: int = 1000, weight_decay: float = 0.0):
        if lr < 0 or alpha < 0 or (beta is not None and beta < 0) or weight_decay < 0:
            raise ValueError("lr, alpha, beta and weight_decay must be >= 0")
        if not 0.0 <= gamma < 1.0 or not 0.0 <= mu_max < 1.0:
            raise ValueError(f"need 0 <= gamma < 1 and 0 <= mu_max < 1, got {gamma}, {mu_max}")
        if mu_steps < 1 or burnin_steps < 0 or reset_steps < 1:
            raise ValueError("need mu_steps >= 1, burnin_steps >= 0, reset_steps >= 1")
        defaults = dict(lr=lr, weight_decay=weight_decay, trust=False)
        super().__init__(params, defaults)
        if beta is None:
            beta = 1e-5 * sum(p.numel() for g in self.param_groups for p in g["params"])
        self.hyper = dict(alpha=alpha, beta=beta, gamma=gamma, mu_max=mu_max, mu_steps=mu_steps,
                          burnin_steps=burnin_steps, reset_steps=reset_steps)

    def _counters(self) -> dict:
        """The step counters, under the key ``"neumann"`` of ``self.state``, so ``state_dict`` has them."""
        st = self.state["neumann"]
        if "t" not in st:
            st.update(t=0, since_reset=0, period=self.hyper["reset_steps"], mu=0.0)
        return st

    def _pairs(self) -> Iterator[tuple[dict, Tensor, Tensor]]:
        for group in self.param_groups:
            for p, g in params_with_grads(group, "Neumann"):
                yield group, p, add_decayed_weights(g, p, group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step of Algorithm 2 (or of the plain-SGD burn-in); returns the closure's loss if given."""
        loss = run_closure(closure)
        h, c = self.hyper, self._counters()
        t = c["t"]
        c["t"] = t + 1
        if t < h["burnin_steps"]:
            for group, p, d in self._pairs():
                p.add_(d, alpha=-group["lr"])
            return loss
        n = t - h["burnin_steps"]  # Neumann steps taken before this one
        pairs = list(self._pairs())
        if n == 0 or c["since_reset"] >= c["period"]:
            if n > 0:
                c["period"] *= 2  # K doubles after every reset
            c["since_reset"] = 0
            for group, p, d in pairs:
                st = ensure_state(self.state[p], p, "m")
                if n == 0:
                    st["v"] = p.detach().clone()  # v_0 = w_0 (not zeros)
                st["m"].copy_(d).mul_(-group["lr"])  # m <- -η ∇f̂
        else:
            mu = neumann_mu(n, h["mu_steps"], h["mu_max"])
            c["mu"] = mu
            for _, p, _ in pairs:  # a parameter that got its first gradient after the start
                st = ensure_state(self.state[p], p, "m")
                if "v" not in st:
                    st["v"] = p.detach().clone()
            u2 = sum(float((p - self.state[p]["v"]).pow(2).sum()) for _, p, _ in pairs)
            un = u2 ** 0.5
            coef = (h["alpha"] * u2 - h["beta"] / u2) / un if un > 0 else 0.0  # scales u = w - v
            for group, p, d in pairs:
                st = self.state[p]
                lr = group["lr"]
                if coef:
                    d = d.add(p - st["v"], alpha=coef)
                st["m"].mul_(mu).add_(d, alpha=-lr)
                p.add_(st["m"], alpha=mu).add_(d, alpha=-lr)
                st["v"].sub_(p).mul_(h["gamma"]).add_(p)  # v <- w + γ (v - w)
        c["since_reset"] += 1
        return loss

    @contextmanager
    def eval_weights(self):
        """Inside the block the parameters are the paper's output ``w - μ m``; restored exactly afterwards."""
        c = self._counters()
        mu = c.get("mu", 0.0)
        saved = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    m = self.state[p].get("m")
                    if m is not None and mu:
                        saved.append((p, p.detach().clone()))
                        p.sub_(m, alpha=mu)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)

    def state_dict(self):
        state = super().state_dict()
        state["neumann"] = dict(self.hyper)
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        hyper = state_dict.pop("neumann", None)
        super().load_state_dict(state_dict)
        if hyper is not None:
            self.hyper.update(hyper)
