"""FITS HDUs put together as bytes (header card images, padding, the CHECKSUM/DATASUM cards), and read back as far as
checking a file whole.

For files that are many copies of one layout (the per-star products: four tables of ~410 columns each) astropy's writer
costs about a second a file, nearly all of it building a ``Column`` per column and validating every card again. Here
astropy still makes every card image (:func:`card`, cached), and a header comes from a template that astropy wrote (see
:mod:`astra_thepayne.pipeline.products`); what is left per file is joining strings, the bytes of a numpy record array,
and the checksums, computed as the FITS checksum convention (FITS standard 4.0, appendix J) defines them, which is what
``writeto(checksum=True)`` writes. :func:`header_keywords` reads a few keywords of every HDU without parsing the rest of
the cards (astropy's ``fits.open`` of a product parses ~3400 cards).
"""
from __future__ import annotations

import datetime
import functools
import warnings

import numpy as np

__all__ = ["BLOCK", "card", "checksum_stamp", "hdu_bytes", "header_keywords", "ones_complement_sum",
           "encode_checksum"]

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
    if checksum_at is None or datasum_at is None:
        if checksum_at is not None or datasum_at is not None:
            raise ValueError("give both checksum_at and datasum_at, or neither")
        return _padded("".join(cards) + _END) + data
    stamp = stamp or checksum_stamp()
    datasum = ones_complement_sum(data)
    cards = list(cards)
    cards[datasum_at] = card("DATASUM", str(datasum), f"data unit checksum updated {stamp}")
    cards[checksum_at] = card("CHECKSUM", "0" * 16, f"HDU checksum updated {stamp}")
    total = ones_complement_sum(_padded("".join(cards) + _END), datasum)
    cards[checksum_at] = card("CHECKSUM", encode_checksum(total), f"HDU checksum updated {stamp}")
    return _padded("".join(cards) + _END) + data


_SIZE_KEYWORDS = ("BITPIX", "NAXIS", "PCOUNT", "GCOUNT")


def header_keywords(content: bytes, keywords=()) -> list:
    """``[{keyword: value}]``, one dict per HDU of the FITS file ``content``, with the ``keywords`` it has.

    Raises ValueError unless ``content`` is a whole FITS file: a primary HDU, then HDUs whose headers end with END
    and whose data (padded to 2880 bytes) the header's BITPIX/NAXISn/PCOUNT/GCOUNT account for, up to the last
    byte. A file cut short anywhere, or with bytes after its last HDU, is not whole.
    """
    from astropy.io import fits

    if not content:
        raise ValueError("an empty file")
    hdus: list[dict] = []
    offset = 0
    while offset < len(content):
        first = content[offset:offset + 8]
        if first != (b"SIMPLE  " if offset == 0 else b"XTENSION"):
            raise ValueError(f"no {'SIMPLE' if offset == 0 else 'XTENSION'} card at byte {offset}")
        found, position = {}, offset
        while True:
            if position + 80 > len(content):
                raise ValueError("a header without END")
            name = content[position:position + 8]
            if name == b"END     ":
                break
            keyword = name.decode("ascii", "replace").rstrip()
            if keyword in keywords or keyword in _SIZE_KEYWORDS or keyword.startswith("NAXIS"):
                image = content[position:position + 80].decode("ascii", "replace")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a damaged card warns before it fails
                    try:
                        found[keyword] = fits.Card.fromstring(image).value
                    except Exception as exc:  # astropy's VerifyError is no ValueError
                        raise ValueError(f"unreadable card at byte {position}: {exc}") from None
            position += 80
        header_end = position + 80 + (-(position + 80 - offset) % BLOCK)
        try:
            size = 1
            for axis in range(1, int(found["NAXIS"]) + 1):
                size *= int(found[f"NAXIS{axis}"])
            size = abs(int(found["BITPIX"])) // 8 * int(found.get("GCOUNT", 1)) * (
                int(found.get("PCOUNT", 0)) + (size if int(found["NAXIS"]) else 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"HDU {len(hdus)}: no valid data size ({exc})") from None
        offset = header_end + size + (-size % BLOCK)
        if offset > len(content):
            raise ValueError(f"HDU {len(hdus)} is cut short")
        hdus.append({key: value for key, value in found.items() if key in keywords})
    return hdus
