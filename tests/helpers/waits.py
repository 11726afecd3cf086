"""A bounded wait for a condition on the event loop, instead of sleeping and hoping.

A test waits for the state it needs (a batch at the gate, a queue depth, a lifecycle state); a
bound that passes fails it, naming what it waited for. The bound is a ceiling on a hang, never a
figure under test. (helpers.daemons.wait_until does the same for a test that is not a coroutine.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

BOUND_S = 20.0  # generous: the CI machine is small and shared


async def until(check: Callable[[], bool], what: str, timeout_s: float = BOUND_S) -> None:
    """Poll check() from the event loop (letting the app's tasks and threads run) until it is
    true; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.002)

