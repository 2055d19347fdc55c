"""The hardware catalog: accelerators, their families' efficiency constants, links inside a node and networks.

The data lives in ``catalog.toml`` next to this module, one entry per device or network, each with its source
(vendor datasheets, Norrie et al. 2021 for TPU v2/v3, Jouppi et al. 2023 for TPU v4, the InfiniBand Trade
Association and IEEE 802.3 for networks). Users extend or override it with their own TOML file of the same
shape.

Example:
    >>> cat = load_catalog()
    >>> acc = cat.accelerator("h100")
    >>> acc.peak_for(cat.family(acc.family).dtype) / 1e12
    989.4
    >>> cat.network_spec("8xib-ndr").bandwidth / 1e9
    400.0
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path

from scalelab.errors import ConfigError, unknown_name

CATALOG_FILE = Path(__file__).with_name("catalog.toml")


@dataclass(frozen=True)
class Family:
    """Efficiency constants shared by every accelerator of one generation (the model's only tuned numbers)."""

    name: str
    dtype: str
    compute_eff: float
    memory_eff: float
    fused: bool = False
    step_overhead_s: float = 0.0
    kernel_s: float = 0.0            # fixed time of one kernel (launch gap, ramp-up, tail), any size
    net_hop_latency_s: float = 0.0   # the collective library's latency per ring step across the network
    collective_base_s: float = 0.0   # the collective library's fixed latency per collective call
    fused_kernels: bool | None = None  # one kernel per conv/matmul (XLA) even if bytes un-fused; None: fused
    tree_allreduce: bool = False     # the library also has double binary trees across nodes (NCCL >= 2.4)
    source: str = ""
    latency_source: str = ""


@dataclass(frozen=True)
class Accelerator:
    """One device: dense peak FLOP/s per dtype, memory and memory bandwidth, and its node's defaults."""

    name: str
    family: str
    peak: dict[str, float]
    memory: float
    memory_bw: float
    node_link: str
    default_per_node: int
    default_network: str
    description: str = ""
    torus: int = 0
    onchip_memory: float = 0.0   # bytes of on-chip memory the compiler keeps whole tensors in between kernels
    source: str = ""

    def peak_for(self, dtype: str) -> float:
        """Dense peak FLOP/s in ``dtype``; bf16 and fp16 stand in for each other when only one is listed."""
        for d in (dtype, {"bf16": "fp16", "fp16": "bf16"}.get(dtype, dtype)):
            if d in self.peak:
                return self.peak[d]
        known = ", ".join(sorted(self.peak))
        raise ConfigError(f"accelerator {self.name} has no {dtype} peak; known: {known}")


@dataclass(frozen=True)
class Link:
    """A link or network: bandwidth per direction (bytes/s) and latency alpha (s) of one message."""

    name: str
    bandwidth: float
    latency: float
    source: str = ""


@dataclass
class Catalog:
    """All entries by kind; look-ups raise :class:`ConfigError` listing the known names."""

    families: dict[str, Family] = field(default_factory=dict)
    accelerators: dict[str, Accelerator] = field(default_factory=dict)
    links: dict[str, Link] = field(default_factory=dict)
    networks: dict[str, Link] = field(default_factory=dict)

    def family(self, name: str) -> Family:
        return _get(self.families, name, "accelerator family")

    def accelerator(self, name: str) -> Accelerator:
        return _get(self.accelerators, name, "accelerator")

    def link(self, name: str) -> Link:
        return _get(self.links, name, "node link")

    def network(self, name: str) -> Link:
        return _get(self.networks, name, "interconnect")

    def network_spec(self, spec: str) -> Link:
        """``[N x]name`` (e.g. ``8xib-ndr``): N links per node, N times the bandwidth, one link's latency."""
        count, name = parse_network_spec(spec)
        base = self.network(name)
        return Link(spec, base.bandwidth * count, base.latency, base.source)


def parse_network_spec(spec: str) -> tuple[int, str]:
    """Split ``'8xib-ndr'`` into ``(8, 'ib-ndr')`` and ``'eth-50g'`` into ``(1, 'eth-50g')``."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9][a-z0-9.\-]*)", spec.strip().lower())
    if not m or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ConfigError(f"bad interconnect {spec!r}; expected [N x]name, e.g. 8xib-ndr or eth-50g")
    return int(m.group(1) or 1), m.group(2)


def _get(table: dict, name: str, kind: str):
    key = name.strip().lower()
    if key not in table:
        raise ConfigError(unknown_name(kind, name, table))
    return table[key]


def _merge(cat: Catalog, data: dict, origin: str) -> None:
    kinds = {"family": (cat.families, Family), "accelerator": (cat.accelerators, Accelerator),
             "link": (cat.links, Link), "network": (cat.networks, Link)}
    for kind, entries in data.items():
        if kind not in kinds:
            raise ConfigError(f"{origin}: unknown catalog section [{kind}]; known: {', '.join(kinds)}")
        table, cls = kinds[kind]
        for name, values in entries.items():
            try:
                entry = cls(name=name.lower(), **values)
            except TypeError as e:
                raise ConfigError(f"{origin}: bad entry [{kind}.{name}]: {e}") from None
            _check_values(entry, f"{origin}: [{kind}.{name}]")
            table[name.lower()] = entry
    for acc in cat.accelerators.values():
        if acc.family not in cat.families:
            raise ConfigError(f"{origin}: accelerator {acc.name}: " + unknown_name("family", acc.family,
                                                                                   cat.families))


# fields the model divides by or scales with: a zero there is no device
_POSITIVE = {"compute_eff", "memory_eff", "memory", "memory_bw", "bandwidth", "default_per_node"}
_KINDS = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,), "bool | None": (bool, type(None))}


def _check_values(entry, where: str) -> None:
    """Every field of a catalog entry has its declared type, numbers are >= 0 (> 0 where the model divides by
    them), and a peak is a table of positive FLOP/s per dtype: one-line errors instead of failures later."""
    for f in fields(entry):
        v = getattr(entry, f.name)
        if f.name == "peak":
            if not isinstance(v, dict) or not v or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v.values()):
                raise ConfigError(f"{where} peak = {v!r}: expected a table of FLOP/s > 0 per dtype, "
                                  "e.g. { bf16 = 275e12 }")
            continue
        kinds = _KINDS.get(str(f.type))
        if kinds is None:
            continue
        number = kinds[0] is not str and bool not in kinds
        if not isinstance(v, kinds) or (number and isinstance(v, bool)):
            want = ("an integer" if kinds == (int,) else "a number" if number
                    else {str: "a string", bool: "true or false"}[kinds[0]])
            raise ConfigError(f"{where} {f.name} = {v!r}: expected {want}")
        if number and (v < 0 or (f.name in _POSITIVE and v == 0)):
            raise ConfigError(f"{where} {f.name} = {v!r}: must be {'> 0' if f.name in _POSITIVE else '>= 0'}")


@cache
def _builtin() -> dict:
    with open(CATALOG_FILE, "rb") as f:
        return tomllib.load(f)


def load_catalog(extra: str | Path | None = None) -> Catalog:
    """The built-in catalog, with the entries of the user's TOML file ``extra`` added or overriding."""
    cat = Catalog()
    _merge(cat, _builtin(), str(CATALOG_FILE))
    if extra is not None:
        try:
            with open(extra, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"catalog file {extra} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"catalog file {extra}: {e}") from None
        _merge(cat, data, str(extra))
    return cat
