"""Health checks through the standard grpc.health.v1 service."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import Broker

import tidings

SERVICES = ["", "tidings.v1.PublisherService", "tidings.v1.SubscriberService", "tidings.v1.AdminService"]


@pytest.mark.parametrize("service", SERVICES)
def test_the_server_and_each_service_are_serving(client: tidings.Client, service: str) -> None:
    assert client.health(service) == "SERVING"


def test_the_standard_health_stub_works(broker: Broker) -> None:
    with broker.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_an_unknown_service_is_not_found(client: tidings.Client) -> None:
    with pytest.raises(tidings.TidingsError) as caught:
        client.health("no.such.Service")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_a_stopped_broker_is_unavailable(start_broker: Callable[..., Broker]) -> None:
    b = start_broker()
    with b.client(timeout=2) as c:
        assert c.health() == "SERVING"
        assert b.stop() == 0
        with pytest.raises(tidings.TidingsError) as caught:
            c.health()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.retryable
