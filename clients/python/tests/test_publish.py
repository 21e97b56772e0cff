"""Publishing: idempotent ids, batches, the pipelined stream, bad input."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc
import pytest

import tidings


def test_a_retried_id_is_a_duplicate_with_the_original_sequence(client: tidings.Client) -> None:
    client.create_topic("orders")
    batch = [tidings.message("orders", f"order {i}") for i in range(3)]

    first = client.publish(batch)
    assert [r.id for r in first] == [m.id for m in batch]
    assert [r.sequence for r in first] == [1, 2, 3]
    assert not any(r.duplicate for r in first)

    # The producer retries the same batch (e.g. after a timeout): nothing new
    # is stored and the original sequence numbers come back.
    retried = client.publish(batch)
    assert [r.duplicate for r in retried] == [True, True, True]
    assert [r.sequence for r in retried] == [1, 2, 3]

    # A new id in the same batch as an old one: only the new one is stored.
    fresh = tidings.message("orders", "order 3")
    mixed = client.publish([batch[0], fresh])
    assert [(r.duplicate, r.sequence) for r in mixed] == [(True, 1), (False, 4)]
    assert client.admin.GetTopic(tidings.v1.admin_pb2.GetTopicRequest(name="orders")).topic.last_sequence == 4


def test_the_same_id_on_another_topic_is_a_new_message(client: tidings.Client) -> None:
    client.create_topic("a")
    client.create_topic("b")
    shared = str(uuid.uuid4())
    results = client.publish([tidings.message("a", "x", id=shared), tidings.message("b", "x", id=shared)])
    assert [(r.sequence, r.duplicate) for r in results] == [(1, False), (1, False)]


def test_publish_stream_answers_batches_in_order_and_dedups(client: tidings.Client) -> None:
    client.create_topic("events")
    batches = [[tidings.message("events", f"{b}/{i}") for i in range(50)] for b in range(20)]
    with client.publish_stream(max_in_flight=4) as stream:
        futures = [stream.publish(batch) for batch in batches]
        # A batch resent on the stream is answered with duplicates.
        again = stream.publish(batches[3])
    results = [f.result(timeout=10) for f in futures]
    sequences = [r.sequence for batch in results for r in batch]
    assert sequences == list(range(1, 1001))
    assert [r.id for r in results[7]] == [m.id for m in batches[7]]
    assert all(r.duplicate for r in again.result(timeout=10))
    assert [r.sequence for r in again.result()] == [r.sequence for r in results[3]]


def test_publish_stream_fails_the_pending_batch_with_the_status(client: tidings.Client) -> None:
    client.create_topic("events")
    with client.publish_stream() as stream:
        ok = stream.publish([tidings.message("events", "fine")])
        bad = stream.publish([tidings.message("events", "x", id="nope")])
        assert ok.result(timeout=10)[0].sequence == 1
        with pytest.raises(tidings.TidingsError) as caught:
            bad.result(timeout=10)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a UUID" in caught.value.message
    assert "request 1" in caught.value.message


def test_bad_input_is_refused_with_a_status_naming_the_problem(client: tidings.Client) -> None:
    client.create_topic("orders")

    with pytest.raises(tidings.TidingsError) as caught:
        client.publish([tidings.message("orders", "x", id="not-a-uuid")])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a UUID" in caught.value.message
    assert "not-a-uuid" in caught.value.message
    assert not caught.value.retryable

    # A batch with one bad message stores none of it.
    good = tidings.message("orders", "ok")
    with pytest.raises(tidings.TidingsError) as caught:
        client.publish([good, tidings.Message(topic="orders", payload=b"no id")])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.publish([good])[0].duplicate is False

    with pytest.raises(tidings.TidingsError) as caught:
        client.publish([tidings.message("no-such-topic", "x")])
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-topic" in caught.value.message

    with pytest.raises(tidings.TidingsError) as caught:
        client.create_topic("bad name!")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(tidings.TidingsError) as caught:
        client.create_topic("orders")
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert client.create_topic("orders", exist_ok=True).last_sequence == 1
    client.create_subscription("billing", "orders", ack_deadline=timedelta(seconds=7))
    again = client.create_subscription("billing", "orders", ack_deadline=timedelta(seconds=1), exist_ok=True)
    assert again.ack_deadline.ToTimedelta() == timedelta(seconds=7), "the stored settings are returned"

    with pytest.raises(tidings.TidingsError) as caught:
        client.create_subscription("shipping", "no-such-topic")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
