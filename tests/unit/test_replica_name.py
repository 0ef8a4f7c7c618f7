"""Compose replicas name themselves after their container (the e2e tests see
it in every frame); these are the names compose v1 and v2 give containers."""

from __future__ import annotations

import pytest

from deploy.replica_name import compose_name


@pytest.mark.parametrize(
    "container, role, name",
    [
        ("channels-blueprint_daphne_3", "daphne", "daphne-3"),  # compose v1
        ("channels-blueprint-daphne-12", "daphne", "daphne-12"),  # compose v2
        ("e2e1a2b_gunicorn_1", "gunicorn", "gunicorn-1"),
        ("my_daphne_app_daphne_2", "daphne", "daphne-2"),
    ],
)
def test_compose_container_names_become_role_and_number(container, role, name):
    assert compose_name(container, role) == name


@pytest.mark.parametrize("container", ["3468425545c4", "channels-blueprint_gunicorn_1", "daphne"])
def test_anything_else_is_not_a_compose_name_of_the_role(container):
    assert compose_name(container, "daphne") is None
