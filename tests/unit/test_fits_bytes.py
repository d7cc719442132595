"""astra_thepayne.io.fits_bytes: HDUs as bytes with the checksums astropy checks, and the whole-file test the products'
resume logic relies on."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from astropy.io import fits

from astra_thepayne.io.fits_bytes import BLOCK, card, encode_checksum, hdu_bytes, header_keywords, ones_complement_sum


def _astropy_file(rows=3):
    table = fits.BinTableHDU.from_columns([fits.Column("x", "D", array=np.arange(rows, dtype=float)),
                                           fits.Column("s", "5A", array=np.array(["ab", "cdefg", ""][:rows]))],
                                          name="LAST")
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((3, 7), dtype=np.int16), name="IMG"),
                  table]).writeto(buffer, checksum=True)
    return buffer.getvalue()


def test_checksums_are_the_ones_astropy_verifies():
    rng = np.random.default_rng(3)
    for size in (0, 8, BLOCK, 3 * BLOCK + 16):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        cards = [card("XTENSION", "IMAGE", "Image extension"), card("BITPIX", 8), card("NAXIS", 1),
                 card("NAXIS1", size), card("PCOUNT", 0), card("GCOUNT", 1), "", ""]
        content = (hdu_bytes([card("SIMPLE", True), card("BITPIX", 8), card("NAXIS", 0), card("EXTEND", True), "",
                              ""], b"", 4, 5) + hdu_bytes(cards, data, 6, 7))
        assert len(content) % BLOCK == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a wrong CHECKSUM or DATASUM warns
            with fits.open(io.BytesIO(content), checksum=True) as hdul:
                assert hdul[1].data.tobytes() == data
                assert int(hdul[1].header["DATASUM"]) == ones_complement_sum(data + b"\0" * (-size % BLOCK))
    # the encoding is alphanumeric, and in place of the sixteen zeros it adds the complement of the sum (the
    # characters sit one byte off word boundaries on the card, which the rotation by one undoes)
    zeros = ones_complement_sum(b"0" * 16)
    for value in (0, 1, 0xFFFFFFFE, 0x3A3A3A3A, 0x5B5B5B5B, *rng.integers(1, 2 ** 32 - 1, 200).tolist()):
        text = encode_checksum(int(value))
        assert len(text) == 16 and text.isalnum() and text.isascii()
        assert ones_complement_sum((text[1:] + text[0]).encode(), int(value)) == zeros


def test_header_keywords_needs_the_whole_file():
    content = _astropy_file()
    hdus = header_keywords(content, ("EXTNAME", "NAXIS2"))
    assert [h.get("EXTNAME") for h in hdus] == [None, "IMG", "LAST"] and hdus[2]["NAXIS2"] == 3
    for end in (*range(0, len(content), 199), len(content) - 1):  # cut anywhere, even in the last HDU's data
        with pytest.raises(ValueError):
            header_keywords(content[:end], ("EXTNAME",))
    for bad in (content + b"\0" * BLOCK, b"NOT FITS" * 400, content[BLOCK:]):
        with pytest.raises(ValueError):
            header_keywords(bad)
