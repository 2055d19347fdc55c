"""Unpickling files from outside (e.g. the CIFAR-10 batches) without letting them run code.

A pickle can name any importable callable and have it called while loading (``os.system`` is the classic
example), so files downloaded from the internet are read with an unpickler that resolves only an explicit
allow-list: the numpy functions that rebuild arrays and dtypes, and plain builtin container and scalar types.
Anything else stops the load before it is imported, let alone called.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from scalelab.data.messages import brief
from scalelab.errors import DataError

_BUILTIN_TYPES = ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
                  "complex", "bool")


def _numpy_attr(submodule: str, name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; pickles name either, depending on who wrote them.
    import importlib

    for mod in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes at protocol 2
    }
    numpy_funcs = (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    for submodule, name in numpy_funcs:
        obj = _numpy_attr(submodule, name)
        if obj is not None:
            for prefix in ("numpy._core", "numpy.core"):
                table[(f"{prefix}.{submodule}", name)] = obj
    for name in _BUILTIN_TYPES:
        table[("builtins", name)] = table[("__builtin__", name)] = getattr(builtins, name)  # Python 2 name
    return table


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    _table: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._table is None:
            _RestrictedUnpickler._table = _allowed()
        try:
            return _RestrictedUnpickler._table[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only numpy arrays and builtin data types.

    Python 2 pickles (as CIFAR-10 ships) are read with ``encoding="bytes"``, so their ``str`` keys arrive as
    ``bytes`` (``b"data"``).

    Raises:
        DataError: naming the file, if it is unreadable, corrupt or truncated, or names a disallowed global.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({brief(e)})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(f"{path}: refusing to unpickle, it references {e} which is not allowed in a data "
                        f"file") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can fail in many ways; all mean "bad file"
        raise DataError(f"{path}: corrupt or truncated pickle ({brief(e)})") from None
