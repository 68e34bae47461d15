"""The FastAPI fixtures (``client``, ``async_client``) and the app's own requests joined to the test's
session (``AppRequests``), on top of fixtures.py's sandbox and db_commit clone; re-exported by plugin.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session

from pgshard.fastapi import is_async_callable, make_async_client, make_client, override_dependency
from pgshard.fixtures import _app_object, _is_async_test, _refuse_unshared, _run, is_commit_test
from pgshard.sandbox import AsyncSandbox, is_async_engine, is_async_maker


def _app(request: pytest.FixtureRequest) -> Any:
    app = _app_object(request, "app")
    if app is None:
        pytest.fail("pgshard: the client fixtures need pgshard_app = package.module:app in your pytest ini",
                    pytrace=False)
    return app


def _app_client(request: pytest.FixtureRequest, fixture: str, make: Callable[..., Any]) -> Iterator[Any]:
    """The app's get_db yields the test's sandbox session; in a db_commit test, a real session per
    request on the test's own clone (the app's sessionmaker, rebound, already points there)."""
    app = _app(request)
    get_db = _app_object(request, "get_db")
    if get_db is None:
        pytest.fail("pgshard: the client fixtures need pgshard_get_db = package.module:get_db in your pytest ini; "
                    "without it the app's requests would commit to the database for real", pytrace=False)
    base_url, lifespan = _run(request).settings.base_url, _run(request).settings.lifespan
    is_async = is_async_callable(get_db)
    if request.node.get_closest_marker("db_commit") is not None:
        engine = request.getfixturevalue("commit_db").engine
        maker = _app_object(request, "sessionmaker")
        if maker is not None and is_async and not _is_async_test(request):
            yield from _one_loop_client(app, base_url, maker.kw.get("bind"), make, lifespan)
        elif maker is not None:  # pointed at the clone: the app's get_db is right
            with make(app, base_url, lifespan=lifespan) as made:
                yield made
        elif is_async:
            pytest.fail("pgshard: an async get_db in a db_commit test needs pgshard_sessionmaker (the app's "
                        "async_sessionmaker), which pgshard points at the test's clone", pytrace=False)
        else:
            with override_dependency(app, get_db, lambda: Session(bind=engine, expire_on_commit=False)), \
                    make(app, base_url, lifespan=lifespan) as made:
                yield made
        return
    _refuse_unshared(request, fixture)
    if is_async and (fixture == "client" or not _is_async_test(request)):
        # A sync client, or a sync test, on an async app: every request runs in the sandbox's own loop (the
        # one db_session reaches too), each with a session of its own that joins the sandbox's connection.
        box: AsyncSandbox = request.getfixturevalue("_pgshard_async_sandbox")
        maker = _app_object(request, "sessionmaker")
        new_session = maker if maker is not None and is_async_maker(maker) else box.session_class()
        with override_dependency(app, get_db, lambda: new_session(expire_on_commit=False)), \
                make(app, base_url, box.portal, lifespan=lifespan) as made:
            yield made
    else:
        session = request.getfixturevalue("async_db_session" if is_async else "db_session")
        with override_dependency(app, get_db, lambda: session, close=False), \
                make(app, base_url, lifespan=lifespan) as made:
            yield made


_CLIENT_FIXTURES = ("client", "async_client")


def _suite_fixture(request: pytest.FixtureRequest, name: str) -> str | None:
    """Where the suite's own fixture ``name`` is defined when it shadows pgshard's (``tests/conftest.py``)."""
    definitions = getattr(getattr(request.node, "_fixtureinfo", None), "name2fixturedefs", {}).get(name) or ()
    func = getattr(definitions[-1], "func", None) if definitions else None
    if func is None or getattr(func, "__module__", "").startswith("pgshard."):
        return None
    return f"{name} ({inspect.getsourcefile(func) or func.__module__})"


def _note_once(request: pytest.FixtureRequest, text: str) -> None:
    notes = _run(request).notes
    if text not in notes:
        notes.append(text)


def _pgshard_app_requests(request: pytest.FixtureRequest) -> Iterator[None]:
    """With pgshard_app and pgshard_get_db set, every request the app serves during a test gets the test's
    sandboxed session, also through a TestClient or httpx client the suite's own conftest builds: the
    override is read at each request, so a module-scoped ``with TestClient(app) as c`` is reached too. The
    session is made at the first request (a test that sends none pays one dict entry). Autouse only where
    both are set (AppRequests, which plugin.py registers then)."""
    settings = _run(request).settings
    if not (settings.app and settings.get_db) or is_commit_test(request.node):
        yield
        return
    app, get_db = _app(request), _app_object(request, "get_db")
    if is_async_callable(get_db):  # its requests run in the suite's client's own loop: out of the sandbox's reach
        for name in _CLIENT_FIXTURES:
            if name in request.fixturenames and (where := _suite_fixture(request, name)):
                _note_once(request, f"the suite's own fixture {where} serves an async get_db in an event loop "
                           f"pgshard cannot reach: its requests commit for real; use pgshard's {name} fixture "
                           "(delete the suite's) for rolled-back tests")
        yield
        return

    def provide() -> Any:
        return request.getfixturevalue("db_session")

    with override_dependency(app, get_db, provide, close=False) as ours:
        yield
        current = app.dependency_overrides.get(get_db)
        if current is not None and current is not ours:
            name = f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', current)}"
            _note_once(request, f"the suite replaces pgshard's override of {settings.get_db} with its own ({name}): "
                       "its requests use that function's sessions; set pgshard_sessionmaker to the sessionmaker "
                       "it uses, so that they join the test's transaction")


class AppRequests:
    """The plugin plugin.py registers when pgshard_app and pgshard_get_db are both set: it makes
    ``_pgshard_app_requests`` autouse there, and only there."""

    @pytest.fixture(autouse=True, name="_pgshard_app_requests")
    def app_requests(self, request: pytest.FixtureRequest) -> Iterator[None]:
        yield from _pgshard_app_requests(request)


def _one_loop_client(app: Any, base_url: str, engine: Any, make: Callable[..., Any], lifespan: bool) -> Iterator[Any]:
    """A sync client whose requests all run in one event loop, since the async engine pools connections
    that belong to the loop they were made in; they are closed in that loop after the test."""
    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        try:
            with make(app, base_url, portal, lifespan=lifespan) as made:
                yield made
        finally:
            if is_async_engine(engine):
                portal.call(engine.dispose)


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A FastAPI TestClient (base URL pgshard_base_url) whose pgshard_get_db dependency yields the test's
    session; with an async app, every request of the test runs in one event loop."""
    yield from _app_client(request, "client", make_client)


@pytest.fixture
def async_client(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An httpx.AsyncClient on the app (ASGITransport), same dependency override as ``client``."""
    yield from _app_client(request, "async_client", make_async_client)
