"""The content key of an adapter: did it change since it was analysed?

``--resume`` skips an adapter whose key equals the key stored with its row. The key is computed
without reading any tensor: for each file of the adapter (the file itself, or the regular files
directly inside an adapter directory), its name, size, modification time (ns) and the SHA-256 of its
header, all hashed together with SHA-256:

* header of a safetensors file (8-byte length, then ``{``): the length and the JSON header, whole
  (at most :data:`~nora_spectra.io.safetensors_file.MAX_HEADER_BYTES`);
* header of any other file (``adapter_config.json``, a torch pickle): its first :data:`HEAD_BYTES`.

A file that cannot be read still gets a key (from its size and time, with the error in place of the
header hash), so a scan can store its error row and skip it on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat

from nora_spectra.io.safetensors_file import MAX_HEADER_BYTES

__all__ = ["HEAD_BYTES", "ContentKey", "content_key"]

#: bytes hashed at the start of a file that is not a safetensors file.
HEAD_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ContentKey:
    """What identifies an adapter's content.

    Attributes:
        size: total bytes of its files (None when it could not be examined).
        mtime: latest modification time of its files, nanoseconds since the epoch (None likewise).
        digest: SHA-256 (hex) of every file's name, size, mtime and header hash.
    """

    size: int | None
    mtime: int | None
    digest: str


def _header_hash(path: str, size: int) -> str:
    """SHA-256 of the file's header (see the module docstring), or ``"error:<reason>"``."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(9)
            length = int.from_bytes(prefix[:8], "little") if len(prefix) == 9 else -1
            if prefix[8:9] == b"{" and 8 + length <= size and length <= MAX_HEADER_BYTES:
                digest.update(prefix)
                remaining = length - 1
                while remaining > 0:
                    chunk = handle.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    remaining -= len(chunk)
            else:
                digest.update(prefix)
                digest.update(handle.read(HEAD_BYTES - len(prefix)))
    except OSError as exc:
        return f"error:{exc.strerror or exc}"
    return digest.hexdigest()


def content_key(path: str, *, is_dir: bool) -> ContentKey:
    """The :class:`ContentKey` of an adapter file, or of an adapter directory's direct files.

    Never raises: what cannot be examined is part of the key (as an error text), not an exception.
    """
    if is_dir:
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            names, listing_error = [], f"error:{exc.strerror or exc}"
        else:
            listing_error = ""
        files = [(name, os.path.join(path, name)) for name in names]
    else:
        files, listing_error = [(os.path.basename(path), path)], ""
    whole = hashlib.sha256(listing_error.encode())
    total, latest, seen = 0, 0, False
    for name, file in files:
        try:
            info = os.stat(file)
        except OSError as exc:
            whole.update(f"{name}\0error:{exc.strerror or exc}\n".encode())
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        seen = True
        total += info.st_size
        latest = max(latest, info.st_mtime_ns)
        header = _header_hash(file, info.st_size)
        whole.update(f"{name}\0{info.st_size}\0{info.st_mtime_ns}\0{header}\n".encode())
    return ContentKey(size=total if seen else None, mtime=latest if seen else None, digest=whole.hexdigest())
