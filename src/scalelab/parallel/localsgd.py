"""Local SGD and post-local SGD: workers train alone and average their models every H steps.

``parallel.mode=localsgd`` — local SGD / periodic model averaging (Stich 2019, "Local SGD Converges Fast and
Communicates Little", ICLR; Lin, Stich, Patel, Jaggi 2020, "Don't Use Large Mini-Batches, Use Local SGD", ICLR):
each of the N workers takes its ``B / N`` share of every global batch and steps its own copy of the model with its
own optimizer state, without any communication; every ``parallel.local_period`` (H) steps the models (parameters
and float buffers) are averaged with one all-reduce. Communication drops H-fold against sync SGD, and a straggler
holds the others up only at averaging points.

Post-local SGD (Lin et al. 2020): with ``parallel.local_start_step = t0 > 0`` the first ``t0`` steps are
synchronous (gradients averaged every step, as in sync data parallelism), and local SGD starts at ``t0``; the
paper switches at the first LR decay, when the early, noise-sensitive phase is over.

The learning rate and schedule are those of the global batch ``B``, as in the papers: with H = 1 (and SGD with
momentum and weight decay, which are linear in the gradient), averaging the models after each local step gives
the same parameters as averaging the gradients before it, so the run equals synchronous data parallelism up to
rounding (checked in ``tests/test_async.py``).

Evaluation and checkpoints use the average of the workers' models at that step; a resumed run starts every
worker from that average (so a resume is exact only at averaging points).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from scalelab.data import batch_indices, epoch_order
from scalelab.errors import DivergenceError
from scalelab.parallel.modes import RunBase, check_layout
from scalelab.parallel.runtime import init_runtime
from scalelab.parallel.stragglers import straggler_delay


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for t in tensors:
        t.data.copy_(flat[off:off + t.numel()].view_as(t))
        off += t.numel()


def run_localsgd(trainer) -> dict[str, Any]:
    """Entry point of every worker of a ``parallel.mode=localsgd`` job."""
    rt = init_runtime(trainer.cfg)
    try:
        summary = _LocalSGD(trainer, rt).run()
        rt.barrier()
        return summary
    finally:
        rt.shutdown()


class _LocalSGD(RunBase):
    def run(self) -> dict[str, Any]:
        cfg, t, p, rt = self.cfg, self.cfg.train, self.cfg.parallel, self.rt
        world, rank = rt.world_size, rt.rank
        check_layout(cfg, world)
        resume_state = self.trainer._prepare_out()
        B = t.batch_size
        spe, total, sched_total = self.load(B)
        lo, hi = rank * len(self.x_test_all) // world, (rank + 1) * len(self.x_test_all) // world
        x_test, y_test = self.x_test_all[lo:hi], self.y_test_all[lo:hi]
        model, opt, sched, c = self.build(B, spe, sched_total, resume_state)
        rt.wrap(model, cfg, ddp=False)  # every worker starts from rank 0's state
        eval_model = copy.deepcopy(model)
        params = list(model.parameters())
        shared = params + [b for b in model.buffers() if b.is_floating_point()]
        eval_shared = list(eval_model.parameters()) + [b for b in eval_model.buffers() if b.is_floating_point()]
        H, t0 = p.local_period, p.local_start_step
        eval_every, ckpt_every = t.eval_every or spe, t.checkpoint_every or spe
        comm0 = c.comm_bytes
        averagings = 0
        self.log(f"run {cfg.run_name()}: parallel.mode=localsgd, {world} workers x {B // world}, "
                 + (f"synchronous for {t0} steps, then " if t0 else "")
                 + f"model averaging every {H} steps, {total} steps ({spe}/epoch), lr {sched}"
                 + (f" -> {self.out}" if self.out else ""))

        def average_into(dst: list[torch.Tensor]) -> None:
            flat = rt.all_reduce_sum(_flat(shared)) / world
            _unflat(dst, flat)

        def do_eval() -> bool:
            from scalelab.train import evaluate_sums

            t_e = time.perf_counter()
            average_into(eval_shared)
            loss_sum, correct, n = evaluate_sums(eval_model, x_test, y_test, t.eval_batch)
            sums = rt.all_reduce_sum(torch.tensor([loss_sum, correct, n], dtype=torch.float64))
            c.eval_s += time.perf_counter() - t_e
            return self.record_eval((sums[0] / sums[2]).item(), (sums[1] / sums[2]).item(), int(sums[2]), spe)

        def save(step: int) -> None:
            average_into(eval_shared)
            real, self.model = self.model, eval_model
            self.save(step)
            self.model = real

        model.train()
        order, order_epoch = None, -1
        stopped = "completed"
        log_t0, log_step0 = c.train_s, c.step
        kill = cfg.faults.kill_rank == rank and c.restarts == 0
        while c.step < total:
            if kill and c.step == cfg.faults.kill_step:
                from scalelab.train import inject_kill

                inject_kill(rank, c.step)
            step_t0 = time.perf_counter()
            epoch, k = divmod(c.step, spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(self.x_train), t.seed, epoch), epoch
            idx = batch_indices(order, k, B, rank, world)
            lr = sched(c.step)
            for g in opt.param_groups:
                g["lr"] = lr
            delay = straggler_delay(cfg.stragglers, rank, c.step)
            if delay:
                time.sleep(delay)
            xb, yb = self.x_train[idx], self.y_train[idx]
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=cfg.recipe.label_smoothing)
            loss.backward()
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise DivergenceError(f"worker {rank}: loss is {loss_v} at step {c.step} (lr {lr:.4g}); stopped; "
                                      f"lower recipe.base_lr or add warmup")
            synchronous = c.step < t0
            if synchronous:  # post-local SGD's first phase: plain synchronous SGD
                flat = rt.all_reduce_sum(_flat([q.grad for q in params])) / world
                _unflat([q.grad for q in params], flat)
            if cfg.recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.recipe.grad_clip)
            opt.step()
            c.step += 1
            if not synchronous and (c.step - t0) % H == 0:
                average_into(shared)
                averagings += 1
            c.samples_seen += B
            c.train_s += time.perf_counter() - step_t0
            c.comm_bytes = comm0 + rt.comm.bytes_sent
            c.comm_s = rt.comm.exposed_s

            if c.step % t.log_every == 0 or c.step == total:
                stats = rt.all_reduce_sum(torch.tensor([loss_v * len(yb), (out.argmax(1) == yb).sum().item(),
                                                        len(yb)], dtype=torch.float64))
                dt = c.train_s - log_t0
                sps = (c.step - log_step0) * B / dt if dt > 0 else 0.0
                log_t0, log_step0 = c.train_s, c.step
                self.tracker.log("train", c.step, epoch=c.step / spe, loss=(stats[0] / stats[2]).item(),
                                 acc=(stats[1] / stats[2]).item(), lr=lr, samples=c.samples_seen,
                                 samples_per_s=sps, train_s=c.train_s, wall_s=c.loop_s,
                                 comm_bytes=c.comm_bytes, averagings=averagings)
            if c.step % eval_every == 0 or c.step == total:
                if do_eval():
                    stopped = "target"
                    save(c.step)
                    break
            if c.step % ckpt_every == 0 or c.step == total:
                save(c.step)
        if c.last_eval_step != c.step:
            do_eval()
        average_into(eval_shared)
        self.model = eval_model  # the summary's params_sha256 is the averaged model's
        return self.finish(spe, B, stopped, {"workers": world, "local_period": H, "local_start_step": t0,
                                             "averagings": averagings})
