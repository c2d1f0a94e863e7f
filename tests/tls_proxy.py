"""A TLS-terminating TCP proxy for the tests: TLS on a loopback port, plaintext to
a target (the embedded Tansu broker, which speaks plaintext only).

It runs its own event loop in a thread, so a test's loop, a session fixture's, or
a blocking ``EmbeddedKafka.start()`` never stall it. The listening socket is bound
in the constructor: its port is known before the broker behind it starts (Tansu
must advertise it).

    proxy = TlsProxy(("127.0.0.1", kafka.port), pki.server_cert, pki.server_key)
    with proxy:
        ...  # clients connect to proxy.address with TLS

``client_ca``: require a client certificate signed by that CA (mutual TLS).
``handshakes`` counts completed TLS handshakes, so a test can tell that its
traffic really went through TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

_CHUNK_BYTES = 65_536


class TlsProxy:
    """TLS on ``host``:``port`` (0: a free one), forwarded to ``target`` in plaintext."""

    def __init__(
        self,
        target: tuple[str, int],
        certfile: Path,
        keyfile: Path,
        *,
        client_ca: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.target = target
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certfile), str(keyfile))
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cafile=str(client_ca))
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.handshakes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``host:port``, for ``bootstrap_servers`` or a Redis URL."""
        return f"{self.host}:{self.port}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="tls-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inside the proxy's thread ----------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._accept, sock=self._sock, ssl=self.context)
        self._ready.set()
        async with server:
            await self._stopped.wait()
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the TLS handshake is done when this runs (a failed one never gets here)
        self.handshakes += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error on either side, then close the writing side."""
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while data := await reader.read(_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
