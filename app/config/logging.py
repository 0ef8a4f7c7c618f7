"""Log records as one JSON object a line, each carrying the replica's name.

Log pipelines (Loki, CloudWatch, Elasticsearch) index the fields without
parsing; ``replica`` tells which of many identical pods said it.
"""

import json
import logging
import os
import socket
from datetime import UTC, datetime

REPLICA = os.environ.get("POD_NAME") or socket.gethostname()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "replica": REPLICA,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
