"""One private PostgreSQL cluster for the whole session (tests.postgres), a fresh database per
test: the replica tests run against a real server, as a team's replicas would."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.postgres import Cluster, postgres_cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(postgres: Cluster, request: pytest.FixtureRequest) -> str:
    """The SQLAlchemy URL of an empty database named after the test."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:60]
    return postgres.create_database(name)
