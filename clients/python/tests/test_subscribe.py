"""Subscribing: stream acks, nack redelivery, stale acks, lease extension."""

from __future__ import annotations

import time
from datetime import timedelta

import grpc
import pytest
from support import Broker

import tidings
from tidings.v1 import subscriber_pb2

WAIT = 10.0  # seconds any single delivery may take to arrive


def receive(stream: tidings.MessageStream, timeout: float = WAIT) -> tidings.Delivery:
    delivery = stream.receive(timeout)
    assert delivery is not None, f"no delivery within {timeout}s"
    return delivery


def test_stream_delivers_every_message_and_acks_commit(client: tidings.Client) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest")
    sent = client.publish([tidings.message("orders", f"order {i}", attributes={"n": str(i)}) for i in range(5)])

    with client.subscribe("billing") as stream:
        deliveries = [receive(stream) for _ in range(5)]
        assert [d.sequence for d in deliveries] == [r.sequence for r in sent]
        assert [d.id for d in deliveries] == [r.id for r in sent]
        assert deliveries[2].payload == b"order 2"
        assert deliveries[2].message.attributes["n"] == "2"
        assert all(d.attempt == 1 for d in deliveries)
        # Every ack is answered OK once committed.
        for future in [d.ack() for d in deliveries]:
            assert future.result(timeout=WAIT) is None
        stats = client.subscription_stats("billing")
        assert (stats.acked, stats.backlog, stats.in_flight) == (5, 0, 0)

    # Acked messages are not delivered again, on a new stream either.
    with client.subscribe("billing") as stream:
        assert stream.receive(timeout=0.5) is None


def test_iteration_ends_when_the_stream_is_closed(client: tidings.Client) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest")
    client.publish([tidings.message("orders", str(i)) for i in range(3)])
    seen = []
    stream = client.subscribe("billing")
    for delivery in stream:
        seen.append(delivery.payload)
        delivery.ack().result(timeout=WAIT)
        if len(seen) == 3:
            stream.close()
    assert seen == [b"0", b"1", b"2"]
    with pytest.raises(tidings.StreamClosed):
        delivery.ack().result(timeout=WAIT)


def test_a_nacked_message_is_redelivered_with_the_next_attempt(client: tidings.Client) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest", min_backoff=timedelta(milliseconds=50))
    [sent] = client.publish([tidings.message("orders", "flaky")])

    with client.subscribe("billing") as stream:
        first = receive(stream)
        assert (first.id, first.attempt) == (sent.id, 1)
        nacked_at = time.monotonic()
        first.nack(delay=timedelta(milliseconds=300), reason="database busy").result(timeout=WAIT)

        second = receive(stream)
        assert time.monotonic() - nacked_at >= 0.3, "the nack delay was honoured"
        assert (second.id, second.sequence, second.attempt) == (sent.id, sent.sequence, 2)
        assert second.ack_id != first.ack_id

        # Without a delay the subscription's backoff applies.
        second.nack(reason="still busy").result(timeout=WAIT)
        third = receive(stream)
        assert third.attempt == 3
        third.ack().result(timeout=WAIT)

    stats = client.subscription_stats("billing")
    assert (stats.redelivered, stats.acked, stats.backlog) == (2, 1, 0)


def test_an_ack_after_the_lease_expired_is_refused_as_stale(client: tidings.Client) -> None:
    client.create_topic("orders")
    # Redelivery waits out a 500 ms backoff, so the second lease is fresh
    # when it arrives; a lease of a second leaves its ack time on a loaded
    # machine.
    client.create_subscription(
        "billing",
        "orders",
        start="earliest",
        ack_deadline=timedelta(seconds=1),
        min_backoff=timedelta(milliseconds=500),
        max_backoff=timedelta(milliseconds=500),
    )
    [sent] = client.publish([tidings.message("orders", "slow")])

    with client.subscribe("billing") as stream:
        first = receive(stream)
        time.sleep(1.5)  # the 1 s lease runs out
        with pytest.raises(tidings.AckRefused) as caught:
            first.ack().result(timeout=WAIT)
        assert caught.value.result == "STALE"
        assert caught.value.operation == "ack"
        assert caught.value.ack_id == first.ack_id
        assert caught.value.detail

        # The message comes again, and the new lease can be acked.
        second = receive(stream)
        assert (second.id, second.attempt) == (sent.id, 2)
        second.ack().result(timeout=WAIT)

    # The unary Ack refuses a stale ack id with FAILED_PRECONDITION.
    with pytest.raises(tidings.TidingsError) as unary:
        client.ack("billing", [first.ack_id])
    assert unary.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "refused" in unary.value.message
    assert client.subscription_stats("billing").acked == 1


