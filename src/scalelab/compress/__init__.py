"""Communication compression for synchronous data parallelism, as DDP communication hooks.

``--set compress.method=dgc|topk|randomk|signsgd|efsign|qsgd|terngrad|powersgd|fp16|bf16`` (see
``docs/compression.md``). Compressors are small classes with their paper in the docstring
(:mod:`~scalelab.compress.compressors`, :mod:`~scalelab.compress.dgc`); the sparse all-reduce with its cost model is
:mod:`~scalelab.compress.sparse`; :mod:`~scalelab.compress.hooks` builds the DDP hooks and counts the bytes.
"""

from __future__ import annotations

import dataclasses

from scalelab.compress.compressors import (QSGD, ErrorFeedback, MajoritySign, RandomK, ScaledSign, TernGrad, TopK,
                                           pack_bits, selected_dense, unpack_bits)
from scalelab.compress.dgc import DGC, sampled_threshold_select, warmup_density
from scalelab.compress.hooks import (CompressionHook, CompressStats, compress_hook, gather_state, powersgd_bytes,
                                    restore_state)
from scalelab.compress.sparse import CostModel, choose, sparse_allreduce


def optimizer_recipe(cfg, world_size: int):
    """The recipe the optimizer is built from: with DGC on several workers, without momentum.

    DGC's momentum correction keeps the momentum in the compressor (``u``, ``v`` per worker); a second momentum
    in the optimizer would apply it twice. So under ``compress.method=dgc`` (and more than one worker) the optimizer
    runs with ``momentum=0`` (weight decay is still applied by the optimizer, outside the compression, as in the
    reference code, but without a momentum buffer of its own). Alone (one process) there is no hook, and the
    optimizer keeps its momentum.
    """
    if cfg.compress.method != "dgc" or world_size <= 1:
        return cfg.recipe
    return dataclasses.replace(cfg.recipe, momentum=0.0, nesterov=False)


__all__ = ["CompressionHook", "CompressStats", "compress_hook", "powersgd_bytes", "CostModel", "choose",
           "sparse_allreduce", "DGC", "sampled_threshold_select", "warmup_density", "TopK", "RandomK", "ScaledSign",
           "MajoritySign", "QSGD", "TernGrad", "ErrorFeedback", "pack_bits", "unpack_bits", "selected_dense",
           "optimizer_recipe", "gather_state", "restore_state"]
