"""Dependencies run one way: the load tests may use the deployment code (the
local stack), never the reverse, and the app imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    "package, forbidden", [("deploy", {"loadtest", "tests"}), ("app", {"deploy", "loadtest", "tests"})]
)
def test_no_module_imports_against_the_direction(package, forbidden):
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden)
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {path: names for path, names in wrong.items() if names}
