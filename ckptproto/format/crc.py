"""CRC-32 (zlib's) of a file assembled from pieces checksummed in parallel.

:func:`crc32` releases the GIL, so I/O threads checksum their own byte ranges; the file's CRC
is then the pieces combined in order with :func:`crc32_combine` (zlib's algorithm, which
Python's zlib module does not expose)::

    crc = crc32_combine(crc32(b"ab"), crc32(b"cd"), 2)     # == crc32(b"abcd")
"""

from __future__ import annotations

import re
import threading
import zlib
from collections.abc import Callable
from typing import Any, cast

_POLY = 0xEDB88320
_CHECKSUM = re.compile(r"crc32:[0-9a-f]{8}")  # exactly what format_checksum writes
_lock = threading.Lock()
_byte_pow2_ops: list[list[int]] = []  # [k]: operator appending 2**k zero bytes to a CRC


def _times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, matrix[n]) for n in range(32)]


def _op(k: int) -> list[int]:
    with _lock:
        if not _byte_pow2_ops:
            one_bit = [_POLY] + [1 << n for n in range(31)]
            _byte_pow2_ops.append(_square(_square(_square(one_bit))))  # 8 bits = 1 byte
        while len(_byte_pow2_ops) <= k:
            _byte_pow2_ops.append(_square(_byte_pow2_ops[-1]))
        return _byte_pow2_ops[k]


def _isal_crc32() -> Callable[..., int] | None:
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return cast(Callable[..., int], isal_zlib.crc32)


def _agreeing(fast: Callable[..., int] | None) -> Callable[..., int]:
    """``fast`` if it computes zlib's CRC-32 on a known answer, else ``zlib.crc32``."""
    sample = bytes(range(256)) * 33
    if fast is None or any(fast(sample, v) != zlib.crc32(sample, v) for v in (0, 0x12345678)):
        return zlib.crc32
    return fast


# zlib's own crc32 (1.2.x: ~1.5 GB/s a core) is most of the cost of a verified load; ISA-L's
# (the optional extra ckptproto[fastcrc]: carry-less multiply, ~15 GB/s a core) computes the
# same CRC-32, and is used only where it agrees with zlib.
_crc32 = _agreeing(_isal_crc32())
IMPLEMENTATION = "zlib" if _crc32 is zlib.crc32 else "isal"  # what :func:`crc32` runs, for reports


def crc32(data: Any, value: int = 0) -> int:
    """zlib's CRC-32 of a buffer, continuing from ``value``; hardware-accelerated when the
    ``fastcrc`` extra (ISA-L) is installed, ``zlib.crc32`` otherwise::

    crc32(b"123456789") == 0xCBF43926
    """
    return _crc32(data, value)


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``.

    >>> import zlib
    >>> crc32_combine(zlib.crc32(b"ab"), zlib.crc32(b"cd"), 2) == zlib.crc32(b"abcd")
    True
    """
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_op(k), crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def format_checksum(crc: int) -> str:
    """The manifest's text for a CRC: ``"crc32:0a1b2c3d"``."""
    return f"crc32:{crc:08x}"


def parse_checksum(text: object) -> int | None:
    """The CRC in a manifest checksum string, or None if it is not a crc32 checksum."""
    if not isinstance(text, str) or _CHECKSUM.fullmatch(text) is None:
        return None
    return int(text[6:], 16)
