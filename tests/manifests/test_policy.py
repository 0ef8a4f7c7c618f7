"""checkov's Kubernetes policies pass on every rendered kustomization.

checkov runs from its own virtual env (`make checkov-venv`); its skips, each
with its reason, are in k8s/checkov.yaml.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.manifests.render import K8S, KUSTOMIZATIONS, ROOT, render_text
from tests.required import unavailable

pytestmark = pytest.mark.manifests

CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


@pytest.fixture(scope="module")
def checkov():
    if not CHECKOV.exists():
        unavailable(f"{CHECKOV.relative_to(ROOT)} is missing: run `make checkov-venv`")
    return str(CHECKOV)


def test_checkov_passes_on_every_rendered_kustomization(checkov, tmp_path):
    for name in KUSTOMIZATIONS:
        (tmp_path / f"{name}.yaml").write_text(render_text(name))
    result = subprocess.run(
        [checkov, "--config-file", str(K8S / "checkov.yaml"), "--directory", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"checkov found policy failures:\n{result.stdout}\n{result.stderr}"
    # A scan that found nothing to scan would also exit 0.
    assert "Passed checks: " in result.stdout and "Passed checks: 0," not in result.stdout, result.stdout
