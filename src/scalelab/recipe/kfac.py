"""K-FAC: Kronecker-factored approximate curvature, as a gradient preconditioner for any scalelab optimizer.

For a layer with input activations ``a`` (with a constant 1 appended when it has a bias: ``ā = [a; 1]``) and
per-example gradients ``g = dℓ/ds`` of its outputs ``s``, K-FAC approximates the layer's block of the Fisher
matrix by a Kronecker product ``A ⊗ G`` with ``A = E[ā āᵀ]`` and ``G = E[g gᵀ]`` (Martens & Grosse 2015), so the
natural-gradient direction of the layer's gradient matrix ``V`` (out x in+1) is ``G⁻¹ V A⁻¹``. Convolutions use
Grosse & Martens's KFC (2016): ``ā_t`` are the patches at each output location ``t`` (im2col, via
``F.unfold``), ``A = Ω = E_batch[Σ_t ā_t ā_tᵀ]`` and ``G = Γ = (1/|T|) E_batch[Σ_t g_t g_tᵀ]``; a Linear layer
is the case ``|T| = 1`` (inputs with extra dimensions, e.g. sequences, treat them like the spatial ones).

What this module does, step by step (:meth:`KFAC.step`):

1. Forward hooks on the supported layers (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` with ``groups=1``)
   accumulate ``Σ ā āᵀ`` on the steps that update the factors; a hook on the layer's output tensor accumulates
   ``Σ g gᵀ`` during backward. The hooks sit on the layers themselves, so they work the same when the model
   is wrapped in DistributedDataParallel. PyTorch's gradient of a *mean* loss over a batch of ``M`` is
   ``g/M``; the hook multiplies by the ``M`` the layer saw, which makes the factors independent of how a
   global batch is split over workers (each worker's loss is the mean over its own share).
2. Every ``factor_every`` steps the new factors are averaged over the workers (one all-reduce of all of them,
   when ``torch.distributed`` is initialised) and enter running averages ``A <- ξ A + (1 - ξ) A_new``.
3. Every ``inverse_every`` steps each layer's eigendecomposition (``method="eigen"``) or damped inverses
   (``method="inverse"``) is computed by one worker and broadcast to the others (Ba, Grosse & Martens 2017).
   Layers are assigned greedily by cost (``dim_A³ + dim_G³``, largest first, each to the least-loaded worker),
   so the work spreads over the workers.
4. Every step the gradients of the preconditioned layers are replaced by the damped natural-gradient
   direction, scaled by the KL-clipping factor ``ν = min(1, sqrt(κ / Σ_l η_l² Σ ṽ_l ⊙ g_l))`` (Ba et al.
   §5); the base optimizer (momentum SGD for ``recipe.optimizer = "kfac"``) then takes its usual step.

Damping ``λ`` (a number, or a function of the step: :func:`step_damping` gives the recipe's step schedule):

* ``method="eigen"``: ``A = Q_A diag(d_A) Q_Aᵀ``, ``G = Q_G diag(d_G) Q_Gᵀ``, and
  ``Ṽ = Q_G [(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ`` = ``(A ⊗ G + λ I)⁻¹ vec V``, Tikhonov damping of the
  Kronecker-factored block itself (as in gpauloski/kfac-pytorch's eigen mode).
* ``method="inverse"``: factored Tikhonov damping (Martens & Grosse 2015, §6.3):
  ``π = sqrt((tr A / dim A) / (tr G / dim G))``, ``Ṽ = (G + (√λ/π) I)⁻¹ V (A + π √λ I)⁻¹``.

With ``λ = 0`` both are ``(A ⊗ G)⁻¹ vec V`` exactly. Layers that K-FAC cannot precondition (normalisation
layers, embeddings, grouped convolutions, parameters not in the optimizer...) keep their plain gradient and so
get the base optimizer's update; they are listed in one line when K-FAC starts.

References:
    Martens, Grosse. "Optimizing Neural Networks with Kronecker-factored Approximate Curvature", ICML 2015,
    arXiv 1503.05671. Grosse, Martens. "A Kronecker-factored approximate Fisher matrix for convolution layers",
    ICML 2016, arXiv 1602.01407. Ba, Grosse, Martens. "Distributed Second-Order Optimization using
    Kronecker-Factored Approximations", ICLR 2017.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from scalelab.parallel.runtime import CommStats, ring_bytes_sent
from scalelab.recipe.parts import run_closure

__all__ = ["KFAC", "METHODS", "assign_owners", "conv_patches", "kfac_optimizer", "step_damping"]

METHODS = ("eigen", "inverse")
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def step_damping(damping: float, milestones: list[int] | tuple[int, ...] = (), gamma: float = 1.0
                 ) -> Callable[[int], float]:
    """Damping ``λ(step) = damping * gamma ** (number of milestones <= step)``: constant without milestones.

    A decreasing damping schedule is what kfac-pytorch's ImageNet example uses (damping decayed at fixed
    epochs); ``milestones`` are in steps.
    """
    ms = sorted(milestones)
    return lambda step: damping * gamma ** sum(1 for m in ms if step >= m)


def conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The im2col patches of a convolution's input: (M, C_in * kh * kw, T), in the order of the weight.

    Padding (numbers, ``"same"``/``"valid"`` or a non-zero ``padding_mode``) is applied explicitly, exactly as
    the convolution does, then ``F.unfold`` extracts one column per output location ``t``. Conv1d is the 2-D
    case with height 1. Row ``t`` of the result transposed, dotted with ``weight.reshape(out, -1)``, gives the
    pre-activation at ``t`` (Grosse & Martens 2016, eq. for the expanded activations ``[[A]]``).
    """
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    pad = module._reversed_padding_repeated_twice  # (left, right[, top, bottom]) as the module pads
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if isinstance(module, nn.Conv1d):
            x = F.pad(x.squeeze(2), pad, mode=mode).unsqueeze(2)
        else:
            x = F.pad(x, pad, mode=mode)
    return F.unfold(x, kernel, dilation=dilation, stride=stride)


