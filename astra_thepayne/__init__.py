"""The Payne: a neural-network spectral emulator for APOGEE spectra, as a database-backed Astra pipeline plugin.

Importing the package never connects to a database; call :func:`connect` for that.

Layout (each layer imports only those before it): :mod:`.core` (the science: pure numpy and scipy), :mod:`.io`
(readers of APOGEE files, intermediate files), :mod:`.db` (models, migrations, queries), :mod:`.pipeline` (the task,
runners, ingest, catalogues, products, report, SLURM), :mod:`.cli` (the ``thepayne`` command), and
:mod:`.training`; :mod:`.errors`, :mod:`.files` and :mod:`.config` are shared by all. The modules' earlier places
(``astra_thepayne.fitting``, ``astra_thepayne.task``, ...) still import, as the same modules (:mod:`._moved`).
"""
from . import _moved

_moved.install()
__version__ = "0.8.0"

__all__ = ["__version__", "connect", "the_payne", "ThePayne", "PayneEmulator", "Spectrum", "read_spectra"]


def connect(url=None, bind=True):
    """Bind the plugin's models to a database and return it (the peewee Database, not yet connected).

    ``url`` (``sqlite:///path.db`` or ``postgresql://user:pass@host:port/dbname[?schema=NAME]``), else
    ``$THEPAYNE_DATABASE_URL``: the standalone tables there. Without either, where the Astra integration is active
    (``import astra`` works, ``THEPAYNE_NO_ASTRA`` unset): Astra's database as Astra's own configuration gives it
    (``$ASTRA_DATABASE_PATH`` or Astra's config file), which holds the table the task fills; otherwise
    ``$ASTRA_DATABASE_PATH`` as SQLite, else ``sqlite:///thepayne.db``, as the command line does.
    :data:`ThePayne` is then the result model of that database. ``bind=False`` returns the database without binding
    the standalone models to it.
    """
    import os

    if url is None and not os.environ.get("THEPAYNE_DATABASE_URL"):
        from .pipeline.astra_binding import connect_default

        return connect_default(bind)
    from .db.database import connect as connect_url

    return connect_url(url, bind=bind)


def __getattr__(name):
    # Lazy re-exports keep `import astra_thepayne` light (no peewee, astropy or scipy until needed).
    if name == "ThePayne":
        # the model of the table `the_payne` fills: Astra's where the task is Astra's
        from .pipeline.astra_binding import result_model

        return result_model()
    if name == "the_payne":
        # the Astra task where the Astra integration is on, else the plain generator
        from .pipeline.astra_binding import the_payne_task

        return the_payne_task()
    if name == "PayneEmulator":
        from .core.emulator import PayneEmulator

        return PayneEmulator
    if name == "Spectrum":
        from .core.spectrum import Spectrum

        return Spectrum
    if name == "read_spectra":
        from .io import read_spectra

        return read_spectra
    raise AttributeError(f"module 'astra_thepayne' has no attribute {name!r}")
