"""`lora-booth ui`: the studio's server, on 127.0.0.1 unless told otherwise, and its URL."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from ..io import locking
from ..io.errors import ConfigError
from .guard import check_binding

DEFAULT_PORT = 7860
DEFAULT_WORKSPACE = "lora-booth-studio"
TOKEN_ENV = "LORA_BOOTH_UI_TOKEN"   # keeps the secret out of the process list


def settings(keys: dict) -> tuple[str, int, Path, str]:
    host = keys.get("host", "127.0.0.1")
    port = keys.get("port", DEFAULT_PORT)
    if not 0 <= port <= 65535:
        raise ConfigError("ui.port", f"is {port}, not a TCP port (0-65535)", "the default is 7860")
    token = keys.get("token", os.environ.get(TOKEN_ENV, ""))
    if token and len(token) < 16:
        raise ConfigError("ui.token", f"has {len(token)} characters; a token has at least 16",
                          "use a long random one, e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
    check_binding(host, token)
    return host, port, Path(keys.get("workspace", DEFAULT_WORKSPACE)).expanduser(), token


def url(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(keys: dict) -> int:
    try:
        import uvicorn  # noqa: F401

        from .app import create_app
    except ImportError as missing:
        raise ConfigError("ui", f"needs the studio's libraries ({missing.name} is not installed)",
                          "install them with pip install -c constraints.txt -e '.[ui]'") from None
    host, port, workspace, token = settings(keys)
    workspace.mkdir(parents=True, exist_ok=True)
    with locking.exclusive(workspace / "studio.db", "ui"):  # one server per workspace: one set of workers
        return run_server(create_app(workspace, host, token), host, port, token)


def run_server(app, host: str, port: int, token: str) -> int:
    import uvicorn

    # an open progress stream never ends by itself: after this many seconds a shutdown closes it
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)

    async def announce():  # the URL once the socket listens (port=0 picks a free one)
        while not server.started:
            await asyncio.sleep(0.05)
        bound = port
        for listener in server.servers:
            for sock in listener.sockets:
                bound = sock.getsockname()[1]
        print(f"lora-booth studio: {url(host, bound, token)}  (workspace {app.state.studio.workspace.root})",
              flush=True)

    async def main():
        task = asyncio.create_task(announce())
        await server.serve()
        task.cancel()

    asyncio.run(main())
    return 0