def assign_owners(costs: list[float], world_size: int) -> list[int]:
    """Greedy load balancing: the costliest item first, each to the worker with the least work so far.

    Returns the owning rank of each item (ties go to the lowest rank). Ba et al. (2017) compute each
    inverse on one worker and broadcast it; balancing by cost keeps one worker from doing all the big ones.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += costs[i]
    return owners


class _Layer:
    """One preconditioned layer: its parameters, this step's factor sums and the running factors."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.weight: nn.Parameter = module.weight
        self.bias: nn.Parameter | None = module.bias
        self.conv = isinstance(module, (nn.Conv1d, nn.Conv2d))
        self.dim_a = self.weight[0].numel() + (self.bias is not None)
        self.dim_g = self.weight.shape[0]
        self.factor_dtype = torch.promote_types(self.weight.dtype, torch.float32)
        self.reset_sums()
        self.A: Tensor | None = None
        self.G: Tensor | None = None
        self.inv: dict[str, Tensor] = {}
        self.scale: tuple[float, Tensor] | None = None   # eigen: (λ, 1 / (d_G d_Aᵀ + λ)) of the current inv

    def reset_sums(self) -> None:
        self.a_sum: Tensor | None = None
        self.a_batches = 0
        self.g_sum: Tensor | None = None
        self.g_rows = 0

    def activation_rows(self, x: Tensor) -> tuple[Tensor, int]:
        """Rows ``ā`` (M * T, dim_a) of one forward call, and the batch M."""
        m = x.shape[0]
        if self.conv:
            patches = conv_patches(self.module, x)                      # (M, C k, T)
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.to(self.factor_dtype)
        if self.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows, m

    def grad_rows(self, g: Tensor) -> Tensor:
        """Rows (M * T, out) of the output gradient: channels last for convolutions."""
        if self.conv:
            return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    def grad_matrix(self) -> Tensor:
        """The gradient as the (out, dim_a) matrix ``V``: the flattened weight gradient, then the bias's."""
        v = self.weight.grad.reshape(self.dim_g, -1)
        if self.bias is not None:
            v = torch.cat([v, self.bias.grad.reshape(-1, 1)], dim=1)
        return v.to(self.factor_dtype)

    def set_grad(self, v: Tensor) -> None:
        w = v[:, : self.weight[0].numel()]
        self.weight.grad.copy_(w.reshape(self.weight.shape))
        if self.bias is not None:
            self.bias.grad.copy_(v[:, -1])


