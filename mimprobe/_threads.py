"""One meaning of ``--threads`` for every command: the CPU threads of torch's intra-op pool, of the BLAS and OpenMP
pools (NumPy, scikit-learn, FAISS) through threadpoolctl, and of FAISS itself, for the duration of a command.

On a loaded 2-core machine torch's default (one thread per core) made extraction 17x slower than one thread
(25 against 418 img/s, issue 12): threads that wait for each other cost more than they compute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import BadInputError

# Libraries loaded after the context opens read these at start-up (OpenMP, MKL, OpenBLAS); threadpoolctl only
# reaches the pools already loaded.
_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Limit torch, BLAS/OpenMP and FAISS to ``threads`` CPU threads inside the block; None changes nothing.

    The previous torch and FAISS thread counts, pool limits and environment are restored on exit.

    Raises:
        BadInputError: ``threads`` below 1.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise BadInputError(f"--threads must be a whole number of at least 1, got {threads!r}")
    threads = int(threads)
    import torch
    from threadpoolctl import threadpool_limits

    saved_environment = {name: os.environ.get(name) for name in _ENVIRONMENT}
    os.environ.update({name: str(threads) for name in _ENVIRONMENT})
    faiss = _faiss()
    # read both before setting either: torch and FAISS may share one OpenMP runtime
    previous_torch, previous_faiss = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:  # in reverse order, torch last, so that a shared runtime ends at torch's previous count
        if faiss is not None:
            faiss.omp_set_num_threads(previous_faiss)
        torch.set_num_threads(previous_torch)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _faiss():
    try:
        import faiss
    except ImportError:  # FAISS is only needed by k-NN and k-means; torch-only commands run without it
        return None
    return faiss
