# Two images from one build, with no network at all:
#   app (the default target)  daphne (default) | gunicorn | manage ... | any other command
#   loadtest                  locust master and workers, the fan-out check: the app's
#                             packages plus requirements/loadtest.lock and loadtest/
# The app image carries no load-test or test code and no locust.
#
# Python packages come from the wheelhouse in the build context (`make
# wheelhouse`), checked against the hashes in the lock files. The base is a
# pinned public tag, or the image `make images-offline` builds from Debian
# packages (--build-arg PYTHON_IMAGE=...). Both are Debian bookworm with Python
# 3.11, the interpreter the locks target. Kept to plain Dockerfile syntax (no
# BuildKit mounts): the legacy builder of docker-compose v1 and of a Docker
# engine without buildx builds it too.

ARG PYTHON_IMAGE=python:3.11.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY requirements/app.lock /tmp/app.lock
COPY build/wheelhouse /tmp/wheelhouse
# --no-index: a wheel missing from the wheelhouse fails the build here instead
# of being fetched from wherever the build happens to have network.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /tmp/wheelhouse \
        --require-hashes --only-binary :all: -r /tmp/app.lock
COPY app app
# The dummy key and host exist for this command only: settings refuse to load
# without them when DEBUG is off. Nothing of them is kept in the image.
RUN DJANGO_SECRET_KEY=collectstatic-only DJANGO_ALLOWED_HOSTS=localhost DJANGO_STATIC_ROOT=/app/static \
    /opt/venv/bin/python app/manage.py collectstatic --noinput --verbosity 0
COPY deploy/__init__.py deploy/entrypoint.sh deploy/healthcheck.py deploy/gunicorn_conf.py deploy/replica_name.py deploy/

FROM build AS build-loadtest
COPY requirements/loadtest.lock /tmp/loadtest.lock
RUN /opt/venv/bin/pip install --no-index --find-links /tmp/wheelhouse \
        --require-hashes --only-binary :all: --no-deps -r /tmp/loadtest.lock
COPY loadtest loadtest

# What both images run on.
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin app
# Settings first, files last: the legacy builder commits a layer per
# instruction (seconds each on a slow storage driver), and these stay cached
# when only the code changes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app/app:/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_STATIC_ROOT=/app/static
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["/app/deploy/entrypoint.sh"]

FROM runtime AS loadtest
# locust's web UI
EXPOSE 8089
CMD ["locust", "--help"]
COPY --from=build-loadtest --chown=root:root /opt/venv /opt/venv
COPY --from=build-loadtest --chown=root:root /app /app

# Last, so a plain `docker build .` builds it.
FROM runtime AS app
# daphne, gunicorn
EXPOSE 8000 8001
# Liveness of the default role; compose and Kubernetes set their own per role.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "deploy.healthcheck", "http://127.0.0.1:8000/healthz"]
CMD ["daphne"]
# The packages, then the app with its static files and entrypoint. Owned by
# root: the app user reads them but cannot rewrite them, whether or not the
# root filesystem is mounted read-only.
COPY --from=build --chown=root:root /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
