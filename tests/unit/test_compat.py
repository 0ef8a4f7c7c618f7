"""The fast path's hold on other libraries' internals: verified versions, names present, a loud fallback."""

import logging
import re
from pathlib import Path

import pytest
from realtime import compat

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def undecided(monkeypatch):
    """Every piece decided afresh, and this process's decisions kept as they were."""
    monkeypatch.setattr(compat, "_decided", {})
    monkeypatch.delenv("FAST_PATH", raising=False)


def test_the_locked_versions_are_the_verified_ones():
    locked = {name.lower(): version for name, version in compat.locked_versions(REPO / "requirements/app.lock").items()}
    unverified = {
        package: locked[package] for package in compat.VERIFIED if locked[package] not in compat.VERIFIED[package]
    }
    assert not unverified, (
        f"requirements/app.lock moved to {unverified}: run make canary, then add them to VERIFIED in "
        "app/realtime/compat.py"
    )


@pytest.mark.parametrize("package", sorted(compat.VERIFIED))
def test_every_name_the_fast_path_uses_is_there(package):
    assert compat.missing_names(package) == []


def test_on_the_verified_versions_every_piece_is_on_and_nothing_is_said(undecided, caplog):
    if any(compat.installed_version(package) not in versions for package, versions in compat.VERIFIED.items()):
        pytest.skip("not the verified versions (make canary)")
    compat.decide()
    assert all(compat.fast(piece) for piece in compat.PIECES)
    # Only compat's own words count: another test's leftover task may log meanwhile.
    assert not [record for record in caplog.records if record.name == compat.logger.name]


def test_an_untested_version_turns_its_pieces_off_with_one_warning_naming_it(undecided, monkeypatch, caplog):
    real = compat.installed_version
    monkeypatch.setattr(compat, "installed_version", lambda package: "99.0" if package == "daphne" else real(package))
    compat.decide()
    assert not compat.fast(compat.REPLIES)
    [warning] = caplog.records
    assert warning.levelno == logging.WARNING
    assert "daphne 99.0 is untested (verified: 4.2.3)" in warning.getMessage()
    assert compat.REPLIES.stock in warning.getMessage()
    compat.decide()
    assert len(caplog.records) == 1


def test_a_missing_name_turns_its_piece_off_even_when_forced(undecided, monkeypatch, caplog):
    monkeypatch.setenv("FAST_PATH", "force")
    monkeypatch.setitem(compat.USED_NAMES, "twisted", {"twisted.internet.tcp:Server": ("_gone",)})
    monkeypatch.setattr(compat, "installed_version", lambda package: "99.0")
    assert not compat.fast(compat.WRITES)
    assert compat.fast(compat.LAYER)  # forced past the version, not past the names
    assert "twisted 99.0 lacks twisted.internet.tcp:Server._gone" in caplog.text


def test_fast_path_off_turns_every_piece_off_in_one_warning(undecided, monkeypatch, caplog):
    monkeypatch.setenv("FAST_PATH", "off")
    compat.decide()
    assert not any(compat.fast(piece) for piece in compat.PIECES)
    [warning] = caplog.records
    assert all(piece.name in warning.getMessage() for piece in compat.PIECES)


def test_a_fast_path_value_that_is_none_of_them_is_refused(undecided, monkeypatch):
    monkeypatch.setenv("FAST_PATH", "fastest")
    with pytest.raises(ValueError, match="FAST_PATH='fastest' is not one of auto, off, force"):
        compat.fast(compat.LAYER)


def test_no_other_module_uses_the_private_names():
    """A module that imports a library uses none of the private names compat.py lists for it."""
    found = []
    for path in (REPO / "app").rglob("*.py"):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        for owners in compat.USED_NAMES.values():
            for owner, names in owners.items():
                library = owner.split(".")[0]
                private = [name for name in names if name.startswith("_")]
                if private and re.search(rf"^(from|import) {library}\b", text, re.MULTILINE):
                    found += [
                        f"{path.relative_to(REPO)}: {name}" for name in private if re.search(rf"\.{name}\b", text)
                    ]
    assert not found, f"private names of other libraries belong in app/realtime/compat.py: {found}"
