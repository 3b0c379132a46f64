"""gunicorn settings: one model per process, loaded after fork (no CUDA in the parent)."""

import os

workers = int(os.environ.get("SMARTSAM_WORKERS", 1))  # each worker holds its own model copy
worker_class = "gthread"
threads = int(os.environ.get("SMARTSAM_THREADS", 8))  # slow downloads and /health never wait behind clicks
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
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def post_worker_init(worker):
    # Start loading the models as soon as the worker exists, so /setup and /health answer at once.
    from backend.model import Engine

    Engine.instance()


def on_starting(server):
    import logging

    # Our loggers at LOG_LEVEL; libraries (sam2 logs every image at INFO) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("smartsam").setLevel(loglevel.upper())
