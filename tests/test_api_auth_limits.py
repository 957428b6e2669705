"""Failed authentication is rate-limited and audited; expired tokens are refused (issue 17).

* The pure :class:`~coordinator.service.api.auth_limits.FailedAuthLimiter` on a fake
  clock: the 10th failure within 60 s starts a 60 s cool-down, per address, with
  bounded memory.
* The API over the in-memory operations twin: a client guessing tokens gets 401s,
  each logged and handed to the audit hook without the token, then 429 with
  ``Retry-After`` without its token being checked (a valid one included), while
  other addresses and valid requests go on; a 403 is not counted.
* The API over a real :class:`~coordinator.service.fleet_service.FleetService` and
  store: an expired token is refused exactly like an unknown one, and every
  refusal is an ``auth.fail`` row of the audit log.
* Across a restart: those rows are replayed into the new limiter, so a client
  cooling down stays refused (without them it was served at once).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from coordinator.errors import StoreError
from coordinator.link.memory import MemoryHub
from coordinator.service.api import ApiConfig, create_app
from coordinator.service.api.auth import AuthFailure
from coordinator.service.api.auth_limits import AuthLimits, Counted, FailedAuthLimiter
from coordinator.service.fleet_service import FleetService
from coordinator.service.operations import Actor
from coordinator.service.store import MEMORY, Store
from coordinator.service.tokens import Role, hash_token, token_id
from tests.api_support import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    FakeOperations,
    TestClient,
    authenticate,
    bearer,
)
from tests.clock_support import ManualClock

ATTACKER = ("203.0.113.7", 40000)
NEIGHBOUR = ("198.51.100.2", 40001)
GUESS = "fedge_a-guessed-token-that-is-not-valid"


# --- the pure limiter ---------------------------------------------------------------


def test_the_tenth_failure_in_a_minute_starts_a_minute_of_cool_down() -> None:
    clock = ManualClock()
    limiter = FailedAuthLimiter(AuthLimits(), clock)
    for n in range(1, 10):
        assert limiter.failed("a") == Counted(n, locked_out=False)
        assert limiter.retry_after("a") is None
        clock.now += 5.0
    assert limiter.failed("a") == Counted(10, locked_out=True)
    assert limiter.retry_after("a") == 60.0
    assert limiter.retry_after("b") is None  # per address
    clock.now += 59.5
    assert limiter.retry_after("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.retry_after("a") is None
    # After the cool-down the address starts from zero.
    assert limiter.failed("a") == Counted(1, locked_out=False)


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = ManualClock()
    limiter = FailedAuthLimiter(AuthLimits(max_failures=3, window_s=10.0), clock)
    for _ in range(20):  # two a window, for a long time
        assert not limiter.failed("a").locked_out
        clock.now += 5.1
    assert limiter.retry_after("a") is None
    assert limiter.failed("a") == Counted(2, locked_out=False)
    assert limiter.failed("a") == Counted(3, locked_out=True)


def test_a_failure_after_an_unchecked_cool_down_starts_from_zero() -> None:
    clock = ManualClock()
    limiter = FailedAuthLimiter(AuthLimits(max_failures=2, lockout_s=30.0), clock)
    limiter.failed("a")
    assert limiter.failed("a").locked_out
    clock.now += 31.0
    assert limiter.failed("a") == Counted(1, locked_out=False)


def test_memory_is_bounded_and_a_cooling_address_is_kept_longest() -> None:
    clock = ManualClock()
    limits = AuthLimits(max_failures=2, window_s=10.0, lockout_s=1e6, max_clients=3)
    limiter = FailedAuthLimiter(limits, clock)
    limiter.failed("locked")
    assert limiter.failed("locked").locked_out
    for n in range(2000):
        # First addresses whose failures are over when the next comes, then a flood
        # of addresses all still counting.
        clock.now += 11.0 if n < 1000 else 0.001
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
        assert limiter.tracked() <= 3
    assert limiter.retry_after("locked") is not None
    assert limiter.failed("10.0.7.207") == Counted(2, locked_out=True)  # the last one, kept


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_failures": 0},
        {"max_failures": True},
        {"window_s": 0},
        {"lockout_s": -1.0},
        {"lockout_s": float("inf")},
        {"max_clients": 0},
    ],
)
def test_limits_must_be_positive(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        AuthLimits(**kwargs)  # type: ignore[arg-type]


# --- the API over the operations twin -----------------------------------------------


class Recorder:
    """The audit hook: keeps every failure; can be made to fail."""

    def __init__(self) -> None:
        self.failures: list[AuthFailure] = []
        self.broken = False

    def __call__(self, failure: AuthFailure) -> None:
        if self.broken:
            raise StoreError("database is locked")
        self.failures.append(failure)


class Counting:
    """``authenticate`` that counts its calls (a cooling-down address makes none)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, token: str) -> Actor | None:
        self.calls += 1
        return authenticate(token)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def checks() -> Counting:
    return Counting()


