"""The close codes a replica sends, and what each tells the client to do.

After any of them a client reconnects with jittered backoff (through nginx,
most likely to another replica) and resumes. The README's Limits section is
the client-facing table; keep the two in step.
"""

GOING_AWAY = 1001  # the replica is draining (deploy, scale-in)
POLICY_VIOLATION = 1008  # abuse: kept flooding past its rate limit
MESSAGE_TOO_BIG = 1009  # a frame over the transport limit (Daphne's 1 MiB)
SERVER_ERROR = 1011  # a fault in the server, logged with its reason
SERVICE_RESTART = 1012  # the replica lost Redis, or hands the socket to a less loaded one (rebalancing)
TRY_AGAIN_LATER = 1013  # the replica is full
# Application range, stable: the client fell too far behind (it did not read
# what was sent to it, or the replica's fan-out backlog was over its bound).
FELL_BEHIND = 4000
