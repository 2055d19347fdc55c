"""Fetching dataset files over HTTP(S) with urllib, atomically, with one-line errors that say what to do."""

from __future__ import annotations

import http.client
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from scalelab.data.cache import atomic_writer
from scalelab.data.messages import brief
from scalelab.errors import DataError

TIMEOUT_S = 60.0


def download(url: str, dest: Path, *, what: str = "") -> Path:
    """Download ``url`` to ``dest`` (written atomically, so an interrupted download leaves no partial file).

    Args:
        url: the address to fetch.
        dest: the file to create; its directory is created if needed.
        what: a short description for the progress line and errors (default: the file name).

    Returns:
        ``dest``.

    Raises:
        DataError: the server or network failed; the message says where to put the file by hand.
    """
    dest = Path(dest)
    print(f"downloading {what or dest.name} from {url} -> {dest}", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, atomic_writer(dest) as out:
            got = _copy(resp, out)
            # http.client returns a short body without complaint when the server hangs up early, so compare
            # with the promised length; raising here also makes atomic_writer discard the partial file.
            expected = resp.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and got != int(expected):
                raise DataError(_cannot(url, dest, f"connection closed after {got} of {expected} bytes"))
    except urllib.error.HTTPError as e:
        raise DataError(_cannot(url, dest, f"HTTP {e.code} {' '.join(str(e.reason).split())}")) from None
    except urllib.error.URLError as e:
        raise DataError(_cannot(url, dest, " ".join(str(e.reason).split()))) from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, cut-off body, bad URL
        raise DataError(_cannot(url, dest, brief(e))) from None
    return dest


def _copy(src: BinaryIO, dst: BinaryIO, chunk: int = 1 << 20) -> int:
    """Copy ``src`` to ``dst`` in chunks and return the number of bytes."""
    total = 0
    while block := src.read(chunk):
        dst.write(block)
        total += len(block)
    return total


def _cannot(url: str, dest: Path, reason: str) -> str:
    return (f"could not download {url} ({reason}); download it by hand and put it at {dest}, "
            f"or point data.root at a directory that has it")
