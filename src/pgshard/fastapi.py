"""FastAPI integration: the app's session dependency yields the test's session."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any


def is_async_callable(func: Any) -> bool:
    """An ``async def`` dependency (or generator): FastAPI awaits it, so it must yield an AsyncSession."""
    return inspect.isasyncgenfunction(func) or inspect.iscoroutinefunction(func)


@contextlib.contextmanager
def override_dependency(app: Any, dependency: Callable[..., Any] | None, provide: Callable[[], Any],
                        *, close: bool = True) -> Iterator[None]:
    """For a block, ``app.dependency_overrides[dependency]`` yields ``provide()`` (closed after each
    request when ``close``); the previous override, if any, is restored after."""
    if dependency is None:
        yield
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

    overrides[dependency] = _async if is_async_callable(dependency) else _sync
    try:
        yield
    finally:
        if had:
            overrides[dependency] = previous
        else:
            overrides.pop(dependency, None)


def make_client(app: Any, base_url: str, portal: Any = None) -> Any:
    """A TestClient; with ``portal`` every request runs in that one event loop (an async app's
    connections belong to one loop), without it each request gets a loop of its own."""
    from fastapi.testclient import TestClient

    client = TestClient(app, base_url=base_url)
    if portal is not None:
        client.portal = portal  # TestClient's own slot for a running portal (what `with client:` sets)
    return client


def make_async_client(app: Any, base_url: str, portal: Any = None) -> Any:
    import importlib

    try:  # what newer Starlette uses; the same API as httpx
        httpx = importlib.import_module("httpx2")
    except ModuleNotFoundError:
        httpx = importlib.import_module("httpx")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)
