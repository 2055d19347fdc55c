"""Communication compression for synchronous data parallelism, as DDP communication hooks.

``--set compress.method=dgc|topk|randomk|signsgd|efsign|qsgd|terngrad|powersgd|fp16|bf16`` (see
``docs/compression.md``). Compressors are small classes with their paper in the docstring
(:mod:`~scalelab.compress.compressors`, :mod:`~scalelab.compress.dgc`); the sparse all-reduce with its cost model is
:mod:`~scalelab.compress.sparse`; :mod:`~scalelab.compress.hooks` builds the DDP hooks and counts the bytes.
"""

from __future__ import annotations

from scalelab.compress.compressors import (QSGD, ErrorFeedback, MajoritySign, RandomK, ScaledSign, TernGrad, TopK,
                                           pack_bits, selected_dense, unpack_bits)
from scalelab.compress.dgc import DGC, sampled_threshold_select, warmup_density
from scalelab.compress.hooks import (CompressionHook, CompressStats, compress_hook, gather_state, powersgd_bytes,
                                    restore_state)
from scalelab.compress.sparse import CostModel, choose, sparse_allreduce
from scalelab.errors import ConfigError


def dgc_optimizer(opt, cfg, world_size: int):
    """Under DGC on several workers, the optimizer's momentum runs on the weight decay only; returns ``opt``.

    DGC's momentum correction keeps the gradient's momentum in the compressor (``u``, ``v`` per worker, and the
    averaged local velocity for the densely exchanged tensors), so the gradient that reaches the optimizer already
    carries its momentum. The weight decay stays out of the compression with a momentum buffer of its own, as in
    the reference code (Lin et al. 2018, arXiv 1712.01887; ``synxlin/deep-gradient-compression``): every param
    group gets ``grad_momentum=False`` (:class:`scalelab.recipe.SGD`), and the groups keep the recipe's momentum,
    Nesterov form, weight decay (none on biases and norm parameters) and LR schedule, as the dense run has them.
    Alone (one process) there is no hook, and the momentum is the optimizer's as usual. Set both ways, so that a
    checkpoint's param groups (restored by ``load_state_dict``) follow this run, e.g. after an elastic resize.
    """
    dgc = cfg.compress.method == "dgc" and world_size > 1
    if dgc and not all("grad_momentum" in g for g in opt.param_groups):
        raise ConfigError(f"compress.method=dgc needs recipe.optimizer=sgd (momentum on the weight decay only), "
                         f"got {type(opt).__name__}")
    for g in opt.param_groups:
        if "grad_momentum" in g:
            g["grad_momentum"] = not dgc
    return opt


__all__ = ["CompressionHook", "CompressStats", "compress_hook", "powersgd_bytes", "CostModel", "choose",
           "sparse_allreduce", "DGC", "sampled_threshold_select", "warmup_density", "TopK", "RandomK", "ScaledSign",
           "MajoritySign", "QSGD", "TernGrad", "ErrorFeedback", "pack_bits", "unpack_bits", "selected_dense",
           "dgc_optimizer", "gather_state", "restore_state"]
