"""The Grafana dashboard only charts metrics the app really exports."""

import json
import re
from pathlib import Path

from django.test import Client

from tests.ws import join

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "components" / "monitoring" / "blueprint-dashboard.json"


async def test_every_dashboard_metric_is_exported():
    # Touch every labelled family so it appears in the exposition.
    socket = await join("dash")
    await socket.send_json_to({"message": "x"})
    await socket.receive_json_from()
    await socket.send_to(text_data="{")
    await socket.receive_json_from()
    await socket.disconnect()
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in Client().get("/metrics").content.decode().splitlines()
        if line and not line.startswith("#")
    }
    exported |= {re.sub(r"_total$", "", name) + "_total" for name in exported}
    dashboard = json.loads(DASHBOARD.read_text())
    charted = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:blueprint|process)_[a-z_]+)", target["expr"])
    }
    assert charted, "the dashboard charts nothing"
    # Counters that have not been incremented yet are declared but have no sample lines.
    declared = {
        line.split()[2] + suffix
        for line in Client().get("/metrics").content.decode().splitlines()
        if line.startswith("# TYPE")
        for suffix in ("", "_total", "_bucket")
    }
    missing = charted - exported - declared
    assert not missing, f"dashboard charts metrics the app does not export: {sorted(missing)}"
