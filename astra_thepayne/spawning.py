"""Worker processes are started with ``spawn``: refuse, in one line, a calling script that they would run again.

A spawned worker imports the parent's ``__main__`` module before it takes any work. A script that calls
``fit_many(processes=N)`` (or ``the_payne``/``products`` with several processes) at its top level, without
``if __name__ == "__main__":``, is then run again in every worker; each tries to start workers of its own and dies,
and the pool starts replacements for ever: the call never returns. Python's own message about it comes from the
workers, scrolls past and stops nothing. This check reads the script before any worker starts.
"""
from __future__ import annotations

import re
import sys

__all__ = ["check_main_is_guarded", "spawn_context"]

_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__""")


def check_main_is_guarded(what: str = "worker processes") -> None:
    """Raise :class:`~astra_thepayne.errors.ConfigurationError` when the running script has no
    ``if __name__ == "__main__":`` guard, so spawned ``what`` would run it again.

    Does nothing in an interactive session or a notebook (no script file: spawn imports nothing of it), when the
    script cannot be read, or inside a worker (multiprocessing's own check applies there)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        return
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            source = handle.read()
    except OSError:
        return
    if _GUARD.search(source):
        return
    from .errors import ConfigurationError

    raise ConfigurationError(
        f"{what} are started with spawn and would run {path} again: put the code that starts them under "
        f"`if __name__ == \"__main__\":` (see the multiprocessing guide, 'Safe importing of main module')")


def spawn_context(what: str = "worker processes"):
    """The ``spawn`` multiprocessing context, once :func:`check_main_is_guarded` has passed: every pool of the
    package starts its workers through this."""
    import multiprocessing

    check_main_is_guarded(what)
    return multiprocessing.get_context("spawn")
