"""Workload description counted from the real PyTorch model: FLOPs, bytes moved and parameters per sample.

The model is built on the ``meta`` device (shapes only, no memory, no arithmetic) and one forward and backward
pass runs under :class:`torch.utils.flop_counter.FlopCounterMode` and a byte-counting dispatch mode.

Conventions (be careful when comparing with papers):

* FLOPs: FlopCounterMode counts a multiply-add as **2** FLOPs. ResNet-50 at 224x224 is "4.1 GFLOPs" in He et
  al. 2016 (Table 1), which counts multiply-adds; here its forward is ~8.2e9 FLOPs and forward + backward
  ~24.3e9 (backward ~2x forward: gradients of inputs and of weights; the stem has no input gradient).
  Only matmuls and convolutions are counted; elementwise work is left to the memory term.
* Bytes (counted at batches 2 and 4 and split into a per-sample part and a per-step part, the weights and
  their gradients): ``bytes_unfused`` sums the inputs and outputs of every aten op (views excluded) of
  forward + backward,
  i.e. the HBM traffic of an op-by-op (eager) execution. ``bytes_fused`` counts only convolution/matmul inputs
  and outputs: the traffic when the compiler fuses every elementwise and norm op into them (XLA on TPU).
  Both are reported for the training dtype (counted in fp32 and scaled by the dtype's size).
* Parameters: the gradient all-reduce moves ``params`` values per step, in the communication dtype.
* On-chip memory (:meth:`Workload.memory_bytes` with ``onchip > 0``): an accelerator whose compiler keeps whole
  tensors on chip between kernels (TPU v4's 128 MiB CMEM, Jouppi et al. 2023) does not read from HBM a tensor
  that is still there. The pass records, per kernel, which tensors it reads and writes (the convolutions and
  matmuls alone for the fused count, an elementwise or norm op's output standing for the tensor it was computed
  from, since the compiler fuses it into its neighbour); the HBM bytes are then replayed at the device's batch
  through a least-recently-used memory of that size: a read of a resident tensor is free, every write still
  goes to HBM (the tensor may be needed later; a conservative rule), and a tensor larger than the memory
  bypasses it. With ``onchip = 0`` this is exactly the count above.
* Kernels: the number of device kernels one step launches, forward + backward, independent of the batch.
  ``kernels_unfused`` counts every aten op that does work (views, aliases and bare allocations such as
  ``empty`` excluded): one kernel each in op-by-op execution. ``kernels_fused`` counts only the convolutions
  and matmuls (forward and backward): one fused kernel each when the compiler folds the elementwise and norm
  ops into them. ResNet-50: 405 and 109 per step.

Presets (samples are images or sequences):

* ``resnet50`` on ``imagenet``: scalelab's ResNet-50 v1.5 at 3x224x224, 1000 classes, 1,281,167 training
  images (Russakovsky et al. 2015).
* ``bert-large``: 24 layers, d=1024, 16 heads, FFN 4096, vocabulary 30,522, sequence 512 (Devlin et al. 2019),
  built from ``torch.nn.TransformerEncoderLayer``.
* ``gpt2``: GPT-2 small, 12 layers, d=768, 12 heads, sequence 1024, vocabulary 50,257 (Radford et al. 2019).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, fields
from functools import cache

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from scalelab.errors import ConfigError, unknown_name

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}

# name -> (per-sample input shape or ("tokens", seq_len, vocab), classes, training samples)
DATASETS: dict[str, tuple[tuple, int, int]] = {
    "imagenet": ((3, 224, 224), 1000, 1_281_167),
    "cifar10": ((3, 32, 32), 10, 50_000),
    "mnist1d": ((1, 40), 10, 45_000),
    "digits": ((1, 8, 8), 10, 1_437),
    "wikibooks-512": (("tokens", 512, 30522), 0, 3_300_000_000 // 512),
    "webtext-1024": (("tokens", 1024, 50257), 0, 9_000_000_000 // 1024),
}
TRANSFORMERS = {  # name -> (layers, d_model, heads, d_ff, dataset)
    "bert-large": (24, 1024, 16, 4096, "wikibooks-512"),
    "gpt2": (12, 768, 12, 3072, "webtext-1024"),
}
DEFAULT_DATASET = {"bert-large": "wikibooks-512", "gpt2": "webtext-1024", "resnet50": "imagenet",
                   "resnet18": "imagenet"}
_VIEWS = {"view", "_unsafe_view", "t", "detach", "expand", "as_strided", "transpose", "permute", "unsqueeze",
          "squeeze", "slice", "select", "alias", "split", "split_with_sizes", "unbind", "reshape",
          "_reshape_alias"}
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}   # allocation only
_HEAVY = {"convolution", "convolution_backward", "mm", "addmm", "bmm", "baddbmm",
          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"}


@dataclass(frozen=True)
class Workload:
    """Per-sample cost of one training step of a model on a dataset (all counts per sample, fp32 bytes)."""

    name: str
    dataset: str
    flops_fwd: float
    flops: float              # forward + backward
    bytes_unfused: float      # fp32 bytes read+written by every op, forward + backward, per sample
    bytes_fused: float        # fp32 bytes read+written by convolutions/matmuls only, per sample
    bytes_unfused_step: float # the batch-independent part per device and step (weights read, weight grads)
    bytes_fused_step: float
    boundary_bytes: float     # fp32 bytes of the heavy forward ops' outputs (activations between layers)
    layers: int               # number of heavy forward ops (model-parallel messages per pass)
    kernels_unfused: int      # kernels per step, forward + backward, op by op (independent of the batch)
    kernels_fused: int        # kernels per step when elementwise/norm ops are fused into convs/matmuls
    params: int
    dataset_size: int
    # per kernel, its tensor accesses (tensor id, fp32 bytes per sample, fp32 bytes per step, written?): the
    # convolutions/matmuls only (fused) and every op (un-fused); see the module docstring, "On-chip memory"
    trace_fused: tuple = field(default=(), repr=False, compare=False)
    trace_unfused: tuple = field(default=(), repr=False, compare=False)

    def param_bytes(self, dtype: str = "fp32") -> float:
        return self.params * DTYPE_BYTES[dtype]

    def memory_bytes(self, dtype: str, fused: bool, batch: float = 1.0, onchip: float = 0.0) -> float:
        """HBM bytes of one device's step on ``batch`` samples in ``dtype``, eager or fully fused, with
        ``onchip`` bytes of on-chip memory that keeps tensors between kernels (0: none)."""
        scale = DTYPE_BYTES[dtype] / 4
        if onchip > 0:
            trace = self.trace_fused if fused else self.trace_unfused
            if not trace:
                raise ConfigError(f"workload {self.name} has no kernel trace, which on-chip memory needs; build "
                                  "it with scalelab.perf.workload(...)")
            return hbm_bytes(trace, batch, onchip, scale)
        per_sample, per_step = ((self.bytes_fused, self.bytes_fused_step) if fused
                                else (self.bytes_unfused, self.bytes_unfused_step))
        return (per_sample * batch + per_step) * scale

    def kernels(self, fused: bool) -> int:
        """Kernels one forward + backward launches, fused (XLA-style) or op by op."""
        return self.kernels_fused if fused else self.kernels_unfused

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("trace")}


def hbm_bytes(trace: tuple, batch: float, onchip: float, scale: float = 1.0) -> float:
    """HBM bytes of replaying ``trace`` (see :class:`Workload`) at ``batch`` through ``onchip`` bytes of
    least-recently-used on-chip memory: reads of resident tensors are free; writes, and tensors larger than the
    memory, always go to HBM. Sizes are fp32 bytes times ``scale``."""
    resident: OrderedDict[int, float] = OrderedDict()
    used = total = 0.0
    for kernel in trace:
        for key, per_sample, per_step, written in kernel:
            size = (per_sample * batch + per_step) * scale
            if key in resident:
                resident.move_to_end(key)
                if written:
                    total += size
                continue
            total += size
            if size <= onchip:
                resident[key] = size
                used += size
                while used > onchip:
                    used -= resident.popitem(last=False)[1]
    return total


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _ByteCounter(TorchDispatchMode):
    """Sums the bytes of the tensors every aten op reads and writes (views and aliases excluded), and records
    each kernel's tensor accesses (see :class:`Workload`, ``trace_*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.heavy = self.boundary = 0.0
        self.layers = self.kernels = self.heavy_kernels = 0
        self.forward = True
        self.trace_unfused: list[tuple[str, list]] = []
        self.trace_fused: list[tuple[str, list]] = []
        self._storages: list = []           # kept alive so that storage ids are never reused in the pass
        self._same: dict[int, int] = {}     # fused: an elementwise/norm op's output -> the tensor it stands for

    def _id(self, t: torch.Tensor, fused: bool) -> int:
        storage = t.untyped_storage()
        self._storages.append(storage)
        key = storage._cdata
        while fused and key in self._same:
            key = self._same[key]
        return key

    def _record(self, trace: list, name: str, ins: list, outs: list, fused: bool) -> None:
        trace.append((name, [(self._id(t, fused), t.numel() * 4, False) for t in ins]
                      + [(self._id(t, fused), t.numel() * 4, True) for t in outs]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if name in _VIEWS:
            return out
        if name not in _NO_KERNEL:
            self.kernels += 1
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        self.total += nbytes
        if name not in _NO_KERNEL:
            self._record(self.trace_unfused, name, ins, outs, fused=False)
        if name in _HEAVY:
            self._record(self.trace_fused, name, ins, outs, fused=True)
            self.heavy += nbytes
            self.heavy_kernels += 1
            if self.forward:
                self.layers += 1
                self.boundary += sum(t.numel() * t.element_size() for t in tree_leaves(out)
                                     if isinstance(t, torch.Tensor))
        else:   # fused into its neighbours: an output of an input's size is that input, as the compiler sees it
            for o in outs:
                same = next((t for t in ins if t.numel() == o.numel()), None)
                if same is not None:
                    key, target = self._id(o, fused=False), self._id(same, fused=True)
                    if key != target:
                        self._same[key] = target
        return out


def _per_sample_trace(t2: list, t4: list) -> tuple:
    """Two traces of the same pass at batches 2 and 4 -> per kernel, (id, per-sample, per-step, written),
    with the ids renumbered from 0 in order of first use."""
    if [n for n, _ in t2] != [n for n, _ in t4] or any(len(a) != len(b) for (_, a), (_, b) in zip(t2, t4)):
        raise RuntimeError("the kernels of the passes at batches 2 and 4 differ; cannot split per sample")
    ids: dict[int, int] = {}
    return tuple(tuple((ids.setdefault(k, len(ids)), (b4 - b2) / 2, 2 * b2 - b4, w)
                       for (_, b2, _), (k, b4, w) in zip(a, b)) for (_, a), (_, b) in zip(t2, t4))


class _TokenModel(nn.Module):
    """Embedding, a pre-norm transformer encoder stack and an output projection (BERT/GPT-2 shapes)."""

    def __init__(self, layers: int, d: int, heads: int, d_ff: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, d_ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


def count_module(model: nn.Module, sample: torch.Tensor) -> dict:
    """FLOPs and bytes of one forward+backward of ``model`` on the batch ``sample``, per sample.

    Runs wherever ``model`` and ``sample`` live; use the ``meta`` device to count without computing.
    """
    n = sample.shape[0]
    bytes_mode = _ByteCounter()
    with FlopCounterMode(display=False) as flops, bytes_mode:
        out = model(sample)
        fwd = flops.get_total_flops()
        bytes_mode.forward = False
        out.float().sum().backward()
    return {"flops_fwd": fwd / n, "flops": flops.get_total_flops() / n, "bytes_unfused": bytes_mode.total / n,
            "bytes_fused": bytes_mode.heavy / n, "boundary_bytes": bytes_mode.boundary / n,
            "layers": bytes_mode.layers, "kernels_unfused": bytes_mode.kernels,
            "kernels_fused": bytes_mode.heavy_kernels, "params": sum(p.numel() for p in model.parameters()),
            "trace_fused": bytes_mode.trace_fused, "trace_unfused": bytes_mode.trace_unfused}


def _build(model: str, dataset: str) -> tuple[nn.Module, torch.Tensor]:
    shape, classes, _ = DATASETS[dataset]
    with torch.device("meta"):
        if model in TRANSFORMERS:
            layers, d, heads, d_ff, _ = TRANSFORMERS[model]
            if shape[0] != "tokens":
                raise ConfigError(f"model {model} needs a token dataset; {dataset} has images")
            net = _TokenModel(layers, d, heads, d_ff, shape[2])
            return net, torch.zeros(2, shape[1], dtype=torch.long)
        from scalelab.config import ModelConfig
        from scalelab.models import build_model
        if shape[0] == "tokens":
            raise ConfigError(f"model {model} needs image/signal inputs; {dataset} is a token dataset")
        net = build_model(ModelConfig(name=model), shape, classes)
        return net, torch.zeros(2, *shape)


@cache
def workload(model: str = "resnet50", dataset: str | None = None) -> Workload:
    """The per-sample workload of any scalelab model, or of the ``bert-large``/``gpt2`` presets (cached).

    Raises:
        ConfigError: for an unknown model or dataset name, listing the known ones.
    """
    from scalelab.models import MODELS

    dataset = dataset or DEFAULT_DATASET.get(model)
    if model not in MODELS and model not in TRANSFORMERS:
        raise ConfigError(unknown_name("model", model, [*MODELS, *TRANSFORMERS]))
    if dataset is None:
        raise ConfigError(f"model {model}: give --dataset; known: {', '.join(sorted(DATASETS))}")
    if dataset not in DATASETS:
        raise ConfigError(unknown_name("dataset", dataset, DATASETS))
    # Counted at batches 2 and 4: bytes(n) = per_step + n * per_sample separates the weight traffic.
    net, sample = _build(model, dataset)
    net.train()
    c2 = count_module(net, sample)
    net.zero_grad(set_to_none=True)
    c = count_module(net, torch.cat([sample, sample]))
    per = {k: 2 * c[k] - c2[k] for k in ("bytes_unfused", "bytes_fused")}   # (B4 - B2) / 2, per sample
    step = {k: 2 * (c2[k] - per[k]) for k in per}                            # B2 - 2 * per_sample
    return Workload(name=model, dataset=dataset, flops_fwd=c["flops_fwd"], flops=c["flops"],
                    bytes_unfused=per["bytes_unfused"], bytes_fused=per["bytes_fused"],
                    bytes_unfused_step=step["bytes_unfused"], bytes_fused_step=step["bytes_fused"],
                    boundary_bytes=c["boundary_bytes"], layers=int(c["layers"]),
                    kernels_unfused=int(c["kernels_unfused"]), kernels_fused=int(c["kernels_fused"]),
                    params=int(c["params"]), dataset_size=DATASETS[dataset][2],
                    trace_fused=_per_sample_trace(c2["trace_fused"], c["trace_fused"]),
                    trace_unfused=_per_sample_trace(c2["trace_unfused"], c["trace_unfused"]))
