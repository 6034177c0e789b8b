"""CRC-32 (zlib's) of a file assembled from pieces checksummed in parallel.

``zlib.crc32`` releases the GIL, so writer threads checksum their own byte ranges; the file's
CRC is then the pieces combined in order with :func:`crc32_combine` (zlib's algorithm, which
Python's zlib module does not expose).
"""

from __future__ import annotations

import re
import threading

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
