"""FastAPI integration: the app's session dependency yields the test's session."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


def is_async_callable(func: Any) -> bool:
    """An ``async def`` dependency (or generator): FastAPI awaits it, so it must yield an AsyncSession."""
    return inspect.isasyncgenfunction(func) or inspect.iscoroutinefunction(func)


@contextlib.contextmanager
def override_dependency(app: Any, dependency: Callable[..., Any] | None, provide: Callable[[], Any],
                        *, close: bool = True) -> Iterator[Any]:
    """For a block, ``app.dependency_overrides[dependency]`` yields ``provide()`` (closed after each
    request when ``close``); the previous override, if any, is restored after. The block gets the
    override function (to tell whether something else replaced it meanwhile)."""
    if dependency is None:
        yield None
        return
    overrides = app.dependency_overrides
    had, previous = dependency in overrides, overrides.get(dependency)

    def _sync() -> Iterator[Any]:
        value = provide()
        try:
            yield value
        finally:
            if close:
                value.close()

    async def _async() -> AsyncIterator[Any]:
        value = provide()
        try:
            yield value
        finally:
            if close and inspect.isawaitable(closing := value.close()):  # AsyncSession.close is a coroutine
                await closing

    override = _async if is_async_callable(dependency) else _sync
    overrides[dependency] = override
    try:
        yield override
    finally:
        if had:
            overrides[dependency] = previous
        else:
            overrides.pop(dependency, None)


class LifespanError(RuntimeError):
    """The app's startup failed (what ``with TestClient(app)`` would raise)."""


class Lifespan:
    """The app's ASGI lifespan (startup before the first request, shutdown after the test), run the way
    ``with TestClient(app)`` runs it: in the event loop the requests run in, so what startup opens (an
    httpx client, a pool) belongs to their loop. ``asgi`` is the app as the clients see it: every request's
    scope carries a copy of the state the lifespan yielded (``request.state``), and attributes (``.state``,
    ``.dependency_overrides``) are the app's own."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._to_app: asyncio.Queue[dict[str, Any]] | None = None
        self._from_app: asyncio.Queue[dict[str, Any]] | None = None
        self._starting: asyncio.Lock | None = None
        self._up = False  # startup completed: a failure from now on is the shutdown's
        self.asgi = _WithState(self)

    async def startup(self) -> None:
        if self._task is not None:
            return
        self.loop = asyncio.get_running_loop()
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self._task = self.loop.create_task(self._serve(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        reply = await self._from_app.get()
        if reply["type"] == "lifespan.startup.failed":
            raise LifespanError(f"the app's lifespan startup failed: {reply.get('message') or '(no message)'}")
        self._up = True

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:  # Starlette re-raises after its own "failed" message; an app may not send one
            assert self._from_app is not None
            if self._from_app.empty():
                phase = "shutdown" if self._up else "startup"
                await send({"type": f"lifespan.{phase}.failed", "message": f"{type(exc).__name__}: {exc}"})

    async def ensure_started(self) -> None:
        """For a client whose loop is the test's own (async_client): start at its first request."""
        if self._task is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                await self.startup()

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is None or self._to_app is None or self._from_app is None:
            return
        if not task.done():
            await self._to_app.put({"type": "lifespan.shutdown"})
            reply = await self._from_app.get()
            await task
            if reply["type"] == "lifespan.shutdown.failed":
                raise LifespanError(f"the app's lifespan shutdown failed: {reply.get('message') or '(no message)'}")

    def shutdown_in_its_loop(self) -> None:
        """After the test, from sync code: shut down in the loop startup ran in, when it can still run."""
        loop = self.loop
        if self._task is None or loop is None or loop.is_closed() or loop.is_running():
            return
        loop.run_until_complete(self.shutdown())


class _WithState:
    """The app for a client: requests see the lifespan's state; everything else is the app's."""

    def __init__(self, lifespan: Lifespan) -> None:
        self._lifespan = lifespan

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            await self._lifespan.ensure_started()
            scope = {**scope, "state": dict(self._lifespan.state)}
        await self._lifespan.app(scope, receive, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lifespan.app, name)


@contextlib.contextmanager
def make_client(app: Any, base_url: str, portal: Any = None, *, lifespan: bool = True) -> Iterator[Any]:
    """A TestClient; with ``portal`` every request runs in that one event loop (an async app's
    connections belong to one loop). With ``lifespan`` (``pgshard_lifespan``) the app's startup runs before
    the first request and its shutdown after the test, in the requests' loop (a portal of our own when
    none is given), as ``with TestClient(app)`` does; without, each request gets a loop of its own."""
    from fastapi.testclient import TestClient

    with contextlib.ExitStack() as stack:
        runner = Lifespan(app) if lifespan else None
        if runner is not None and portal is None:
            from anyio.from_thread import start_blocking_portal

            portal = stack.enter_context(start_blocking_portal())
        client = TestClient(runner.asgi if runner is not None else app, base_url=base_url)  # type: ignore[arg-type]
        if portal is not None:
            client.portal = portal  # TestClient's own slot for a running portal (what `with client:` sets)
        if runner is not None:
            portal.call(runner.startup)
            stack.callback(portal.call, runner.shutdown)
        yield client


@contextlib.contextmanager
def make_async_client(app: Any, base_url: str, portal: Any = None, *, lifespan: bool = True) -> Iterator[Any]:
    """An httpx.AsyncClient on the app (ASGITransport), in the test's loop; with ``lifespan`` the app's
    startup runs at its first request (in that loop) and its shutdown after the test, in that loop."""
    import importlib

    try:  # what newer Starlette uses; the same API as httpx
        httpx = importlib.import_module("httpx2")
    except ModuleNotFoundError:
        httpx = importlib.import_module("httpx")
    runner = Lifespan(app) if lifespan else None
    transport = httpx.ASGITransport(app=runner.asgi if runner is not None else app)
    if runner is not None and portal is not None:  # its requests run in that loop: so does the lifespan
        portal.call(runner.startup)
    try:
        yield httpx.AsyncClient(transport=transport, base_url=base_url)
    finally:
        if runner is not None and portal is not None:
            portal.call(runner.shutdown)
        elif runner is not None:
            runner.shutdown_in_its_loop()
