"""Straggler injection and backup workers (Chen, Pan, Monga, Bengio, Jozefowicz 2016, "Revisiting Distributed
Synchronous SGD", arXiv 1604.00981).

Stragglers: ``stragglers.dist`` adds a per-step delay to workers, drawn from a named distribution, as a stand-in
for a slow machine, a noisy neighbour or a network hiccup:

- ``fixed``: rank ``stragglers.rank`` sleeps ``delay_s`` every step (one slow machine);
- ``exp``: every worker sleeps an exponential delay of mean ``delay_s`` with probability ``prob`` per step;
- ``pareto``: the same with a Pareto (heavy-tailed) delay of scale ``delay_s`` and tail index ``shape``
  (smaller ``shape``, heavier tail; the mean is infinite for ``shape <= 1``).

The delays are a pure function of ``(seed, rank, step)``: a resumed run sees the same stragglers, and no torch or
numpy random state is touched.

Backup workers: with ``parallel.backup_workers = b`` the job runs N + b workers; at every step the gradients of
the first N workers to finish are averaged and applied, and the b late ones are dropped (and counted). Arrival
order is decided through the job's store (an atomic counter per step); a worker that is still sleeping when N
others have arrived stops waiting and contributes nothing, so the step does not wait for it.
"""

from __future__ import annotations

import hashlib
import random
import time

from scalelab.config import StragglersConfig


def _rng(seed: int, rank: int, step: int) -> random.Random:
    digest = hashlib.sha256(f"stragglers:{seed}:{rank}:{step}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def straggler_delay(cfg: StragglersConfig, rank: int, step: int) -> float:
    """Seconds worker ``rank`` is delayed at ``step`` under ``cfg``."""
    if cfg.dist == "none":
        return 0.0
    if cfg.dist == "fixed":
        return cfg.delay_s if rank == cfg.rank else 0.0
    rng = _rng(cfg.seed, rank, step)
    if rng.random() >= cfg.prob:
        return 0.0
    if cfg.dist == "exp":
        return rng.expovariate(1.0 / cfg.delay_s)
    return cfg.delay_s * rng.paretovariate(cfg.shape)  # pareto: scale * (heavy-tailed factor >= 1)


def sleep_unless(seconds: float, stop, poll_s: float = 0.002) -> bool:
    """Sleep ``seconds`` unless ``stop()`` becomes true first; returns True if the whole delay was slept."""
    deadline = time.perf_counter() + seconds
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return True
        if stop is not None and stop():
            return False
        time.sleep(min(poll_s, left))


class BackupSync:
    """Synchronous SGD with backup workers: average the first ``used`` gradients of each step, drop the rest.

    Every worker calls, each step: :meth:`wait` (its straggler delay, cut short when ``used`` others have
    already arrived), then, if it computed a gradient, :meth:`arrive` (its place in the arrival order), then
    :meth:`reduce`, one all-reduce of the flattened gradients (zeros from late workers), the loss and a one-hot
    of the dropped ranks. Exactly ``used`` workers arrive first, so the sum divided by ``used`` is the mean of
    their gradients.
    """

    def __init__(self, rt, used: int):
        if rt.store is None:
            raise ValueError("backup workers need a distributed job")
        self.rt, self.used = rt, used

    @staticmethod
    def _key(step: int) -> str:
        return f"arrivals/{step}"

    def wait(self, delay_s: float, step: int) -> bool:
        """Sleep the straggler delay; False if ``used`` workers finished meanwhile (this one is then late)."""
        if delay_s <= 0:
            return True
        return sleep_unless(delay_s, lambda: int(self.rt.store.add(self._key(step), 0)) >= self.used)

    def arrive(self, step: int) -> bool:
        """Take a place in the arrival order; True if among the first ``used``."""
        return int(self.rt.store.add(self._key(step), 1)) <= self.used

    def reduce(self, params: list, loss, included: bool, step: int) -> tuple[float, list[int]]:
        """Average the included gradients into every ``p.grad``; returns (mean loss, dropped ranks)."""
        import torch

        world, rank = self.rt.world_size, self.rt.rank
        dtype = params[0].dtype
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads]
                         + [loss.detach().reshape(1).to(dtype), torch.zeros(world, dtype=dtype)])
        if not included:
            flat.zero_()
            flat[-world + rank] = 1.0
        self.rt.all_reduce_sum(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset:offset + n] / self.used).view_as(p).to(p.dtype)
            offset += n
        if rank == 0 and step >= 2:
            self.rt.store.delete_key(self._key(step - 2))  # every worker is past step - 2 by now
        dropped = [r for r in range(world) if flat[-world + r] > 0.5]
        return flat[offset].item() / self.used, dropped
