#!/usr/bin/env bash
# The image's entrypoint: the first argument picks the role, the rest go to it.
#   daphne            the WebSocket server (default), port 8000
#   gunicorn          Django over WSGI (HTTP API, pages, static files), port 8001
#   locust ARGS...    the load generator (the loadtest image: locust and loadtest/)
#   manage ARGS...    a manage.py command, e.g. `manage check --deploy`
#   anything else     run as given (a shell, python, ...)
# Every role is exec'd, so the server is PID 1 and receives SIGTERM itself.
set -o errexit -o pipefail -o nounset

# Every socket is an open file. Some runtimes start containers with a soft
# limit of 1,024 (containerd 2.0, Docker 25 and later) under a far higher hard
# one, which would cap a replica near 1,000 sockets whatever
# WS_MAX_CONNECTIONS says. Raising the soft limit up to the hard one needs no
# privilege; the hard limit stays the runtime's (or the node's) ceiling.
hard_nofile=$(ulimit -Hn)
if [ "$hard_nofile" = unlimited ]; then hard_nofile=$(cat /proc/sys/fs/nr_open); fi
ulimit -Sn "$hard_nofile"

# Listen on every address, IPv6 too where the kernel has it: `::` is a
# dual-stack socket on Linux (IPv4 clients arrive as ::ffff:a.b.c.d), so a
# pod in an IPv6 or dual-stack cluster is reachable by every address DNS
# gives for it. Without IPv6 (Docker's default networks), 0.0.0.0.
# (procfs files report size 0: read, do not test -s.)
if grep -q . /proc/net/if_inet6 2>/dev/null; then
    listen_host="::" listen_address="[::]"
else
    listen_host="0.0.0.0" listen_address="0.0.0.0"
fi

role="${1:-daphne}"
if [ "$#" -gt 0 ]; then shift; fi

case "$role" in
    daphne)
        # One name per replica on every frame (origin / served_by): the pod's
        # (Kubernetes), else daphne-<n> under compose, else the hostname.
        export POD_NAME="${POD_NAME:-$(python -m deploy.replica_name daphne)}"
        # Daphne with the app's graceful drain on SIGTERM (realtime/server.py),
        # so a stopped replica closes its sockets with 1001 and they reconnect.
        # Its options and application are realtime/command_line.py's, the same
        # for the local stack and the tests; "$@" adds or overrides options.
        exec python -m realtime.server --bind "$listen_host" --port 8000 "$@"
        ;;
    gunicorn)
        export POD_NAME="${POD_NAME:-$(python -m deploy.replica_name gunicorn)}"
        # The workers' metrics add up through files here (realtime/metrics.py);
        # emptied at start, as files of a previous run would count twice.
        export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-/tmp/prometheus-multiproc}"
        rm -rf "$PROMETHEUS_MULTIPROC_DIR"
        mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
        # Heartbeat files in /dev/shm: a disk-backed /tmp stalls workers on a
        # busy node. No control socket: nothing uses it, and its default place
        # is under $HOME, read-only here.
        exec gunicorn --bind "$listen_address:8001" --workers "${GUNICORN_WORKERS:-2}" \
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