class KFAC:
    """The K-FAC preconditioner of a model's Linear and Conv layers (see the module docstring for the math).

    Call :meth:`step` after ``backward()`` and before the optimizer's step: it replaces the gradients of the
    preconditioned layers by the natural-gradient direction. :func:`kfac_optimizer` attaches it to an
    optimizer so that ``opt.step()`` does both (that is how ``recipe.precondition = "kfac"`` works).

    Args:
        model: the module whose layers are preconditioned; with DDP, the inner (base) module.
        damping: Tikhonov damping ``λ``, a number or a function of the step.
        factor_decay: ``ξ`` of the running averages of the factors (0.95 in kfac-pytorch).
        factor_every: update the factors every this many steps (hooks capture nothing in between).
        inverse_every: recompute eigendecompositions or inverses every this many steps.
        kl_clip: ``κ`` of the KL clipping (Ba et al. 2017, §5); 0 turns it off.
        method: ``"inverse"`` (factored Tikhonov; 2 matmuls per layer per step, a Cholesky inverse per factor
            update) or ``"eigen"`` (exact damping of ``A ⊗ G``; 4 matmuls per layer per step, an eigh per update).
            The default intervals (10, 10) and method keep a step under 2x plain SGD's at small batches
            (``bench/optimizers.py``); factor capture costs about as much as the layer's forward matmuls.
        params: only layers whose weight is among these are preconditioned (default: all of the model's).
        log: where the one-line list of preconditioned and skipped layers goes (``None``: nowhere).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from scalelab.recipe.kfac import KFAC
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> kfac = KFAC(model, damping=1e-2, log=print)
        kfac: preconditioning 2 layers (0, 2); base update for 1: 1 (BatchNorm1d)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> kfac.step(lr=0.1)          # the gradients are now preconditioned; then opt.step()
        >>> tuple(kfac.layers[0].A.shape), tuple(kfac.layers[0].G.shape)
        ((4, 4), (4, 4))

    References:
        Martens & Grosse 2015 (arXiv 1503.05671); Grosse & Martens 2016 (arXiv 1602.01407); Ba, Grosse &
        Martens 2017 (ICLR, distributed K-FAC and KL clipping).
    """

    def __init__(self, model: nn.Module, damping: float | Callable[[int], float] = 1e-3,
                 factor_decay: float = 0.95, factor_every: int = 10, inverse_every: int = 10,
                 kl_clip: float = 1e-3, method: str = "inverse", params=None,
                 log: Callable[[str], None] | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if not 0.0 <= factor_decay < 1.0 or factor_every < 1 or inverse_every < 1 or kl_clip < 0:
            raise ValueError("need 0 <= factor_decay < 1, factor_every >= 1, inverse_every >= 1, "
                             "kl_clip >= 0")
        self.damping = damping if callable(damping) else (lambda step, d=float(damping): d)
        self.factor_decay, self.factor_every, self.inverse_every = factor_decay, factor_every, inverse_every
        self.kl_clip, self.method = kl_clip, method
        self.steps = 0
        # what this worker sends in K-FAC's own collectives and waits for them; the trainer points this at the
        # runtime's counters, so they add to the run's comm_bytes and comm_s
        self.comm = CommStats()
        allowed = None if params is None else {id(p) for p in params}
        self.layers: list[_Layer] = []
        self.skipped: list[str] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            ok = (isinstance(module, _SUPPORTED) and getattr(module, "groups", 1) == 1
                  and (allowed is None or id(module.weight) in allowed))
            if ok:
                layer = _Layer(name, module)
                module.register_forward_hook(self._forward_hook(layer))
                self.layers.append(layer)
            else:
                groups = getattr(module, "groups", 1)
                why = type(module).__name__ + (f", groups={groups}" if groups != 1 else "")
                self.skipped.append(f"{name or '(root)'} ({why})")
        self._owners: list[int] | None = None
        if log is not None and _rank() == 0:
            names = ", ".join(layer.name for layer in self.layers)
            line = f"kfac: preconditioning {len(self.layers)} layers ({names})"
            if self.skipped:
                line += f"; base update for {len(self.skipped)}: " + ", ".join(self.skipped)
            log(line)

    # ---- capture (hooks) ---------------------------------------------------------------------------------
    def capturing(self) -> bool:
        """Whether the forward/backward of the current step feeds the factors."""
        return self.steps % self.factor_every == 0

    def _forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled() and self.capturing()
                    and isinstance(output, Tensor) and output.requires_grad):
                return
            with torch.no_grad():
                rows, m = layer.activation_rows(inputs[0].detach())
                a = rows.T @ rows
                layer.a_sum = a if layer.a_sum is None else layer.a_sum + a
                layer.a_batches += m

            def grad_hook(g):
                with torch.no_grad():
                    rows = layer.grad_rows(g.detach()).to(layer.factor_dtype) * m   # undo the mean over M
                    s = rows.T @ rows
                    layer.g_sum = s if layer.g_sum is None else layer.g_sum + s
                    layer.g_rows += rows.shape[0]

            output.register_hook(grad_hook)

        return hook

    def clear(self) -> None:
        """Drop what the hooks captured since the last step (e.g. of a skipped step); zero_grad calls it."""
        for layer in self.layers:
            layer.reset_sums()

    # ---- the step ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float | dict[int, float] = 1.0) -> None:
        """Update factors and inverses when due, then precondition the gradients in place.

        Args:
            lr: the learning rate for KL clipping: a number, or ``{id(weight): lr}`` per layer (what
                :func:`kfac_optimizer` passes from the param groups).
        """
        if self.capturing():
            self._update_factors()
        if self.steps % self.inverse_every == 0:
            self._update_inverses()
        self._precondition(lr)
        self.clear()
        self.steps += 1

    def _update_factors(self) -> None:
        ready = [layer for layer in self.layers if layer.a_sum is not None and layer.g_sum is not None]
        if not ready:
            return
        new = []
        for layer in ready:
            new += [layer.a_sum / layer.a_batches, layer.g_sum / layer.g_rows]
        world = _world()
        if world > 1:  # one all-reduce of every factor: the average over workers (equal shares of the batch)
            flat = torch.cat([t.reshape(-1) for t in new])
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            self.comm.exposed_s += time.perf_counter() - t0
            self.comm.bytes_sent += ring_bytes_sent(flat.numel() * flat.element_size(), world)
            flat /= world
            new = [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in new]), new)]
        xi = self.factor_decay
        for i, layer in enumerate(ready):
            a, g = new[2 * i], new[2 * i + 1]
            a, g = (a + a.T) / 2, (g + g.T) / 2
            layer.A = a.clone() if layer.A is None else layer.A.mul_(xi).add_(a, alpha=1 - xi)
            layer.G = g.clone() if layer.G is None else layer.G.mul_(xi).add_(g, alpha=1 - xi)

    def _update_inverses(self) -> None:
        world, rank = _world(), _rank()
        if self._owners is None or len(self._owners) != len(self.layers):
            self._owners = assign_owners([la.dim_a ** 3 + la.dim_g ** 3 for la in self.layers], world)
        lam = self.damping(self.steps)
        for layer, owner in zip(self.layers, self._owners):
            if layer.A is None or layer.G is None:
                continue
            if world == 1 or owner == rank:
                layer.inv = self._decompose(layer, lam)
            if world > 1:
                if owner != rank:
                    layer.inv = {k: torch.empty(s, dtype=layer.factor_dtype, device=layer.A.device)
                                 for k, s in self._inverse_shapes(layer).items()}
                flat = torch.cat([t.reshape(-1) for t in layer.inv.values()])
                t0 = time.perf_counter()
                dist.broadcast(flat, src=owner)
                self.comm.exposed_s += time.perf_counter() - t0
                if owner == rank:   # every other worker receives it once: (n-1) x payload, charged to the root
                    self.comm.bytes_sent += (world - 1) * flat.numel() * flat.element_size()
                parts = flat.split([t.numel() for t in layer.inv.values()])
                layer.inv = {k: p.view_as(t).clone() for (k, t), p in zip(layer.inv.items(), parts)}
            layer.scale = None

    def _inverse_shapes(self, layer: _Layer) -> dict[str, tuple[int, ...]]:
        a, g = layer.dim_a, layer.dim_g
        if self.method == "eigen":
            return {"QA": (a, a), "dA": (a,), "QG": (g, g), "dG": (g,)}
        return {"Ainv": (a, a), "Ginv": (g, g)}

    def _decompose(self, layer: _Layer, lam: float) -> dict[str, Tensor]:
        A, G = layer.A, layer.G
        if self.method == "eigen":
            dA, QA = torch.linalg.eigh(A)
            dG, QG = torch.linalg.eigh(G)
            return {"QA": QA, "dA": dA.clamp_min(0.0), "QG": QG, "dG": dG.clamp_min(0.0)}
        # factored Tikhonov damping, Martens & Grosse 2015 §6.3: pi multiplies the damping of A
        ta, tg = A.diagonal().mean(), G.diagonal().mean()
        pi = torch.sqrt(ta / tg) if tg > 0 and ta > 0 else torch.ones((), dtype=A.dtype)
        root = lam ** 0.5
        return {"Ainv": _spd_inverse(A, pi * root), "Ginv": _spd_inverse(G, root / pi)}

    def precondition_matrix(self, layer: _Layer, v: Tensor) -> Tensor:
        """``Ṽ`` for the gradient matrix ``V`` of one layer, with the current decomposition and damping."""
        inv = layer.inv
        if self.method == "eigen":
            lam = self.damping(self.steps)
            if layer.scale is None or layer.scale[0] != lam:   # changes with the decomposition or the damping
                layer.scale = (lam, (torch.outer(inv["dG"], inv["dA"]) + lam).reciprocal_())
            v1 = inv["QG"].T @ v @ inv["QA"]
            return inv["QG"] @ v1.mul_(layer.scale[1]) @ inv["QA"].T
        return inv["Ginv"] @ v @ inv["Ainv"]

    def _precondition(self, lr: float | dict[int, float]) -> None:
        work = []
        for layer in self.layers:
            no_grad = layer.weight.grad is None or (layer.bias is not None and layer.bias.grad is None)
            if not layer.inv or no_grad:
                continue
            v = layer.grad_matrix()
            eta = lr.get(id(layer.weight), 0.0) if isinstance(lr, dict) else lr
            work.append((layer, v, self.precondition_matrix(layer, v), eta))
        if not work:
            return
        nu = 1.0
        if self.kl_clip > 0:
            vg = sum(eta * eta * (pv * v).sum() for _, v, pv, eta in work)
            vg = abs(float(vg))
            if vg > 0:
                nu = min(1.0, (self.kl_clip / vg) ** 0.5)
        for layer, _, pv, _ in work:
            layer.set_grad(pv * nu if nu != 1.0 else pv)

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count, running factors and decompositions of every layer (tensors: ``weights_only`` loads)."""
        layers = {}
        for layer in self.layers:
            entry = dict(layer.inv)
            if layer.A is not None:
                entry["A"], entry["G"] = layer.A, layer.G
            layers[layer.name] = {k: v.clone() for k, v in entry.items()}
        return {"steps": self.steps, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        saved = state["layers"]
        for layer in self.layers:
            entry = dict(saved.get(layer.name, {}))
            dev = layer.weight.device
            a, g = entry.pop("A", None), entry.pop("G", None)
            layer.A = None if a is None else a.to(dev, layer.factor_dtype).clone()
            layer.G = None if g is None else g.to(dev, layer.factor_dtype).clone()
            layer.inv = {k: v.to(dev, layer.factor_dtype).clone() for k, v in entry.items()}
            layer.scale = None
            layer.reset_sums()


def _spd_inverse(m: Tensor, shift) -> Tensor:
    """``(m + shift I)⁻¹`` of a symmetric positive semi-definite ``m``: by Cholesky (2-3x cheaper than a general
    inverse), or the general inverse when the shifted matrix is not numerically positive definite."""
    shifted = m + shift * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    chol, info = torch.linalg.cholesky_ex(shifted)
    return torch.linalg.inv(shifted) if info.item() else torch.cholesky_inverse(chol)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- attaching K-FAC to an optimizer ---------------------------------------------------------------------

class _Preconditioned:
    """Mixin: ``step`` preconditions with ``self.kfac`` first; the state dict carries K-FAC's state."""

    kfac: KFAC

    def step(self, closure=None):
        loss = run_closure(closure)
        lrs = {id(p): g["lr"] for g in self.param_groups for p in g["params"]}
        self.kfac.step(lrs)
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.kfac.clear()

    def state_dict(self):
        state = super().state_dict()
        state["kfac"] = self.kfac.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        kfac_state = state_dict.pop("kfac", None)
        super().load_state_dict(state_dict)
        if kfac_state is not None:
            self.kfac.load_state_dict(kfac_state)


