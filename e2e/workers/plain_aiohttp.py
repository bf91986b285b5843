"""What the python-socketio test apps run where they have no sticky code
(plain_python_worker.py, browser_app_python.py without the integration):
aiohttp's standard runner on the listening socket sticky hands over (fd 3,
systemd's socket activation convention), else on 127.0.0.1:$PORT. Standard
library and aiohttp only.
"""

import asyncio
import os
import socket

from aiohttp import web


async def serve(app):
    """Serves `app` until the process is stopped (SIGTERM, sticky's stop)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        site = web.SockSite(runner, socket.socket(fileno=3))  # socket activation
    else:
        site = web.TCPSite(runner, "127.0.0.1", int(os.environ.get("PORT", "3000")))
    await site.start()
    await asyncio.Event().wait()
