"""Gradient compressors: each one a small class that turns a flat gradient into what travels, and back.

Two families, by how their messages combine across workers:

* sparse (:class:`TopK`, :class:`RandomK`; DGC in :mod:`scalelab.compress.dgc`): ``select(x) -> (indices, values)``.
  Top-k messages differ per worker and travel by the sparse all-reduce of :mod:`scalelab.compress.sparse`;
  random-k with a seed shared by all workers picks the same indices everywhere, so only the values are
  all-reduced.
* quantizers (:class:`ScaledSign`, :class:`MajoritySign`, :class:`QSGD`, :class:`TernGrad`):
  ``encode(x) -> uint8 payload`` of a size that depends only on ``x.numel()``, ``decode(payload, n) -> x_hat``;
  the payloads of all workers are all-gathered and decoded, and ``combine`` turns the decoded list into the
  averaged gradient.

Error feedback (:class:`ErrorFeedback`) is one mechanism for all of them: keep what compression lost and add it to
the next gradient (Seide et al. 2014, "1-bit SGD"; Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with memory";
Karimireddy et al. 2019, "Error feedback fixes SignSGD and other gradient compression schemes").

Everything works on 1-D tensors of any float dtype; scales travel as float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans -> uint8, 8 per byte (big-endian in the byte), zero-padded to a multiple of 8."""
    if bits.device.type == "cpu":  # numpy's packbits is one C loop; the torch expression below makes 3 passes
        return torch.from_numpy(np.packbits(bits.numpy()))
    n = bits.numel()
    pad = (-n) % 8
    b = torch.cat([bits.to(torch.uint8), bits.new_zeros(pad, dtype=torch.uint8)]) if pad else bits.to(torch.uint8)
    return (b.view(-1, 8) * _BITS.to(b.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` booleans."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))
    return ((packed.unsqueeze(1) & _BITS.to(packed.device)) != 0).view(-1)[:n]


def _scales_to_bytes(s: torch.Tensor) -> torch.Tensor:
    return s.to(torch.float32).contiguous().view(torch.uint8)


def _bytes_to_scales(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _chunks(n: int, chunk: int) -> int:
    return max(1, math.ceil(n / chunk))


def _pad_to(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(m - x.numel())]) if m > x.numel() else x


# ---- sparse ------------------------------------------------------------------------------------------------
class _Sparsifier:
    """Keeps ``k = ceil(density * n)`` entries of an ``n``-vector; ``select`` says which."""

    shared_indices = False  # True: every worker picks the same indices, so only the values travel

    def __init__(self, density: float):
        self.density = density

    def k(self, n: int) -> int:
        return max(1, math.ceil(self.density * n))

    def capacity(self, n: int) -> int:
        return self.k(n)


class TopK(_Sparsifier):
    """The ``k = ceil(density * n)`` entries of largest magnitude (exact ``torch.topk``).

    References:
        Aji & Heafield 2017, "Sparse Communication for Distributed Gradient Descent", arXiv 1704.05021;
        Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with Memory", arXiv 1809.07599.
    """

    def select(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.topk(x.abs(), self.k(x.numel()), sorted=False).indices
        return idx, x[idx]


class RandomK(_Sparsifier):
    """``k = ceil(density * n)`` entries drawn uniformly without replacement, the same on every worker.

    The seed is a function of (step, bucket), shared by all workers, so the indices need not travel: the values
    are all-reduced densely as a k-vector (Stich et al. 2018 analyse random-k with memory).

    References:
        Stich, Cordonnier, Jaggi 2018, "Sparsified SGD with Memory", arXiv 1809.07599.
    """

    shared_indices = True

    def select(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = x.numel(), self.k(x.numel())
        g = torch.Generator().manual_seed(seed)
        if 4 * k >= n:
            idx = torch.randperm(n, generator=g)[:k]
        else:  # O(k), not O(n): draw with replacement until k distinct, then a random k of them
            idx = torch.empty(0, dtype=torch.long)
            while idx.numel() < k:
                idx = torch.unique(torch.cat([idx, torch.randint(0, n, (k + k // 8 + 8,), generator=g)]))
            idx = idx[torch.randperm(idx.numel(), generator=g)[:k]]
        idx = idx.to(x.device)
        return idx, x[idx]


# ---- quantizers --------------------------------------------------------------------------------------------
class ScaledSign:
    """1 bit per entry and one scale: ``C(x) = (||x||_1 / n) * sign(x)`` (``sign(0) = +1``).

    With error feedback this is EF-SignSGD; the scale makes the compressed vector have the same L1 norm as ``x``.
    Payload: 4 bytes of scale + ceil(n / 8) bytes. Combined by averaging the decoded vectors.

    References:
        Karimireddy, Rebjock, Stich, Jaggi 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
        Schemes", ICML, arXiv 1901.09847 (Algorithm 1, scaled sign compressor).
    """

    def payload_bytes(self, n: int) -> int:
        return 4 + math.ceil(n / 8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().mean().reshape(1)
        return torch.cat([_scales_to_bytes(scale), pack_bits(x >= 0)])

    def decode(self, payload: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
        scale = _bytes_to_scales(payload[:4]).to(dtype)
        signs = unpack_bits(payload[4:], n).to(dtype) * 2 - 1
        return signs * scale

    def combine(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(decoded).mean(0)


class MajoritySign(ScaledSign):
    """signSGD with majority vote: the update is ``sign(sum_k sign(g_k))``, ties give 0.

    Bernstein et al. send 1 bit per entry and take the majority; their update has magnitude 1 per entry and needs
    its own learning rate. So that the same recipe serves every method, the vote is multiplied by the mean over
    workers of ``||g_k||_1 / n`` (the scale travels with the bits, 4 bytes): the direction is the paper's.

    References:
        Bernstein, Wang, Azizzadenesheli, Anandkumar 2018, "signSGD: Compressed Optimisation for Non-Convex
        Problems", ICML, arXiv 1802.04434; Bernstein et al. 2019, "signSGD with majority vote is communication
        efficient and fault tolerant", ICLR, arXiv 1810.05291.
    """

    def combine(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(decoded)
        scale = stacked.abs().mean(1).mean()  # each decoded row is +-its scale: |row| mean = its scale
        return torch.sign(torch.sign(stacked).sum(0)) * scale


class QSGD:
    """QSGD with ``s`` levels and stochastic rounding, per chunk of ``chunk`` entries (the paper's bucketing).

    For a chunk ``x`` with norm ``||x||_2``: ``l = floor(s |x_i| / ||x|| + u)``, ``u ~ U[0, 1)``;
    ``Q(x_i) = ||x|| * sign(x_i) * l / s``; unbiased (``E Q(x) = x``). Each entry travels as a signed int8
    (``s <= 127``) and each chunk's norm as a float32: n + 4 * ceil(n / chunk) bytes. (The paper's Elias coding
    would send fewer bits at small ``s``; int8 keeps the decoder trivial.)

    References:
        Alistarh, Grubic, Li, Tomioka, Vojnovic 2017, "QSGD: Communication-Efficient SGD via Gradient Quantization
        and Encoding", NeurIPS, arXiv 1610.02132 (section 3.1; bucket size 512 in the experiments).
    """

    def __init__(self, levels: int = 16, chunk: int = 512, generator: torch.Generator | None = None):
        self.s, self.chunk, self.generator = levels, chunk, generator

    def payload_bytes(self, n: int) -> int:
        return 4 * _chunks(n, self.chunk) + n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.numel(), _chunks(x.numel(), self.chunk)
        xc = _pad_to(x.float(), c * self.chunk).view(c, self.chunk)
        norms = xc.norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        r = xc.abs() / safe[:, None] * self.s
        lev = torch.floor(r + torch.rand(r.shape, generator=self.generator).to(r.device)).clamp_(max=self.s)
        q = (torch.sign(xc) * lev).to(torch.int8).view(-1)[:n]
        return torch.cat([_scales_to_bytes(norms), q.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
        c = _chunks(n, self.chunk)
        norms = _bytes_to_scales(payload[: 4 * c])
        q = payload[4 * c:].view(torch.int8).float()
        q = _pad_to(q, c * self.chunk).view(c, self.chunk)
        return (q * norms[:, None] / self.s).view(-1)[:n].to(dtype)

    def combine(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(decoded).mean(0)


class TernGrad:
    """TernGrad: ``t_i = s * sign(x_i) * b_i``, ``b_i ~ Bernoulli(|x_i| / s)``, ``s = max |x|`` per chunk.

    Unbiased; 2 bits per entry (4 entries per byte) and one float32 scale per chunk of ``chunk`` entries. The paper
    shares one scale per layer and clips gradients at 2.5 standard deviations first; this keeps the clipping and
    takes the scale per chunk of a bucket instead of per layer (a finer scale, the same estimator).

    References:
        Wen, Xu, Yan, Wu, Wang, Chen, Li 2017, "TernGrad: Ternary Gradients to Reduce Communication in Distributed
        Deep Learning", NeurIPS, arXiv 1705.07878 (eq. 3-4; gradient clipping, section 3.3).
    """

    def __init__(self, chunk: int = 512, clip_sigmas: float = 2.5, generator: torch.Generator | None = None):
        self.chunk, self.clip_sigmas, self.generator = chunk, clip_sigmas, generator

    def payload_bytes(self, n: int) -> int:
        return 4 * _chunks(n, self.chunk) + math.ceil(n / 4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.numel(), _chunks(x.numel(), self.chunk)
        xf = x.float()
        if self.clip_sigmas and n > 1:
            bound = self.clip_sigmas * xf.std()
            xf = xf.clamp(-bound, bound)
        xc = _pad_to(xf, c * self.chunk).view(c, self.chunk)
        s = xc.abs().amax(dim=1)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        b = torch.rand(xc.shape, generator=self.generator).to(xc.device) < xc.abs() / safe[:, None]
        code = (torch.sign(xc) * b + 1).to(torch.uint8).view(-1)[:n]  # 0, 1, 2 for -1, 0, +1
        pad = (-n) % 4
        code = torch.cat([code, code.new_ones(pad)]) if pad else code
        code = code.view(-1, 4)
        packed = code[:, 0] << 6 | code[:, 1] << 4 | code[:, 2] << 2 | code[:, 3]
        return torch.cat([_scales_to_bytes(s), packed])

    def decode(self, payload: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
        c = _chunks(n, self.chunk)
        s = _bytes_to_scales(payload[: 4 * c])
        p = payload[4 * c:]
        code = torch.stack([(p >> 6) & 3, (p >> 4) & 3, (p >> 2) & 3, p & 3], dim=1).view(-1)[:n]
        t = _pad_to(code.float() - 1, c * self.chunk).view(c, self.chunk) * s[:, None]
        return t.view(-1)[:n].to(dtype)

    def combine(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(decoded).mean(0)


# ---- error feedback ----------------------------------------------------------------------------------------
class ErrorFeedback:
    """Error feedback around any compressor: compress ``p = g + e``, keep ``e <- p - C(p)`` for the next step.

    What was not sent is never lost: after T steps, the sum of what was sent plus the residual equals the sum
    of the T gradients exactly (tests check this). The residual ``e`` is a flat tensor owned by the caller (the
    hooks keep one per DDP bucket), updated in place.

    Example:
        >>> import torch
        >>> ef, e = ErrorFeedback(), torch.zeros(4)
        >>> p = ef.add(torch.tensor([3.0, -1.0, 0.5, 2.0]), e)
        >>> idx, vals = TopK(0.5).select(p)
        >>> ef.keep(e, p, selected_dense(p, idx)); e
        tensor([ 0.0000, -1.0000,  0.5000,  0.0000])

    References:
        Seide, Fu, Droppo, Li, Yu 2014, "1-Bit Stochastic Gradient Descent and its Application to Data-Parallel
        Distributed Training of Speech DNNs"; Karimireddy et al. 2019, arXiv 1901.09847 (EF-SGD, Algorithm 2).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def add(self, g: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``p = g + e`` (a new tensor)."""
        return g + e if self.enabled else g.clone()

    def keep(self, e: torch.Tensor, p: torch.Tensor, sent: torch.Tensor) -> None:
        """``e <- p - sent`` in place, ``sent`` being the decoded message this worker contributed."""
        if self.enabled:
            torch.sub(p, sent, out=e)


def selected_dense(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The dense vector that a sparse message ``(idx, p[idx])`` represents."""
    out = torch.zeros_like(p)
    out[idx] = p[idx]
    return out
