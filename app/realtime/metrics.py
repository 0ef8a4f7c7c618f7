"""Prometheus metrics of a replica, every series labelled with its name.

Daphne replicas are single processes and use the default registry. gunicorn
runs several workers: with PROMETHEUS_MULTIPROC_DIR set (the image's gunicorn
role sets it) the workers write to shared files and /metrics adds them up.
"""

from __future__ import annotations

import os

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from realtime.replica import state

REPLICA = settings.POD_NAME

OPEN_SOCKETS = Gauge(
    "blueprint_ws_open_sockets", "WebSockets open on this replica", ["replica", "endpoint"], multiprocess_mode="livesum"
)
MESSAGES_RECEIVED = Counter("blueprint_ws_messages_received", "Frames received from clients", ["replica", "endpoint"])
MESSAGES_SENT = Counter("blueprint_ws_messages_sent", "Frames sent to clients", ["replica", "endpoint"])
FRAMES_REFUSED = Counter(
    "blueprint_ws_frames_refused", "Client frames answered with an error frame, by error code", ["replica", "code"]
)
CONNECTIONS_REFUSED = Counter(
    "blueprint_ws_connections_refused",
    "Sockets refused or closed by the server: over_capacity (1013), draining, bad_room, rate_limited (1008), "
    "slow_consumer and shed (4000), out_of_sequence (4000), redis_link (1012), rebalanced (1012: handed on to "
    "a less loaded replica), above_mean (a handshake refused with 503 while rebalancing), server_error (1011)",
    ["replica", "reason"],
)
GROUP_SEND_SECONDS = Histogram(
    "blueprint_group_send_seconds",
    "Time to hand one message to the channel layer for a whole group",
    ["replica"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
LAYER_ERRORS = Counter(
    "blueprint_channel_layer_errors",
    "Channel-layer operations that failed (Redis unreachable); each publish lost this way was answered with an error",
    ["replica", "operation"],
)
FANOUT_BACKLOG = Gauge(
    "blueprint_fanout_backlog",
    "Group messages received from Redis that the fan-out layer has not yet delivered; above zero only past capacity",
    ["replica"],
    multiprocess_mode="max",
)
FANOUT_SHED = Counter(
    "blueprint_fanout_shed",
    "Group messages the fan-out layer dropped because its backlog was over FANOUT_MAX_BACKLOG_BYTES; "
    "every member that missed one was closed with 4000",
    ["replica"],
)
DELIVERIES_DROPPED = Counter(
    "blueprint_ws_deliveries_dropped",
    "Frames not sent because their socket was already closing or closed (the client was told by its close code)",
    ["replica", "reason"],
)
PENDING_BYTES = Gauge(
    "blueprint_ws_pending_bytes",
    "Bytes queued on this replica for clients that are not reading them yet (bounded per socket and in total)",
    ["replica"],
    multiprocess_mode="max",
)
OVERLOADED = Gauge(
    "blueprint_replica_overloaded",
    "1 while the fan-out backlog is over its bound: the replica sheds and /readyz answers 503",
    ["replica"],
    multiprocess_mode="max",
)
HISTORY_APPENDS = Counter(
    "blueprint_history_appends", "Messages appended to a room's history (and published)", ["replica"]
)
HISTORY_REPEATS = Counter(
    "blueprint_history_repeats",
    "Publishes not made again: the room's history held their id (a resend after a lost socket, a late retry)",
    ["replica"],
)
HISTORY_RESUMES = Counter(
    "blueprint_history_resumes",
    "Members that resumed from a position: recovered (got every message they missed) or not (told recovered: false)",
    ["replica", "recovered"],
)
HISTORY_REPLAYED = Counter(
    "blueprint_history_replayed_messages", "Messages replayed from history to members that resumed", ["replica"]
)
REDIS_LINK_UP = Gauge(
    "blueprint_redis_link_up",
    "1 while every Redis subscription link of the replica answers; 0 while one is lost (members closed with 1012)",
    ["replica"],
    multiprocess_mode="min",
)
DRAINING = Gauge("blueprint_replica_draining", "1 while the replica drains", ["replica"], multiprocess_mode="max")
# Read from Redis (realtime/peers.py): a drained process is never scraped
# again, so the replicas that stay count every replica's drains.
DEPLOYMENT_DRAINS = Counter(
    "blueprint_deployment_drains",
    "Drains of any Daphne replica of the deployment that ended since this replica started, by outcome: "
    "completed (every socket closed in time) or timed_out (sockets still open at DRAIN_TIMEOUT_SECONDS)",
    ["replica", "outcome"],
)
BROADCASTS = Counter("blueprint_http_broadcasts", "HTTP broadcast API calls, by status code", ["replica", "status"])
# Read when scraped: free on the paths that change them.
PENDING_BYTES.labels(REPLICA).set_function(lambda: state.pending_bytes)
OVERLOADED.labels(REPLICA).set_function(lambda: float(state.overloaded))
REDIS_LINK_UP.labels(REPLICA).set_function(lambda: float(not state.redis_links_down))


@require_GET
def metrics_view(request):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
