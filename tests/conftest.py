import os

import pytest
import torch


def _share_cores_between_xdist_workers() -> None:
    """Under pytest-xdist (`-n N`), give each worker its share of the cores for torch's threads, and the
    processes it starts (interpreter runs, CLI subprocesses) the same share through OMP_NUM_THREADS.

    Every worker's torch would otherwise start one thread per core: on CI's 2 cores, 2 workers x 2 threads
    spin-wait on each other. An OMP_NUM_THREADS set by the user wins.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_cores_between_xdist_workers()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when no CUDA device is present; everything else always runs."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
