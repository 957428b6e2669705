"""coordinator.link.chunk_sender.plan_sends: chunk requests coalesced into publications."""

from __future__ import annotations

from coordinator.link.chunk_sender import ChunkRequestItem, PlannedSend, plan_sends
from edge_agent.protocol import Channel, broadcast_topic, device_topic

T1, T2 = "a" * 64, "b" * 64


def test_a_chunk_one_device_wants_goes_to_that_device() -> None:
    plan = plan_sends([ChunkRequestItem("pi-1", T1, (3, 1))])
    topic = device_topic("pi-1", Channel.CHUNKS)
    assert plan == [PlannedSend(topic, T1, 1), PlannedSend(topic, T1, 3)]


def test_a_chunk_several_devices_want_is_broadcast_once() -> None:
    plan = plan_sends(
        [
            ChunkRequestItem("pi-1", T1, (0, 1)),
            ChunkRequestItem("pi-2", T1, (1, 2)),
            ChunkRequestItem("pi-3", T1, (1,)),
        ]
    )
    assert plan == [
        PlannedSend(device_topic("pi-1", Channel.CHUNKS), T1, 0),
        PlannedSend(broadcast_topic(T1), T1, 1),
        PlannedSend(device_topic("pi-2", Channel.CHUNKS), T1, 2),
    ]


def test_a_device_asking_twice_counts_once_and_transfers_stay_apart() -> None:
    plan = plan_sends(
        [
            ChunkRequestItem("pi-1", T2, (5,)),
            ChunkRequestItem("pi-1", T2, (5,)),
            ChunkRequestItem("pi-2", T1, (5,)),
        ]
    )
    assert plan == [
        PlannedSend(device_topic("pi-2", Channel.CHUNKS), T1, 5),
        PlannedSend(device_topic("pi-1", Channel.CHUNKS), T2, 5),
    ]


def test_nothing_asked_nothing_sent() -> None:
    assert plan_sends([]) == []
