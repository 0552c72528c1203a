"""The workers' event loop, in a thread of its own as the server runs it."""
import asyncio
import threading

import pytest


@pytest.fixture()
def event_loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