def test_extending_a_lease_keeps_the_ack_valid(client: tidings.Client) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest", ack_deadline=timedelta(milliseconds=300))
    client.publish([tidings.message("orders", "long job")])

    with client.subscribe("billing") as stream:
        delivery = receive(stream)
        deadline = delivery.extend(timedelta(seconds=5)).result(timeout=WAIT)
        assert deadline > delivery.lease_deadline + timedelta(seconds=3)
        time.sleep(0.6)  # past the original deadline
        delivery.ack().result(timeout=WAIT)
        assert stream.receive(timeout=0.3) is None, "not redelivered"
    assert client.subscription_stats("billing").redelivered == 0


def test_unknown_ack_ids_are_refused_as_unknown(client: tidings.Client) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest")
    client.publish([tidings.message("orders", "x")])
    with client.subscribe("billing") as stream:
        delivery = receive(stream)
        delivery.ack().result(timeout=WAIT)
        with pytest.raises(tidings.AckRefused) as caught:
            delivery.ack().result(timeout=WAIT)
    assert caught.value.result == "UNKNOWN"


def test_subscribing_to_an_unknown_subscription_fails_with_not_found(client: tidings.Client) -> None:
    with client.subscribe("nobody") as stream, pytest.raises(tidings.TidingsError) as caught:
        stream.receive(timeout=WAIT)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "nobody" in caught.value.message


def test_a_cancelled_stream_uses_an_attempt_and_a_closed_one_does_not(
    client: tidings.Client, broker: Broker
) -> None:
    import queue

    from tidings.v1 import subscriber_pb2, subscriber_pb2_grpc

    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest", max_attempts=2)
    client.publish([tidings.message("orders", "poison")])

    # Closing a stream gives what it held back without using an attempt.
    for _ in range(3):
        with client.subscribe("billing") as stream:
            assert receive(stream).attempt == 1

    # Cancelling it (what a consumer that crashes does) uses one: after
    # max_attempts the message is dead-lettered, not delivered forever.
    for attempt in (1, 2):
        channel = broker.channel()
        requests: queue.Queue[subscriber_pb2.SubscribeRequest | None] = queue.Queue()
        requests.put(subscriber_pb2.SubscribeRequest(subscription="billing"))
        call = subscriber_pb2_grpc.SubscriberServiceStub(channel).Subscribe(iter(requests.get, None))
        response = next(r for r in call if r.messages)
        assert response.messages[0].attempt == attempt
        call.cancel()
        channel.close()

    deadline = time.monotonic() + WAIT
    while client.subscription_stats("billing").dead_lettered != 1:
        assert time.monotonic() < deadline, "the poison message was never dead-lettered"
        time.sleep(0.05)
    with client.subscribe("billing") as stream:
        assert stream.receive(timeout=0.5) is None


def test_peek_shows_waiting_messages_without_leasing_them(client: tidings.Client) -> None:
    client.create_topic("orders")
    client.create_subscription("billing", "orders", start="earliest", max_attempts=1)
    client.publish([tidings.message("orders", f"order {i}") for i in range(3)])

    first = client.peek("billing", 2)
    again = client.peek("billing")
    assert [p.message.sequence for p in first] == [1, 2]
    assert len(again) == 3
    assert all(p.state == subscriber_pb2.MESSAGE_STATE_NEW and p.attempts == 0 for p in again)
    stats = client.subscription_stats("billing")
    assert (stats.delivered, stats.backlog, stats.in_flight) == (0, 3, 0)

    # With max_attempts 1, a counted look would have dead-lettered it.
    with client.subscribe("billing") as stream:
        delivery = receive(stream)
        assert (delivery.sequence, delivery.attempt) == (1, 1)
        leased = client.peek("billing", 1)
        assert leased[0].state == subscriber_pb2.MESSAGE_STATE_LEASED
        assert leased[0].attempts == 1