@pytest.fixture
def app(clock: ManualClock, recorder: Recorder, checks: Counting) -> FastAPI:
    return create_app(
        FakeOperations.seeded(),
        authenticate=checks,
        config=ApiConfig(),  # the default limits: 10 failures a minute, a minute's wait
        on_auth_failure=recorder,
        auth_clock=clock,
    )


@pytest.fixture
def attacker(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, client=ATTACKER) as client:
        yield client


@pytest.fixture
def neighbour(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, client=NEIGHBOUR) as client:
        yield client


def test_a_client_guessing_tokens_is_logged_audited_then_refused_without_a_check(
    attacker: TestClient,
    neighbour: TestClient,
    clock: ManualClock,
    recorder: Recorder,
    checks: Counting,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guesses = [f"{GUESS}-{n}" for n in range(10)]
    with caplog.at_level(logging.INFO, logger="coordinator.service.api"):
        for guess in guesses:
            response = attacker.get("/v1/devices", headers=bearer(guess))
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
    assert checks.calls == 10

    # Each failure: one audit record (the token's public id, never the token) ...
    assert [f.failures for f in recorder.failures] == list(range(1, 11))
    assert [f.lockout_s for f in recorder.failures] == [None] * 9 + [60.0]
    for failure, guess in zip(recorder.failures, guesses, strict=True):
        assert failure.address == ATTACKER[0]
        assert (failure.method, failure.path) == ("GET", "/v1/devices")
        assert failure.reason == "unknown, revoked or expired token"
        assert failure.token_id == token_id(hash_token(guess))
        assert guess not in repr(failure)
    # ... and one log line, and the cool-down is logged as a warning.
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 10
    assert "failed authentication 10 of 10 allowed within 60 s" in refusals[-1].getMessage()
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{ATTACKER[0]} failed authentication 10 times" in warning.getMessage()
    for guess in guesses:
        assert guess not in caplog.text

    # Now even a valid token from that address is refused, and not looked at.
    refused = attacker.get("/v1/devices", headers=bearer(OPERATOR_TOKEN))
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "60"
    assert refused.json()["error"]["code"] == "too_many_requests"
    for _ in range(50):
        assert attacker.get("/v1/devices", headers=bearer(GUESS)).status_code == 429
    assert checks.calls == 10
    assert len(recorder.failures) == 10  # a refused attempt is not audited again

    # Another address and public paths are unaffected.
    assert neighbour.get("/v1/devices", headers=bearer(VIEWER_TOKEN)).status_code == 200
    assert attacker.get("/v1/health").status_code == 200

    clock.now += 30.0
    assert attacker.get("/v1/devices", headers=bearer(VIEWER_TOKEN)).headers["Retry-After"] == "30"
    clock.now += 30.0
    assert attacker.get("/v1/devices", headers=bearer(VIEWER_TOKEN)).status_code == 200


def test_every_kind_of_failed_authentication_counts(
    attacker: TestClient, recorder: Recorder
) -> None:
    attempts: list[dict[str, str]] = [
        {},
        {"Authorization": "Basic abc"},
        bearer("not-a-fedge-token"),
        bearer(GUESS),
    ]
    for headers in attempts:
        assert attacker.post("/v1/runs", json={}, headers=headers).status_code == 401
    assert [(f.reason, f.token_id) for f in recorder.failures] == [
        ("no Authorization header", None),
        ("malformed Authorization header", None),
        ("not a fedge token", None),
        ("unknown, revoked or expired token", token_id(hash_token(GUESS))),
    ]
    assert [f.method for f in recorder.failures] == ["POST"] * 4


def test_a_weak_role_is_not_a_failed_authentication(
    attacker: TestClient, recorder: Recorder
) -> None:
    for _ in range(30):
        response = attacker.post("/v1/runs", json={}, headers=bearer(VIEWER_TOKEN))
        assert response.status_code == 403
    assert recorder.failures == []
    assert attacker.get("/v1/devices", headers=bearer(VIEWER_TOKEN)).status_code == 200


def test_a_failing_audit_hook_is_logged_and_the_answer_stays_401(
    attacker: TestClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.broken = True
    with caplog.at_level(logging.ERROR, logger="coordinator.service.api"):
        response = attacker.get("/v1/devices", headers=bearer(GUESS))
    assert response.status_code == 401
    assert "could not record the failed authentication" in caplog.text
    assert GUESS not in caplog.text


# --- the API over the real service and store ----------------------------------------


def test_an_expired_token_is_refused_like_an_unknown_one_and_audited(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    store = Store.open(MEMORY, artifact_dir=tmp_path / "artifacts")
    service = FleetService(store, MemoryHub(), None, clock=lambda: now[0])
    _, lasting = store.add_token("ci", Role.VIEWER, now[0], expires_at=now[0] + 3600)
    app = create_app(
        service, authenticate=service.authenticate, on_auth_failure=service.record_auth_failure
    )
    with TestClient(app, client=ATTACKER) as client:
        assert client.get("/v1/devices", headers=bearer(lasting)).status_code == 200
        now[0] += 3600
        expired = client.get("/v1/devices", headers=bearer(lasting))
        unknown = client.get("/v1/devices", headers=bearer(GUESS))
    assert expired.status_code == unknown.status_code == 401
    assert expired.json() == unknown.json()
    assert expired.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]

    rows = [row for row in store.audit_log() if row.action == "auth.fail"]
    assert [(r.actor, r.role, r.target) for r in rows] == [
        (f"client:{ATTACKER[0]}", Role.VIEWER, token_id(hash_token(lasting))),
        (f"client:{ATTACKER[0]}", Role.VIEWER, token_id(hash_token(GUESS))),
    ]
    assert rows[0].detail == {
        "reason": "unknown, revoked or expired token",
        "method": "GET",
        "path": "/v1/devices",
        "failures": 1,
        "lockout_s": None,
    }
    assert rows[1].detail["failures"] == 2
    for row in rows:
        assert lasting not in repr(row)
        assert GUESS not in repr(row)
    store.close()


# --- cool-downs survive a restart (rebuilt from the audit log) -----------------------


def test_restored_failures_keep_cool_downs_and_partial_counts(clock: ManualClock) -> None:
    limiter = FailedAuthLimiter(AuthLimits(), clock)  # 10 a minute, a minute's wait
    cooling = limiter.restore(
        [(ATTACKER[0], 20.0 - n) for n in range(10)]  # locked out 11 s ago
        + [(NEIGHBOUR[0], 5.0)] * 3  # 3 failures, 5 s ago
        + [("192.0.2.9", 500.0)] * 10  # long over
    )
    assert cooling == 1
    assert limiter.retry_after(ATTACKER[0]) == pytest.approx(49.0)
    assert limiter.retry_after("192.0.2.9") is None
    assert [limiter.failed(NEIGHBOUR[0]) for _ in range(7)][-1] == Counted(10, True)


def _serve_after(db: Path, now: float, *, restore: bool) -> tuple[Store, FastAPI]:
    """The service and its API as ``fedge coordinator serve`` starts them on ``db``."""
    store = Store.open(db, artifact_dir=db.parent / "artifacts")
    service = FleetService(store, MemoryHub(), None, clock=lambda: now)
    limits = AuthLimits()
    history = service.recent_auth_failures(limits.window_s + limits.lockout_s)
    app = create_app(
        service,
        authenticate=service.authenticate,
        on_auth_failure=service.record_auth_failure,
        auth_clock=ManualClock(),
        auth_history=history if restore else (),
    )
    return store, app


def test_a_client_cooling_down_is_still_refused_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db, now = tmp_path / "state.db", 1_800_000_000.0
    store, app = _serve_after(db, now, restore=True)
    _, valid = store.add_token("ci", Role.VIEWER, now)
    with TestClient(app, client=ATTACKER) as attacker:
        for n in range(10):
            assert attacker.get("/v1/devices", headers=bearer(f"{GUESS}-{n}")).status_code == 401
        assert attacker.get("/v1/devices", headers=bearer(valid)).status_code == 429
    store.close()

    # The attack: a restart (a crash the client provoked, or an upgrade) used to clear
    # the limiter; without the audit history the client could go on guessing at once.
    store, app = _serve_after(db, now + 5, restore=False)
    with TestClient(app, client=ATTACKER) as attacker:
        assert attacker.get("/v1/devices", headers=bearer(valid)).status_code == 200
    store.close()

    # Now the service replays the audit log: the cool-down goes on, the rest is served.
    with caplog.at_level(logging.INFO, logger="coordinator.service.api"):
        store, app = _serve_after(db, now + 5, restore=True)
    assert "restored 10 failed authentication(s)" in caplog.text
    assert "1 address(es) cooling down" in caplog.text
    with TestClient(app, client=ATTACKER) as attacker, TestClient(app, client=NEIGHBOUR) as other:
        refused = attacker.get("/v1/devices", headers=bearer(valid))
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "55"
        assert other.get("/v1/devices", headers=bearer(valid)).status_code == 200
    store.close()

    # Once the cool-down is over (a later restart), the client is served again.
    store, app = _serve_after(db, now + 61, restore=True)
    with TestClient(app, client=ATTACKER) as attacker:
        assert attacker.get("/v1/devices", headers=bearer(valid)).status_code == 200
    store.close()
