"""The global batch of every step, and how it is split into worker shares and micro-batches.

One mechanism serves three needs:

- **Batch-size schedules** (Smith, Kindermans, Ying, Le 2017, "Don't Decay the Learning Rate, Increase the Batch
  Size", arXiv 1711.00489): at each epoch in ``recipe.batch_milestones`` the global batch is multiplied by
  ``recipe.batch_growth`` instead of the learning rate being decayed. The SGD noise scale g = lr N / B falls the
  same way, with fewer parameter updates.
- **Gradient accumulation**: a worker whose share of the batch is larger than its micro-batch runs several
  forward/backward passes and steps once, so the update is the exact mean gradient of its share.
- **Elastic membership**: when a job restarts on another number of workers, either the global batch is kept
  (``parallel.resize = "keep_global"``: each share changes, and accumulation keeps each worker's memory as it
  was) or each worker's share is kept (``"keep_worker"``: the global batch changes, and the LR scaling rule is
  applied to the new batch).

Progress through the data is counted in samples, not steps: ``(epoch, pos)`` says how much of the epoch's
permutation has been read. A step reads ``B`` samples (more with backup workers) at ``pos``; when fewer than that
remain, the rest of the epoch is dropped and the next epoch starts, so every step has exactly its batch. The LR
schedule is indexed by *reference steps* ``u = epoch * S + pos / B0`` (``B0`` the batch before growth, ``S`` its
steps per epoch): with a constant batch ``u`` is the step number, and with a growing batch the schedule still
runs over the configured number of epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scalelab.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """The batch schedule of one session (fixed world size).

    Args:
        base: global batch before any growth (the config's, or re-based at an elastic restart).
        n: training samples.
        used: workers whose gradients make a step (world minus backup workers).
        world: all workers; each reads its own share, so a step reads ``B // used * world`` samples.
        milestones: epochs at which the batch grows.
        growth: the factor at each milestone.
        micro: largest share one worker puts through one forward/backward; 0 = no limit.
    """

    base: int
    n: int
    used: int = 1
    world: int = 1
    milestones: tuple[float, ...] = ()
    growth: float = 1.0
    micro: int = 0

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))
        for k in range(len(self.milestones) + 1):
            B = self._batch_of_stage(k)
            if B % self.used:
                raise ConfigError(f"train.batch_size: the global batch {B}"
                                  + (f" (after {k} batch_milestones)" if k else "")
                                  + f" is not divisible by the {self.used} workers whose gradients are used")
            if B // self.used * self.world > self.n:
                raise ConfigError(f"train.batch_size: a step would read {B // self.used * self.world} samples"
                                  + (f" (after {k} batch_milestones)" if k else "")
                                  + f" but the training set has {self.n}")

    def _batch_of_stage(self, k: int) -> int:
        return int(round(self.base * self.growth ** k))

    # ---- sizes -----------------------------------------------------------------------------------------------
    @property
    def ref_steps_per_epoch(self) -> int:
        """Steps per epoch at the base batch: the unit of the LR schedule."""
        return self.n // (self.base // self.used * self.world)

    def global_batch(self, epoch: int, pos: int) -> int:
        """The global batch of a step that starts at ``pos`` samples into ``epoch``."""
        progress = epoch + pos / self.n
        return self._batch_of_stage(sum(progress >= m for m in self.milestones))

    def read(self, B: int) -> int:
        """Samples a step of global batch ``B`` reads (backup workers read a share each too)."""
        return B // self.used * self.world

    def share(self, B: int) -> int:
        return B // self.used

    def micro_batches(self, B: int) -> int:
        """Forward/backward passes per worker per step (gradient accumulation when > 1)."""
        return 1 if not self.micro else max(1, math.ceil(self.share(B) / self.micro))

    # ---- position ----------------------------------------------------------------------------------------------
    def start(self, epoch: int, pos: int) -> tuple[int, int, int]:
        """Where the next step starts and its batch: ``(epoch, pos, B)``, rolling over to the next epoch when
        fewer than a step's samples remain."""
        B = self.global_batch(epoch, pos)
        if pos + self.read(B) > self.n:
            epoch, pos = epoch + 1, 0
            B = self.global_batch(epoch, pos)
        return epoch, pos, B

    def ref_step(self, epoch: int, pos: int) -> float:
        """The LR schedule's position: steps of the base batch since the start."""
        return epoch * self.ref_steps_per_epoch + pos / self.read(self.base)

    def epoch_ends(self, epoch: int, pos: int) -> bool:
        """True when the step that just ended at ``(epoch, pos)`` was the last of its epoch."""
        return self.start(epoch, pos)[0] != epoch

    def count_steps(self, epoch: int, pos: int, total_ref: float, max_steps: int = 0, done: int = 0) -> int:
        """Steps a run makes in all: ``done`` so far, then from ``(epoch, pos)`` until the schedule position
        reaches ``total_ref`` (or ``max_steps`` steps in all, when set)."""
        if max_steps:
            return max_steps
        if not self.milestones:  # a constant batch advances the schedule by exactly one reference step
            epoch, pos, _ = self.start(epoch, pos)
            return done + max(0, math.ceil(total_ref - 1e-9 - self.ref_step(epoch, pos)))
        steps = done
        while True:
            epoch, pos, B = self.start(epoch, pos)
            if self.ref_step(epoch, pos) >= total_ref - 1e-9:
                return steps
            pos += self.read(B)
            steps += 1

    def describe(self) -> str:
        parts = [f"B={self.base}"]
        if self.milestones:
            parts.append(f"x{self.growth:g} at epochs {', '.join(f'{m:g}' for m in self.milestones)}")
        if self.micro:
            parts.append(f"micro-batch {self.micro}/worker")
        return " ".join(parts)
