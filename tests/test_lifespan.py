"""pgshard.fastapi.Lifespan: the ASGI lifespan run as `with TestClient(app)` runs it (pure logic, no database)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pgshard.fastapi import Lifespan, LifespanError


def _raw_app(fail_in: str) -> Any:
    """A bare ASGI app (no Starlette) that raises in one phase without sending its "failed" message."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        if fail_in == "startup":
            raise RuntimeError("cannot start")
        await send({"type": "lifespan.startup.complete"})
        await receive()
        raise RuntimeError("cannot stop")

    return app


@pytest.mark.parametrize("phase", ["startup", "shutdown"])
def test_a_raw_app_failing_in_a_phase_is_reported_as_that_phase(phase: str) -> None:
    async def run() -> None:
        lifespan = Lifespan(_raw_app(phase))
        if phase == "startup":
            with pytest.raises(LifespanError, match="lifespan startup failed: RuntimeError: cannot start"):
                await lifespan.startup()
            return
        await lifespan.startup()
        with pytest.raises(LifespanError, match="lifespan shutdown failed: RuntimeError: cannot stop"):
            await lifespan.shutdown()

    asyncio.run(run())
