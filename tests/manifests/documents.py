"""Lookups in rendered manifests: workloads, their containers, env and probes."""

from __future__ import annotations

POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "Job")


def find(docs, kind: str, name: str) -> dict:
    matches = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def of_kind(docs, kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def workloads(docs) -> list[dict]:
    return [doc for doc in docs if doc["kind"] in POD_TEMPLATE_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    """The one container of a workload (every pod here runs one)."""
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def env_names(workload: dict, docs) -> list[str]:
    """Every variable the container gets: its ConfigMaps' keys, then its env entries."""
    spec = container(workload)
    names = []
    for source in spec.get("envFrom", []):
        config_map = find(docs, "ConfigMap", source["configMapRef"]["name"])
        names.extend(config_map.get("data", {}))
    names.extend(entry["name"] for entry in spec.get("env", []))
    return names


def env_value(workload: dict, docs, name: str) -> str | None:
    """A variable's literal value (env entry or ConfigMap), None when it comes from elsewhere."""
    spec = container(workload)
    for entry in spec.get("env", []):
        if entry["name"] == name:
            return entry.get("value")
    for source in spec.get("envFrom", []):
        data = find(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        if name in data:
            return data[name]
    raise KeyError(f"{workload['metadata']['name']} has no variable {name}")


def container_port(workload: dict, name: str | None = None) -> int:
    """The container's port by name, or its only one."""
    ports = container(workload)["ports"]
    if name is not None:
        return next(port["containerPort"] for port in ports if port["name"] == name)
    assert len(ports) == 1, f"{workload['metadata']['name']}: expected one container port"
    return ports[0]["containerPort"]


def http_probe_path(workload: dict, probe: str) -> str:
    return container(workload)[probe]["httpGet"]["path"]
