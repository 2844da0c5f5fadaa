"""What fedtrain changes in Flower's processes (fedtrain.deploy.flower), each
patched into Flower's own code: a SuperNode's waits between requests for
messages (IdlePoll: fast while messages come, backing off while none do), and
the ServerApp's bounded wait for a reply's objects (bound_reply_pulls)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from fedtrain.deploy import flower
from fedtrain.deploy.flower import FLOWER_IDLE_POLL, IDLE_POLL_MAX, IDLE_SHARE, IdlePoll, pace_supernode_loop


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_idle_wait_grows_with_the_quiet_time_between_the_poll_and_the_cap() -> None:
    clock = Clock()
    poll = IdlePoll(0.1, clock=clock, sleep=clock.sleep)
    quiet_since = clock.now
    expected = []
    for _ in range(60):
        expected.append(min(max(0.1, IDLE_SHARE * (clock.now - quiet_since)), IDLE_POLL_MAX))
        poll.sleep(FLOWER_IDLE_POLL)

    assert clock.slept == pytest.approx(expected)
    assert clock.slept[0] == 0.1 and clock.slept[-1] == IDLE_POLL_MAX
    assert all(b >= a for a, b in zip(clock.slept, clock.slept[1:]))
    assert sum(1 for w in clock.slept if w < IDLE_POLL_MAX) < 20


def test_work_brings_the_wait_back_to_the_poll() -> None:
    clock = Clock()
    poll = IdlePoll(0.1, clock=clock, sleep=clock.sleep)
    clock.now += 30
    assert poll.idle_wait() == IDLE_POLL_MAX
    poll.worked()
    assert poll.idle_wait() == 0.1
    clock.now += 2.0
    assert poll.idle_wait() == pytest.approx(IDLE_SHARE * 2.0)


def test_a_wait_for_the_clientapps_reply_is_never_longer_than_the_poll() -> None:
    clock = Clock()
    poll = IdlePoll(0.1, clock=clock, sleep=clock.sleep)
    clock.now += 30
    poll.sleep(0.5)
    assert clock.slept == [0.1]


def test_a_poll_longer_than_the_cap_is_kept() -> None:
    clock = Clock()
    poll = IdlePoll(FLOWER_IDLE_POLL, clock=clock, sleep=clock.sleep)
    assert poll.idle_wait() == FLOWER_IDLE_POLL
    clock.now += 1000
    assert poll.idle_wait() == FLOWER_IDLE_POLL


def test_the_loop_tells_the_poll_of_each_message_and_reply() -> None:
    import time

    pulls = iter([None, 7, None])
    loop = SimpleNamespace(time=time, _pull_and_store_message=lambda **_: next(pulls), _push_messages=lambda **_: None)
    poll = pace_supernode_loop(loop, 0.1)
    assert poll is not None and loop.time is poll
    clock = Clock()
    poll._clock = clock
    poll.worked()

    clock.now += 20
    assert loop._pull_and_store_message(state=None) is None
    assert poll.idle_wait() == IDLE_POLL_MAX
    assert loop._pull_and_store_message(state=None) == 7
    assert poll.idle_wait() == 0.1
    clock.now += 20
    loop._push_messages(state=None)
    assert poll.idle_wait() == 0.1


def test_a_loop_without_the_steps_is_left_alone() -> None:
    import time

    loop = SimpleNamespace(time=time, _pull_and_store_message=lambda: None)
    assert pace_supernode_loop(loop, 0.1) is None
    assert loop.time is time


def test_the_tested_flowers_supernode_loop_has_what_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    assert f"time.sleep({FLOWER_IDLE_POLL:g})" in source
    for name in ("time", "_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(loop, name, getattr(loop, name))
    assert isinstance(pace_supernode_loop(loop, 0.1), IdlePoll)
    assert flower.FLOWER_IDLE_POLL > IDLE_POLL_MAX


def test_a_reply_whose_upload_stopped_is_given_up_after_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own object pull, bounded by ``bound_reply_pulls``: an object
    that never arrives ends the pull after the bound, not Flower's 2 h."""
    import time

    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    flower.bound_reply_pulls(1.5)

    def never(object_id: str) -> bytes:
        raise ObjectUnavailableError(object_id)

    began = time.monotonic()
    with pytest.raises(ObjectPullError):
        http_grid.pull_objects(object_ids=["a" * 64], pull_object_fn=never)
    assert time.monotonic() - began < 15


def test_bounding_a_grid_without_the_pull_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink.grid import http_grid

    from fedtrain.deploy.errors import DeployError

    monkeypatch.delattr(http_grid, "pull_objects")
    with pytest.raises(DeployError, match="pull_objects"):
        flower.bound_reply_pulls(5.0)
