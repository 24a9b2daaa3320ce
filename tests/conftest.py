from __future__ import annotations

from collections.abc import Iterator

import pytest

from devkit.amqp_broker import AmqpBroker
from devkit.services import azurite
from tests.harness import Gateway, running_gateway


@pytest.fixture(scope="session")
def storage() -> Iterator[str]:
    """The connection string of a real Table Storage (Azurite), shared by the session."""
    with azurite() as connection_string:
        yield connection_string


@pytest.fixture
def gateway(storage: str) -> Iterator[Gateway]:
    with running_gateway(storage) as running:
        yield running


@pytest.fixture
def broker() -> Iterator[AmqpBroker]:
    """A fresh AMQP 1.0 broker that the real azure-servicebus SDK talks to."""
    with AmqpBroker() as running:
        yield running
