"""gunicorn settings: one model per process, loaded after fork (no CUDA in the parent).

Workers, threads, the address and the log level come on the command line from the backend's
``Settings`` (``python -m backend.server``), so the launch and the app never disagree.
"""

worker_class = "gthread"
# With gthread workers this is a heartbeat of the worker's main loop, not a request limit: a hung
# process is replaced. Requests end at SMARTSAM_REQUEST_TIMEOUT inside the app (fetch, model wait,
# agent), which frees their thread.
timeout = 120
graceful_timeout = 30
preload_app = False  # never initialise CUDA before fork
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-"
errorlog = "-"


def on_starting(server):
    import logging

    # Our loggers at the configured level; libraries (sam2 logs every image at INFO) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("smartsam").setLevel(server.cfg.loglevel.upper())


def worker_exit(server, worker):
    # queued field statistics are written before the worker goes
    from backend.server import shutdown

    shutdown()
