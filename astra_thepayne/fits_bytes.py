"""FITS HDUs put together as bytes: header card images, padding, and the CHECKSUM/DATASUM cards.

For files that are many copies of one layout (the per-star products: four tables of ~410 columns each) astropy's
writer costs about a second a file, nearly all of it building a ``Column`` per column and validating every card
again. Here astropy still makes every card image (:func:`card`, cached), and a header comes from a template that
astropy wrote (see :mod:`astra_thepayne.products`); what is left per file is joining strings, the bytes of a numpy
record array, and the checksums, computed as the FITS checksum convention (FITS standard 4.0, appendix J) defines
them, which is what ``writeto(checksum=True)`` writes.
"""
from __future__ import annotations

import datetime
import functools

import numpy as np

__all__ = ["BLOCK", "card", "checksum_stamp", "hdu_bytes", "ones_complement_sum", "encode_checksum"]

BLOCK = 2880
_END = "END".ljust(80)
# ASCII punctuation between the digits and the letters that an encoded checksum must not contain
_EXCLUDED = frozenset(range(0x3A, 0x41)) | frozenset(range(0x5B, 0x61))


@functools.lru_cache(maxsize=8192, typed=True)  # typed: True and 1 make different cards
def card(keyword: str, value=None, comment: str | None = None) -> str:
    """The image (80 characters, or a multiple for long strings) astropy writes for this card."""
    from astropy.io import fits

    return fits.Card(keyword, value, comment).image


def checksum_stamp() -> str:
    """The time in the comments of CHECKSUM/DATASUM, in astropy's form (local time, ISO 8601, seconds)."""
    return datetime.datetime.now().isoformat()[:19]


def ones_complement_sum(buffer, start: int = 0) -> int:
    """32-bit ones' complement sum of ``buffer`` (a multiple of 4 bytes) read as big-endian words, added to
    ``start``."""
    words = np.frombuffer(buffer, dtype=">u4")
    # partial sums of <= 2**20 words stay below 2**52 in uint64; folding the carries back in is what makes the
    # sum ones' complement
    total = start
    for first in range(0, len(words), 1 << 20):
        total += int(words[first:first + (1 << 20)].sum(dtype=np.uint64))
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def encode_checksum(value: int) -> str:
    """The 16 characters of a CHECKSUM card for the ones' complement sum ``value`` of the HDU with its CHECKSUM
    set to zeros: the complement, each byte spread over four printable characters, then rotated by one."""
    value = ~value & 0xFFFFFFFF
    encoded = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        chars = [byte // 4 + 0x30] * 4
        chars[0] += byte % 4
        # move pairs away from punctuation; a pair's sum, and so the checksum, is unchanged
        changed = True
        while changed:
            changed = False
            for j in (0, 2):
                if chars[j] in _EXCLUDED or chars[j + 1] in _EXCLUDED:
                    chars[j] += 1
                    chars[j + 1] -= 1
                    changed = True
        for j in range(4):
            encoded[4 * j + i] = chars[j]
    return "".join(chr(encoded[(i + 15) % 16]) for i in range(16))


def _padded(text: str) -> bytes:
    return text.encode("ascii") + b" " * (-len(text) % BLOCK)


def hdu_bytes(cards: list, data: bytes = b"", checksum_at: int | None = None, datasum_at: int | None = None,
              stamp: str | None = None) -> bytes:
    """One HDU: the card images (END added, padded with blanks), then ``data`` padded with zeros.

    ``cards[checksum_at]`` and ``cards[datasum_at]`` (placed where astropy places them) are replaced by the
    CHECKSUM and DATASUM cards of this HDU; ``cards`` is not changed.
    """
    data = data + b"\0" * (-len(data) % BLOCK)
    if checksum_at is None:
        return _padded("".join(cards) + _END) + data
    stamp = stamp or checksum_stamp()
    datasum = ones_complement_sum(data)
    cards = list(cards)
    cards[datasum_at] = card("DATASUM", str(datasum), f"data unit checksum updated {stamp}")
    cards[checksum_at] = card("CHECKSUM", "0" * 16, f"HDU checksum updated {stamp}")
    total = ones_complement_sum(_padded("".join(cards) + _END), datasum)
    cards[checksum_at] = card("CHECKSUM", encode_checksum(total), f"HDU checksum updated {stamp}")
    return _padded("".join(cards) + _END) + data
