"""TLS, mutual TLS and bearer tokens against a broker with access control
(issue 12). These start their own secured brokers, whatever the mode."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from support import ADMIN_TOKEN, SECURE_MODE, Broker, Certs, Secure, default_access, token_hash

import tidings

WAIT = 10.0
WRITER_TOKEN = "orders-writer-token"
READER_TOKEN = "billing-reader-token"


def access_with_roles() -> dict[str, object]:
    """The admin, a principal that may publish to ``orders.*`` and one that
    may consume ``billing``."""
    access = default_access()
    access["principals"] += [
        {"name": "orders-writer", "tokens": [token_hash(WRITER_TOKEN)], "publish": ["orders.*"]},
        {"name": "billing-reader", "tokens": [token_hash(READER_TOKEN)], "consume": ["billing"]},
    ]
    return access


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(tidings.TidingsError) as caught:
        call()
    return caught.value.code


def test_a_call_without_a_token_is_unauthenticated_and_health_is_open(
    start_broker: Callable[..., Broker], certs: Certs
) -> None:
    broker = start_broker(secure=Secure(certs))
    with broker.client(token=None) as anonymous, broker.client(token="not-a-known-token") as unknown:
        assert anonymous.health() == "SERVING"
        assert code_of(lambda: anonymous.create_topic("orders")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: unknown.create_topic("orders")) == grpc.StatusCode.UNAUTHENTICATED
        with anonymous.subscribe("billing") as stream, pytest.raises(tidings.TidingsError) as caught:
            stream.receive(timeout=WAIT)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_principal_without_the_right_is_permission_denied(
    start_broker: Callable[..., Broker], certs: Certs
) -> None:
    broker = start_broker(secure=Secure(certs, access=access_with_roles()))
    with broker.client() as admin, broker.client(token=WRITER_TOKEN) as writer, broker.client(
        token=READER_TOKEN
    ) as reader:
        for topic in ("orders.eu", "payments"):
            admin.create_topic(topic)
        admin.create_subscription("billing", "orders.eu", start="earliest")
        admin.create_subscription("audit", "payments", start="earliest")

        # Unary calls: publish to orders.* only, and no admin.
        [sent] = writer.publish([tidings.message("orders.eu", "order 1")])
        refund = tidings.message("payments", "refund")
        assert code_of(lambda: writer.publish([refund])) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: writer.create_topic("orders.us")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: reader.subscription_stats("audit")) == grpc.StatusCode.PERMISSION_DENIED

        # The token goes with the streams too.
        with writer.publish_stream() as stream:
            [streamed] = stream.publish([tidings.message("orders.eu", "order 2")]).result(timeout=WAIT)
        assert not streamed.duplicate
        with reader.subscribe("billing") as stream:
            delivery = stream.receive(timeout=WAIT)
            assert delivery is not None and delivery.id == sent.id
            delivery.ack().result(timeout=WAIT)
        with reader.subscribe("audit") as stream, pytest.raises(tidings.TidingsError) as caught:
            stream.receive(timeout=WAIT)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert reader.subscription_stats("billing").acked == 1


def test_a_client_certificate_names_the_principal_with_mutual_tls(
    start_broker: Callable[..., Broker], certs: Certs
) -> None:
    access = {"principals": [{"name": "billing", "certificates": ["client.tidings.test"], "admin": True}]}
    broker = start_broker(secure=Secure(certs, client_auth="required", access=access))
    # PEM as bytes this time, and the name in the broker's certificate.
    tls = tidings.TLS(
        ca=certs.ca.read_bytes(),
        cert=certs.client_cert.read_bytes(),
        key=certs.client_key.read_bytes(),
        server_name="localhost",
    )
    with tidings.Client(broker.url, tls=tls, timeout=WAIT) as client:
        client.create_topic("orders")
        client.create_subscription("billing", "orders", start="earliest")
        client.publish([tidings.message("orders", "x")])
        with client.subscribe("billing") as stream:
            delivery = stream.receive(timeout=WAIT)
            assert delivery is not None and delivery.payload == b"x"
    # Without a certificate the handshake is refused, token or not.
    with broker.client(mutual=False, token=ADMIN_TOKEN, timeout=WAIT) as client:
        assert code_of(client.health) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "tls",
    [
        pytest.param(lambda certs: tidings.TLS(ca=certs.other_ca), id="another CA"),
        pytest.param(lambda certs: tidings.TLS(), id="default roots"),
        pytest.param(lambda certs: tidings.TLS(ca=certs.ca, server_name="broker.internal"), id="wrong server name"),
    ],
)
def test_a_client_that_does_not_trust_the_broker_fails(
    start_broker: Callable[..., Broker], certs: Certs, tls: Callable[[Certs], tidings.TLS]
) -> None:
    broker = start_broker(secure=Secure(certs))
    with tidings.Client(broker.url, tls=tls(certs), token=ADMIN_TOKEN, timeout=WAIT) as client:
        assert code_of(client.health) == grpc.StatusCode.UNAVAILABLE


def test_a_token_over_plain_text_reaches_the_broker(start_broker: Callable[..., Broker]) -> None:
    # Access control without TLS, on loopback: grpcio sends no call
    # credentials over plain text, so the client's interceptor adds the token.
    broker = start_broker(secure=Secure(None, access=access_with_roles()))
    assert broker.url.startswith("http://")
    with broker.client() as admin, broker.client(token=READER_TOKEN) as reader, broker.client(token=None) as anonymous:
        admin.create_topic("orders.eu")
        admin.create_subscription("billing", "orders.eu", start="earliest")
        with admin.publish_stream() as stream:
            stream.publish([tidings.message("orders.eu", "x")]).result(timeout=WAIT)
        with reader.subscribe("billing") as stream:
            delivery = stream.receive(timeout=WAIT)
            assert delivery is not None and delivery.payload == b"x"
        assert code_of(lambda: reader.create_topic("t")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: anonymous.subscription_stats("billing")) == grpc.StatusCode.UNAUTHENTICATED


def test_contradictory_settings_are_refused(certs: Certs) -> None:
    with pytest.raises(ValueError, match="https://"):
        tidings.Client("http://127.0.0.1:1", tls=tidings.TLS(ca=certs.ca))
    with pytest.raises(ValueError, match="contradicts"):
        tidings.Client("https://127.0.0.1:1", tls=False)
    with pytest.raises(ValueError, match="cert and key"):
        tidings.Client("https://127.0.0.1:1", tls=tidings.TLS(cert=certs.client_cert))
    with pytest.raises(ValueError, match="cannot read the CA bundle"):
        tidings.Client("https://127.0.0.1:1", tls=tidings.TLS(ca=certs.dir / "missing.pem"))
    with pytest.raises(ValueError, match="empty"):
        tidings.Client("127.0.0.1:1", token="")
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="channel"):
        tidings.Client(channel=channel, tls=True)


def test_the_suites_broker_follows_tidings_test_secure(broker: Broker) -> None:
    assert broker.url.startswith("https://") == SECURE_MODE
    with broker.client(token=None) as anonymous:
        if SECURE_MODE:
            assert code_of(lambda: anonymous.create_topic("t")) == grpc.StatusCode.UNAUTHENTICATED
        else:
            anonymous.create_topic("t")
