"""The environment variables that set how many threads a process's BLAS uses, in one place.

Read by BLAS when numpy loads, so they must be set before that: in a worker's environment, a batch script, or at
the top of a script. This module imports nothing, so it can be read before numpy is.
"""
__all__ = ["BLAS_THREAD_VARIABLES", "blas_thread_environment"]

#: OpenMP (OpenBLAS built with it), OpenBLAS's own and MKL's
BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def blas_thread_environment(threads: int) -> dict[str, str]:
    """``{variable: str(threads)}`` for every BLAS thread variable."""
    return {name: str(int(threads)) for name in BLAS_THREAD_VARIABLES}
