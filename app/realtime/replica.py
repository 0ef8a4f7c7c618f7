"""What this process knows about itself as a replica: draining, overloaded, its Redis link, open sockets.

One Daphne process is one replica; this state is per process, read by
/readyz, the consumers and /metrics.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class ReplicaState:
    def __init__(self) -> None:
        self.draining = False
        # Set by the fan-out layer while its backlog is over its bound: the
        # replica sheds and must not be sent new sockets.
        self.overloaded = False
        self.open_sockets = 0
        # Bytes queued for clients that are not reading them, over all sockets.
        self.pending_bytes = 0
        # Redis shards whose subscription link is lost: not ready while any is.
        self.redis_links_down: set[str] = set()
        # Until this time.monotonic() the replica holds well above the
        # deployment's mean (realtime.peers): it refuses new sockets with 503,
        # which nginx retries on another replica. Renewed by every census that
        # finds it so, so it lapses by itself if the census stops.
        self.above_mean_until = 0.0

    @property
    def above_mean(self) -> bool:
        return time.monotonic() < self.above_mean_until

    def start_draining(self) -> None:
        # Imported here: the drain server imports this module before Django is set up.
        from realtime import metrics

        if not self.draining:
            logger.info("draining: refusing new sockets, closing open ones with 1001 in batches over the drain window")
        self.draining = True
        metrics.DRAINING.labels(metrics.REPLICA).set(1)


state = ReplicaState()
