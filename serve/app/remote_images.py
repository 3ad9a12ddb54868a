"""Fetching ``http(s)`` image URLs safely, where the config enables it (it is off by default).

Each hop (redirects included, at most three) is checked before any byte is sent: the scheme, the host
against the allowlist, and every address the host resolves to against loopback, private, link-local (the
cloud metadata service), multicast and reserved ranges. The connection then goes to the checked address
(the ``Host`` header and TLS name stay the host's), so a DNS answer cannot change between check and use.
Size, time and content type are capped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from serve.app.config import HTTPConfig
from serve.errors import InvalidImage, InvalidRequest, PayloadTooLarge

MAX_REDIRECTS = 3


def forbidden_address(address: str) -> bool:
    """True for addresses a server-side fetch must never reach.

    >>> [forbidden_address(a) for a in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "8.8.8.8")]
    [True, True, True, True, False]
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def fetch_image(url: str, config: HTTPConfig, max_bytes: int) -> bytes:
    """The bytes of a remote image; raises ``InvalidRequest``/``InvalidImage``/``PayloadTooLarge``."""
    if not config.allow_remote_images:
        raise InvalidRequest(
            "image URLs are disabled on this server; send the image as a base64 data URI", param="image_url"
        )
    try:
        return await asyncio.wait_for(_follow(url, config, max_bytes), config.remote_image_timeout_s)
    except asyncio.TimeoutError:
        raise InvalidImage(
            f"the image URL did not answer within {config.remote_image_timeout_s:g} s", param="image_url"
        ) from None
    except httpx.HTTPError as exc:
        raise InvalidImage(f"the image URL could not be fetched ({type(exc).__name__})", param="image_url") from None


async def _follow(url: str, config: HTTPConfig, max_bytes: int) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        data, location = await _fetch_once(url, config, max_bytes)
        if location is None:
            return data
        url = urljoin(url, location)
    raise InvalidImage(f"the image URL redirected more than {MAX_REDIRECTS} times", param="image_url")


async def _fetch_once(url: str, config: HTTPConfig, max_bytes: int) -> tuple[bytes, str | None]:
    """One hop: the body, or the redirect target."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequest("image URLs must be http or https URLs with a host", param="image_url")
    if config.remote_image_hosts and host not in config.remote_image_hosts:
        raise InvalidRequest(f"the host {host!r} is not on this server's image allowlist", param="image_url")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = await _checked_address(host, port, config.allow_private_addresses)
    netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
    async with (
        httpx.AsyncClient(follow_redirects=False, trust_env=False) as client,
        client.stream("GET", target, headers=headers, extensions={"sni_hostname": host}) as response,
    ):
        if response.is_redirect:
            return b"", response.headers.get("location", "")
        if response.status_code != 200:
            raise InvalidImage(f"the image URL answered HTTP {response.status_code}", param="image_url")
        kind = response.headers.get("content-type", "")
        if not kind.startswith("image/"):
            raise InvalidImage(f"the image URL sent {kind or 'no content type'}, not an image", param="image_url")
        declared = int(response.headers.get("content-length") or 0)
        if declared > max_bytes:
            raise PayloadTooLarge(f"the remote image is {declared} bytes; the limit is {max_bytes}", param="image_url")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > max_bytes:
                raise PayloadTooLarge(f"the remote image exceeds the limit of {max_bytes} bytes", param="image_url")
        return bytes(body), None


async def _checked_address(host: str, port: int, allow_private: bool) -> str:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InvalidImage(f"the image host {host!r} does not resolve", param="image_url") from None
    addresses = sorted({info[4][0] for info in infos})
    if not allow_private and any(forbidden_address(a) for a in addresses):
        raise InvalidRequest(
            f"the image host {host!r} resolves to a private, loopback or link-local address; refused",
            param="image_url",
        )
    return addresses[0]
