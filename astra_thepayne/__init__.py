"""The Payne: a neural-network spectral emulator for APOGEE spectra, as a database-backed Astra pipeline plugin.

Importing the package never connects to a database; call :func:`connect` for that.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "connect", "the_payne", "ThePayne", "PayneEmulator", "Spectrum", "read_spectra"]


def __getattr__(name):
    # Lazy re-exports keep `import astra_thepayne` light (no peewee, astropy or scipy until needed).
    if name == "connect":
        from .db.database import connect

        return connect
    if name == "ThePayne":
        from .db.models import ThePayne

        return ThePayne
    if name == "the_payne":
        from .task import the_payne

        return the_payne
    if name == "PayneEmulator":
        from .emulator import PayneEmulator

        return PayneEmulator
    if name == "Spectrum":
        from .spectrum import Spectrum

        return Spectrum
    if name == "read_spectra":
        from .io import read_spectra

        return read_spectra
    raise AttributeError(f"module 'astra_thepayne' has no attribute {name!r}")
