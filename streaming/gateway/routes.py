"""Plain HTTP on the gateway's port: static files, and the responses the server builds.

The websockets library hands every request to the server's ``process_request``
first; a `Response` from there is sent instead of the WebSocket handshake. Static
files come from one folder (``streaming/gateway/static/`` by default): the URL
path is percent-decoded, every segment must be a plain name (no ``..``, no
``.``-prefixed names, no empty segments, no backslash or NUL), and the resolved
file must still lie inside the folder (symlinks included). Anything else is a 404
that says nothing about the file system.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["STATIC_DIR", "StaticFiles", "json_response", "response"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_STATIC_BYTES = 16 * 1024 * 1024

# Fixed types for what a dashboard ships; the system's mimetypes table is the fallback.
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
# Pages may load and connect to this origin only (ws/wss to it included).
_CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'"
)


def response(
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[str, str]] | None = None,
    head: bool = False,
) -> Response:
    """An HTTP response that closes the connection (the websockets server does not reuse it).

    Args:
        status: the status code.
        body: the body (sent only when not ``head``; its length is announced anyway).
        content_type: the Content-Type.
        extra: more headers.
        head: answer a HEAD request.
    """
    code = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            *(extra or []),
        ]
    )
    return Response(code.value, code.phrase, headers, b"" if head else body)


def json_response(
    status: int, obj: Any, extra: list[tuple[str, str]] | None = None, head: bool = False
) -> Response:
    """A JSON response."""
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return response(status, body, "application/json", extra, head)


class StaticFiles:
    """Files of one folder, served by URL path (``/`` is ``index.html``)."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.root = root.resolve()

    def resolve(self, url_path: str) -> Path | None:
        """The file a URL path names, or None when it names none that may be served."""
        try:
            decoded = unquote(url_path, errors="strict")
        except UnicodeDecodeError:
            return None
        if not decoded.startswith("/") or "\\" in decoded or "\x00" in decoded:
            return None
        relative = decoded[1:] or "index.html"
        parts = relative.split("/")
        if any(not p or p.startswith(".") for p in parts):
            return None  # "..", ".", hidden files, "//"
        candidate = self.root.joinpath(*parts)
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return None
        return resolved

    async def serve(self, url_path: str, head: bool = False) -> Response:
        """The file's response, or a 404."""
        path = self.resolve(url_path)
        if path is None:
            return not_found(head)
        try:
            if path.stat().st_size > MAX_STATIC_BYTES:
                return not_found(head)
            body = await asyncio.to_thread(path.read_bytes)  # not on the event loop
        except OSError:
            return not_found(head)
        kind = _TYPES.get(path.suffix.lower()) or (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        extra = [("Content-Security-Policy", _CSP)] if kind.startswith("text/html") else []
        return response(200, body, kind, extra, head)


def not_found(head: bool = False) -> Response:
    return json_response(404, {"error": "not_found"}, head=head)
