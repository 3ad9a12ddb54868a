"""Remote image URLs against a local server: off by default, allowlist, private ranges, redirects, caps."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.app.config import HTTPConfig
from serve.app.remote_images import fetch_image
from serve.errors import InvalidImage, InvalidRequest, PayloadTooLarge
from tests.helpers import encode, photo

PNG = encode(photo(32, 32), "PNG")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {
            "/cat.png": (200, "image/png", PNG),
            "/page": (200, "text/html", b"<html></html>"),
            "/missing": (404, "text/plain", b"no"),
        }
        if self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        elif self.path == "/away":
            self.send_response(302)
            self.send_header("Location", "http://localhost.example.invalid/cat.png")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(2)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(b"x" * 200_000)
        else:
            status, kind, body = routes[self.path]
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


LOCAL = HTTPConfig(
    allow_remote_images=True, allow_private_addresses=True, remote_image_hosts=["127.0.0.1"], remote_image_timeout_s=1
)


def fetch(url: str, config: HTTPConfig = LOCAL, max_bytes: int = 100_000) -> bytes:
    return asyncio.run(fetch_image(url, config, max_bytes))


def test_fetches_an_image_and_follows_a_redirect(server):
    assert fetch(f"{server}/cat.png") == PNG
    assert fetch(f"{server}/hop") == PNG


def test_off_by_default(server):
    with pytest.raises(InvalidRequest, match="disabled"):
        fetch(f"{server}/cat.png", HTTPConfig())


def test_private_addresses_are_refused_even_when_enabled(server):
    enabled = HTTPConfig(allow_remote_images=True)
    for url in [f"{server}/cat.png", "http://localhost:9/cat.png", "http://169.254.169.254/latest/meta-data/"]:
        with pytest.raises(InvalidRequest, match="private, loopback or link-local"):
            fetch(url, enabled)


def test_allowlist_applies_to_every_hop(server):
    with pytest.raises(InvalidRequest, match="allowlist"):
        fetch(f"{server}/away")
    other = LOCAL.model_copy(update={"remote_image_hosts": ["images.example.com"]})
    with pytest.raises(InvalidRequest, match="allowlist"):
        fetch(f"{server}/cat.png", other)


@pytest.mark.parametrize(
    ("path", "error", "words"),
    [
        ("/page", InvalidImage, "not an image"),
        ("/missing", InvalidImage, "HTTP 404"),
        ("/loop", InvalidImage, "redirected more than"),
        ("/slow", InvalidImage, "did not answer within"),
        ("/big", PayloadTooLarge, "exceeds the limit"),
    ],
)
def test_caps_and_content_checks(server, path, error, words):
    with pytest.raises(error, match=words):
        fetch(f"{server}{path}")


def test_only_http_schemes(server):
    for url in ["ftp://127.0.0.1/cat.png", "file:///etc/passwd", "http:///nohost"]:
        with pytest.raises(InvalidRequest):
            fetch(url)
