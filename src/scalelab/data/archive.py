"""Extracting a downloaded tar archive without letting its member names write outside the target directory."""

from __future__ import annotations

import gzip
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from scalelab.data.cache import atomic_writer
from scalelab.data.messages import brief
from scalelab.errors import DataError


def _safe_relpath(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    # Absolute names, '..' components, and Windows drive or backslash tricks could all escape the target.
    if p.is_absolute() or ".." in p.parts or "\\" in name or (p.parts and ":" in p.parts[0]):
        raise DataError(f"{archive}: refusing to extract unsafe member {name!r} (absolute path or '..')")
    return p


def extract_tar(archive: Path, dest: Path) -> list[Path]:
    """Extract the regular files and directories of ``archive`` under ``dest``.

    Each file is written atomically, so an interrupted extraction leaves complete files or none. Links,
    devices and FIFOs are refused, since a symlink member could redirect a later member's write.

    Returns:
        The extracted file paths.

    Raises:
        DataError: the archive is corrupt or truncated, or a member is unsafe.
    """
    dest = Path(dest)
    written: list[Path] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                rel = _safe_relpath(archive, member.name)
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None  # regular files always have data
                    with src, atomic_writer(target) as out:
                        shutil.copyfileobj(src, out, length=1 << 20)
                    written.append(target)
                else:
                    raise DataError(f"{archive}: refusing to extract {member.name!r}, which is not a regular "
                                    f"file or directory")
    except DataError:
        raise
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: corrupt or truncated archive ({brief(e)}); delete it and "
                        f"download it again") from None
    except OSError as e:  # e.g. a full disk or no permission: the archive may be fine
        raise DataError(f"{archive}: cannot extract into {dest} ({brief(e)})") from None
    return written
