"""gunicorn hooks, for the image's gunicorn role and the local stack (``--config``).

The workers share their Prometheus metrics through PROMETHEUS_MULTIPROC_DIR;
a worker that exits must be marked dead there, or its live gauges keep counting.
"""

from prometheus_client import multiprocess


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
