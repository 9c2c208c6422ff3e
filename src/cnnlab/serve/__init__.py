"""``cnnlab serve``: try run folders in a browser, or call them over HTTP.

``serve(runs)`` loads the runs (any problem is a CnnlabError before anything listens),
binds the address (a port in use is one too), prints the page's address on stderr once it
answers, and serves until SIGINT or SIGTERM, after which it finishes the requests in
flight and returns 0. ``create_app`` is the FastAPI app alone (``cnnlab.serve.app``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

import uvicorn

from cnnlab.device import choose_threads, free_cores, use_threads
from cnnlab.errors import CnnlabError
from cnnlab.serve.app import MAX_UPLOAD, UPLOAD_TIMEOUT, create_app

__all__ = ["MAX_UPLOAD", "UPLOAD_TIMEOUT", "create_app", "serve"]

GRACE_SECONDS = 5  # how long a stopping server waits for requests in flight


def serve(
    runs: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    queue_size: int = 32,
    max_upload: int = MAX_UPLOAD,
    workers: int = 1,
    threads: int | None = None,
    allow_hosts: Sequence[str] = (),
    upload_timeout: float = UPLOAD_TIMEOUT,
    max_memory: int | None = None,
    explore: str | None = None,
    explore_input: tuple[int, int, int] | None = None,
) -> int:
    """Serve ``runs`` at http://HOST:PORT/ (``port`` 0: a free one) until stopped; with
    ``explore`` (``cnnlab explore``), announce that model's explore page instead.

    ``threads`` is torch's thread count for each inference worker (default:
    ``default_threads``); the other arguments are ``create_app``'s. Returns 0 once stopped
    by a signal.
    """
    if not 0 <= port <= 65535:
        raise CnnlabError(f"--port {port}: expected 0 to 65535")
    threads = threads or default_threads(workers)
    if threads is not None:
        use_threads(threads)
    app = create_app(
        runs,
        queue_size,
        max_upload,
        workers,
        device=device,
        host=host,
        allow_hosts=allow_hosts,
        upload_timeout=upload_timeout,
        max_memory=max_memory,
        explore=explore,
        explore_input=explore_input,
    )
    listener = bind(host, port)
    url = page_url(host, listener.getsockname()[1])
    n = len(app.state.served)
    announce = (
        f"cnnlab serve: {n} run{'s' * (n != 1)} at {url} (API: {url}openapi.json; Ctrl-C stops)"
    )
    if explore is not None:
        page = f"{url}explore?model={urllib.parse.quote(explore, safe='')}"
        announce = f"cnnlab explore: {explore} at {page} (API: {url}openapi.json; Ctrl-C stops)"
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    server = Server(config, announce)
    if not _is_loopback(host):
        print(
            f"warning: {host} accepts connections from other machines and the server has no"
            " login: anyone who can reach it can use these runs",
            file=sys.stderr,
        )
    server.run(sockets=[listener])
    if not server.started:
        raise CnnlabError(f"{url}: the server did not start (see the messages above)")
    print("cnnlab serve: stopped", file=sys.stderr, flush=True)
    return 0


class Server(uvicorn.Server):
    """uvicorn's server, announcing itself once it answers, and stopped by SIGINT or
    SIGTERM without dying of them (uvicorn raises a caught signal again after shutting
    down, so the process would end with 130 or -15 rather than 0)."""

    def __init__(self, config: uvicorn.Config, announce: str) -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            print(self.announce, file=sys.stderr, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.app.state.stopping.set()  # uploads still arriving end now (a 503)
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in stops}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def default_threads(workers: int) -> int | None:
    """Torch threads per inference worker: the CPU rule (``cnnlab.device.cpu_plan``) over
    the cores free now, less one for the event loop (parsing and answering requests),
    shared among the workers; None (torch's own choice) when ``OMP_NUM_THREADS`` says. Each
    worker's forward passes start their own OpenMP team, and a team with more threads than
    free cores waits at every barrier for a thread the scheduler parked: on a busy 2-core
    machine a 1 ms ConvNet prediction took 38 ms with 2 threads."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return choose_threads(max(1, free_cores() - 1), workers)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``, or a CnnlabError saying why not."""
    listener = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        # Rebinding a port whose last server just stopped; a port in use still fails.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as error:
        if listener is not None:
            listener.close()
        raise CnnlabError(f"{host}:{port}: cannot listen ({error.strerror or error})") from None
    return listener


def page_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False
