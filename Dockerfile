# SmartSAM Label Studio ML backend. CUDA base image; runs on the CPU too (no GPU: CPU defaults).
#   docker compose up        (see docker-compose.yml: volumes for references and checkpoints)
# BASE_IMAGE: any Debian or Ubuntu image with apt (scripts/image-check.sh builds on a Debian made
# locally where no registry can be reached).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    SMARTSAM_HOME=/cache SMARTSAM_DATA_DIR=/data HF_HOME=/cache/huggingface PORT=9090
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
      libgl1 libglib2.0-0 curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
COPY requirements.txt requirements-backend.txt ./
# docker/ca/extra.crt, when a build context holds one (a proxy's certificate authority for pip), is
# used for the install only; the repository has none
COPY docker/ca/ /etc/smartsam-ca/
RUN if [ -f /etc/smartsam-ca/extra.crt ]; then export PIP_CERT=/etc/smartsam-ca/extra.crt; fi; \
    pip install -r requirements-backend.txt
COPY pyproject.toml run.sh label_config.xml ./
COPY smartsam ./smartsam
COPY backend ./backend
RUN if [ -f /etc/smartsam-ca/extra.crt ]; then export PIP_CERT=/etc/smartsam-ca/extra.crt; fi; \
    pip install --no-deps -e .
VOLUME ["/data", "/cache"]
EXPOSE 9090
# /health needs basic auth when it is on; it answers 503 when the model failed to load
HEALTHCHECK --interval=30s --timeout=5s CMD sh -c 'if [ -n "$BASIC_AUTH_USER" ]; then A="-u $BASIC_AUTH_USER:$BASIC_AUTH_PASS"; fi; curl -fs $A http://127.0.0.1:${PORT}/health' || exit 1
CMD ["./run.sh"]