_CLASSES: dict[type, type] = {}


def kfac_optimizer(opt: torch.optim.Optimizer, model: nn.Module, **kfac_args) -> torch.optim.Optimizer:
    """Attach a :class:`KFAC` preconditioner of ``model`` to ``opt``, in place; returns ``opt``.

    ``opt`` becomes an instance of a subclass of its own class (``KFACSGD``, ``KFACLAMB``...) whose ``step``
    preconditions the gradients and then runs the original step, so param groups, LR schedulers and
    ``state_dict`` keep working. Only layers whose weight ``opt`` optimizes are preconditioned; the KL
    clipping uses each layer's group LR. K-FAC plus momentum SGD is ``recipe.optimizer = "kfac"``.

    Example:
        >>> from torch import nn
        >>> from scalelab.recipe import SGD
        >>> model = nn.Linear(3, 2)
        >>> opt = kfac_optimizer(SGD(model.parameters(), lr=0.1), model, damping=1e-2)
        >>> type(opt).__name__, isinstance(opt, SGD)
        ('KFACSGD', True)
    """
    base = type(opt)
    if issubclass(base, _Preconditioned):
        raise ValueError("this optimizer already has a K-FAC preconditioner")
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"KFAC{base.__name__}", (_Preconditioned, base),
                                    {"__doc__": f"{base.__name__} on K-FAC-preconditioned gradients."})
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.__class__ = cls
    opt.kfac = KFAC(model, params=params, **kfac_args)
    if hasattr(opt, "_patch_step_function"):
        opt._patch_step_function()  # keep torch's optimizer step hooks working on the new class
    return opt
