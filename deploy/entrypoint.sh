#!/usr/bin/env bash
# The image's entrypoint: the first argument picks the role, the rest go to it.
#   daphne            the WebSocket server (default), port 8000
#   gunicorn          Django over WSGI (HTTP API, pages, static files), port 8001
#   locust ARGS...    the load generator, with loadtest/ from the image
#   manage ARGS...    a manage.py command, e.g. `manage check --deploy`
#   anything else     run as given (a shell, python, ...)
# Every role is exec'd, so the server is PID 1 and receives SIGTERM itself.
set -o errexit -o pipefail -o nounset

role="${1:-daphne}"
if [ "$#" -gt 0 ]; then shift; fi

case "$role" in
    daphne)
        # One name per replica on every frame (origin / served_by): the
        # container hostname unless the orchestrator names the pod.
        export POD_NAME="${POD_NAME:-$HOSTNAME}"
        # Daphne with the app's graceful drain on SIGTERM (realtime/server.py),
        # so a stopped replica closes its sockets with 1001 and they reconnect.
        # --proxy-headers: the client address is nginx's X-Forwarded-For.
        # Pings every 20 s keep idle sockets inside nginx's 75 s read timeout
        # and find dead clients; one unanswered for 30 s is closed.
        exec python -m realtime.server --bind 0.0.0.0 --port 8000 --proxy-headers \
            --ping-interval 20 --ping-timeout 30 "$@" config.asgi:application
        ;;
    gunicorn)
        export POD_NAME="${POD_NAME:-$HOSTNAME}"
        # The workers' metrics add up through files here (realtime/metrics.py);
        # emptied at start, as files of a previous run would count twice.
        export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-/tmp/prometheus-multiproc}"
        rm -rf "$PROMETHEUS_MULTIPROC_DIR"
        mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
        # Heartbeat files in /dev/shm: a disk-backed /tmp stalls workers on a
        # busy node. No control socket: nothing uses it, and its default place
        # is under $HOME, read-only here.
        exec gunicorn --bind 0.0.0.0:8001 --workers "${GUNICORN_WORKERS:-2}" \
            --worker-tmp-dir /dev/shm --no-control-socket --access-logfile - \
            --config /app/deploy/gunicorn_conf.py \
            "$@" config.wsgi:application
        ;;
    locust)
        exec locust "$@"
        ;;
    manage)
        exec python /app/app/manage.py "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
