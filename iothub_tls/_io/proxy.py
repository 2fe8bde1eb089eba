"""Tunnels through proxies, for every transport: HTTP CONNECT (with optional Basic
authentication), SOCKS5 (with optional user name and password, RFC 1928 / RFC 1929),
SOCKS4 and SOCKS4a.

A device behind a proxy still speaks TLS to the hub: :func:`open_tunnel` only asks the
proxy for a TCP stream to ``host:port`` and returns the connected socket; the client
then runs its TLS handshake (with the hub's name in SNI and in verification) over it, so
the proxy sees nothing but the encrypted stream, and the policy is enforced end to end.

The proxy is configured by URL (``proxy=`` on every device client)::

    http://[user:password@]host:port      HTTP CONNECT (Basic authentication)
    socks5://[user:password@]host:port    SOCKS5, the hub's name resolved by the proxy
    socks4://host:port                    SOCKS4 (the hub's name resolved here)
    socks4a://host:port                   SOCKS4a (resolved by the proxy)
    env                                   HTTPS_PROXY / NO_PROXY of the environment

A malformed URL is a :class:`~iothub_tls.PolicyError` naming what is wrong. A proxy that
cannot be reached, refuses the tunnel or answers something else is a
:class:`~iothub_tls.ProxyError` naming the proxy (never its password); refused proxy
credentials are a :class:`~iothub_tls.ProxyAuthenticationError`.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ..errors import PolicyError, ProxyAuthenticationError, ProxyError

__all__ = [
    "PROXY_FROM_ENVIRONMENT",
    "Proxy",
    "check_proxy",
    "open_tunnel",
    "proxy_for",
]

#: ``proxy=PROXY_FROM_ENVIRONMENT`` (the string ``"env"``): use ``HTTPS_PROXY`` (or
#: ``https_proxy``) unless ``NO_PROXY`` (or ``no_proxy``) names the hub. Off by default:
#: a device never follows its environment's proxy without being asked to.
PROXY_FROM_ENVIRONMENT = "env"

_DEFAULT_PORTS = {"http": 3128, "socks5": 1080, "socks4": 1080, "socks4a": 1080}
_SCHEMES = tuple(_DEFAULT_PORTS)
#: The most an HTTP proxy's answer to CONNECT may take (status line and headers).
_MAX_HEAD = 16 * 1024

_SOCKS5_REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused by the destination",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
_SOCKS4_REPLIES = {
    91: "request rejected or failed",
    92: "request rejected: the proxy cannot reach identd on the client",
    93: "request rejected: identd reports a different user",
}


@dataclass(frozen=True)
class Proxy:
    """A parsed proxy URL. ``password`` never appears in its repr or in :attr:`url`."""

    scheme: str  # "http", "socks5", "socks4" or "socks4a"
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """``scheme://[user[:password]@]host[:port]``.

        :raises PolicyError: naming what is wrong with the URL (without its password).
        """
        if not isinstance(url, str) or not url.strip():
            raise PolicyError(
                f"proxy must be a URL such as 'http://proxy:3128' or 'socks5://proxy:1080' "
                f"(or {PROXY_FROM_ENVIRONMENT!r}), not {type(url).__name__}"
                if not isinstance(url, str)
                else "proxy is an empty string: pass a URL such as 'http://proxy:3128', or None"
            )
        text = url.strip()
        if "://" not in text:
            raise PolicyError(
                f"proxy {_redact(text)!r} has no scheme: write http://, socks5://, socks4:// "
                "or socks4a:// in front of host:port"
            )
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise PolicyError(f"proxy {_redact(text)!r} is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme == "https":
            raise PolicyError(
                f"proxy {_redact(text)!r}: TLS to the proxy itself (https://) is not "
                "supported; use http:// (the tunnel still carries TLS to the hub end to end)"
            )
        if scheme == "socks5h":
            scheme = "socks5"  # the hub's name is always resolved by a SOCKS5 proxy
        if scheme not in _SCHEMES:
            raise PolicyError(
                f"proxy {_redact(text)!r} has the unsupported scheme {parts.scheme!r}: use "
                "http, socks5, socks4 or socks4a"
            )
        if not parts.hostname:
            raise PolicyError(f"proxy {_redact(text)!r} names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise PolicyError(
                f"proxy {_redact(text)!r} has a path or query: a proxy URL is "
                "scheme://[user:password@]host:port only"
            )
        if port == 0:
            raise PolicyError(f"proxy {_redact(text)!r}: port 0 is not a port")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        if scheme in ("socks4", "socks4a") and password is not None:
            raise PolicyError(
                f"proxy {_redact(text)!r}: SOCKS4 has no passwords; use socks5:// for a "
                "proxy that asks for a user name and password"
            )
        if scheme == "socks5" and username is not None:
            if len(username.encode()) > 255 or len((password or "").encode()) > 255:
                raise PolicyError("a SOCKS5 user name and password are at most 255 bytes each")
        return cls(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme], username, password)

    @property
    def url(self) -> str:
        """The URL without the password (what messages and logs show)."""
        user = f"{self.username}:***@" if self.password is not None else (
            f"{self.username}@" if self.username is not None else ""
        )  # fmt: skip
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}"

    def __repr__(self) -> str:
        return f"Proxy({self.url!r})"

    __str__ = __repr__


def _redact(text: str) -> str:
    """A URL as it may be shown: the password (between ':' and '@' after the scheme)
    replaced by ***."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        rest, scheme = text, ""
    userinfo, at, hostport = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    return f"{scheme}{sep}{rest}" if sep else rest


def check_proxy(proxy: object) -> Proxy | str | None:
    """``proxy=`` as a client takes it: None, :data:`PROXY_FROM_ENVIRONMENT`, a URL or a
    :class:`Proxy`; URLs are parsed now (configuration errors before any I/O).

    :raises PolicyError: a malformed URL or a value of the wrong type.
    """
    if proxy is None or isinstance(proxy, Proxy):
        return proxy
    if isinstance(proxy, str) and proxy.strip().lower() == PROXY_FROM_ENVIRONMENT:
        return PROXY_FROM_ENVIRONMENT
    if not isinstance(proxy, str):
        raise PolicyError(
            f"proxy must be a URL string (http://, socks5://, socks4://), "
            f"{PROXY_FROM_ENVIRONMENT!r} or None, not {type(proxy).__name__}"
        )
    return Proxy.parse(proxy)


def proxy_for(
    proxy: object, host: str, port: int, environ: Mapping[str, str] | None = None
) -> Proxy | None:
    """The proxy to reach ``host:port`` through: ``proxy`` checked (:func:`check_proxy`);
    for :data:`PROXY_FROM_ENVIRONMENT`, ``HTTPS_PROXY`` unless ``NO_PROXY`` names the
    host (``*`` for every host, a domain and its subdomains, an address or a network in
    CIDR notation, each optionally with ``:port``).

    :raises PolicyError: a malformed URL (also one found in the environment).
    """
    checked = check_proxy(proxy)
    if checked != PROXY_FROM_ENVIRONMENT:
        return checked if isinstance(checked, Proxy) else None
    env = os.environ if environ is None else environ
    url = _getenv(env, "HTTPS_PROXY")
    if not url:
        return None
    if _bypassed(host, port, _getenv(env, "NO_PROXY") or ""):
        return None
    if "://" not in url:
        url = f"http://{url}"  # how curl and requests read a bare host:port
    try:
        return Proxy.parse(url)
    except PolicyError as exc:
        raise PolicyError(f"HTTPS_PROXY in the environment: {exc}") from None


def _getenv(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name.lower()) or env.get(name)
    return value.strip() if value else None


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` names ``host`` (curl's rules, plus networks in CIDR)."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, None
        if entry.startswith("["):  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest[1:] if rest.startswith(":") else None
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        if entry_port and entry_port != str(port):
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


# -- the tunnel --------------------------------------------------------------------------


async def open_tunnel(proxy: Proxy, host: str, port: int, *, timeout: float) -> socket.socket:
    """A non-blocking socket connected through ``proxy`` to ``host:port``, within
    ``timeout`` seconds (the TCP connection to the proxy and its answer together).

    :raises ProxyAuthenticationError: the proxy refused (or asked for) credentials.
    :raises ProxyError: the proxy could not be reached, refused the tunnel, or answered
        something that is not its protocol.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        return await asyncio.wait_for(_tunnel(proxy, host, port, deadline), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise ProxyError(
            proxy.url,
            f"the proxy {proxy.url} did not open a tunnel to {host}:{port} within {timeout:g} s",
        ) from None


async def _tunnel(proxy: Proxy, host: str, port: int, deadline: float) -> socket.socket:
    sock = await _connect(proxy)
    try:
        if proxy.scheme == "http":
            await _http_connect(sock, proxy, host, port)
        elif proxy.scheme == "socks5":
            await _socks5(sock, proxy, host, port)
        else:
            await _socks4(sock, proxy, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(proxy: Proxy) -> socket.socket:
    """TCP to the proxy (each of its addresses in turn)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ProxyError(
            proxy.url, f"could not resolve the proxy {proxy.url}: {exc.strerror or exc}"
        ) from None
    failures: list[str] = []
    for family, kind, number, _, address in infos:
        sock = socket.socket(family, kind, number)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            # (asyncio's message is "Connect call failed (...)": say what the errno says)
            failures.append(os.strerror(exc.errno) if exc.errno else str(exc))
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise ProxyError(
        proxy.url,
        f"could not connect to the proxy {proxy.url}: {'; '.join(failures) or 'no address'}"
        " (is the proxy running, and is its address right?)",
    )


async def _recv_exactly(sock: socket.socket, size: int, proxy: Proxy, what: str) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        try:
            chunk = await loop.sock_recv(sock, size - len(data))
        except OSError as exc:
            raise ProxyError(
                proxy.url, f"the connection to the proxy {proxy.url} failed {what}: {exc}"
            ) from None
        if not chunk:
            raise ProxyError(proxy.url, f"the proxy {proxy.url} closed the connection {what}")
        data += chunk
    return bytes(data)


async def _send(sock: socket.socket, data: bytes, proxy: Proxy) -> None:
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except OSError as exc:
        raise ProxyError(
            proxy.url, f"the connection to the proxy {proxy.url} failed: {exc}"
        ) from None


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _http_connect(sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    """``CONNECT host:port`` and the proxy's answer (RFC 9110 section 9.3.6)."""
    target = _authority(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.username is not None:
        credentials = f"{proxy.username}:{proxy.password or ''}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}")
    await _send(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), proxy)
    head = await _read_head(sock, proxy)
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProxyError(
            proxy.url,
            f"{proxy.url} is not an HTTP proxy: it answered CONNECT with {status_line[:60]!r}",
        )
    status = int(parts[1])
    reason = parts[2].strip() if len(parts) > 2 else ""
    said = f"HTTP {status}{f' {reason}' if reason else ''}"
    if 200 <= status < 300:
        return
    if status == 407 or (status == 401 and proxy.username is not None):
        # 407 is the standard answer; tinyproxy answers wrong credentials with 401
        if proxy.username is None:
            raise ProxyAuthenticationError(
                proxy.url,
                f"the proxy {proxy.url} requires authentication ({said}): put the user "
                "name and password in the proxy URL (http://user:password@host:port)",
                status=status,
            )
        raise ProxyAuthenticationError(
            proxy.url,
            f"the proxy {proxy.url} refused the credentials of {proxy.username!r} ({said}): "
            "check the user name and password in the proxy URL",
            status=status,
        )
    raise ProxyError(
        proxy.url,
        f"the proxy {proxy.url} refused to open a tunnel to {target} ({said})"
        + (
            ": the proxy may not allow CONNECT to that port (e.g. tinyproxy's ConnectPort, "
            "squid's SSL_ports)"
            if status in (403, 405)
            else ": the proxy could not reach the hub"
            if status in (502, 503, 504, 500)
            else ""
        ),
        status=status,
    )


async def _read_head(sock: socket.socket, proxy: Proxy) -> bytes:
    """The proxy's answer up to its blank line. Nothing else can come before the TLS
    handshake (the client speaks first), so bytes after it are a protocol error."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        try:
            chunk = await loop.sock_recv(sock, 4096)
        except OSError as exc:
            raise ProxyError(
                proxy.url, f"the connection to the proxy {proxy.url} failed: {exc}"
            ) from None
        if not chunk:
            raise ProxyError(
                proxy.url,
                f"the proxy {proxy.url} closed the connection without answering CONNECT",
            )
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            if end + 4 != len(data) and data.startswith(b"HTTP/1.1 2"):
                raise ProxyError(
                    proxy.url, f"the proxy {proxy.url} sent data after its answer to CONNECT"
                )
            return bytes(data[:end])
        if len(data) > _MAX_HEAD:
            raise ProxyError(
                proxy.url, f"the proxy {proxy.url} sent an answer to CONNECT over 16 KiB"
            )


async def _socks5(sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    """RFC 1928 CONNECT, with RFC 1929 user name / password when the URL has them."""
    methods = b"\x00\x02" if proxy.username is not None else b"\x00"
    await _send(sock, b"\x05" + bytes([len(methods)]) + methods, proxy)
    version, method = await _recv_exactly(sock, 2, proxy, "during the SOCKS5 greeting")
    if version != 5:
        raise ProxyError(
            proxy.url, f"{proxy.url} is not a SOCKS5 proxy (it answered version {version})"
        )
    if method == 0xFF:
        raise ProxyAuthenticationError(
            proxy.url,
            f"the SOCKS5 proxy {proxy.url} accepts none of the offered authentication "
            + (
                "methods (none, user name/password)"
                if proxy.username is not None
                else "methods (none): it requires a user name and password "
                "(socks5://user:password@host:port)"
            ),
        )
    if method == 2:
        if proxy.username is None:  # pragma: no cover - the proxy chose what we did not offer
            raise ProxyError(proxy.url, f"the SOCKS5 proxy {proxy.url} chose a method not offered")
        user = proxy.username.encode()
        secret = (proxy.password or "").encode()
        await _send(
            sock, b"\x01" + bytes([len(user)]) + user + bytes([len(secret)]) + secret, proxy
        )
        _, status = await _recv_exactly(sock, 2, proxy, "during SOCKS5 authentication")
        if status != 0:
            raise ProxyAuthenticationError(
                proxy.url,
                f"the SOCKS5 proxy {proxy.url} refused the credentials of "
                f"{proxy.username!r}: check the user name and password in the proxy URL",
                status=status,
            )
    elif method != 0:
        raise ProxyError(
            proxy.url, f"the SOCKS5 proxy {proxy.url} chose method {method}, which was not offered"
        )
    await _send(sock, b"\x05\x01\x00" + _socks5_address(host) + port.to_bytes(2, "big"), proxy)
    head = await _recv_exactly(sock, 4, proxy, "before answering SOCKS5 CONNECT")
    if head[0] != 5:
        raise ProxyError(proxy.url, f"the SOCKS5 proxy {proxy.url} answered CONNECT malformed")
    reply = head[1]
    if reply != 0:
        why = _SOCKS5_REPLIES.get(reply, f"reply code {reply}")
        raise ProxyError(
            proxy.url,
            f"the SOCKS5 proxy {proxy.url} refused to open a tunnel to "
            f"{_authority(host, port)}: {why}"
            + (" (its rules do not allow this destination)" if reply == 2 else ""),
            status=reply,
        )
    kind = head[3]
    size = {1: 4, 4: 16}.get(kind)
    if size is None:
        (size,) = await _recv_exactly(sock, 1, proxy, "in its SOCKS5 answer")
    await _recv_exactly(sock, size + 2, proxy, "in its SOCKS5 answer")  # the bound address


def _socks5_address(host: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        if len(name) > 255:
            raise PolicyError(f"host name {host[:40]!r}... is too long for SOCKS5") from None
        return b"\x03" + bytes([len(name)]) + name  # resolved by the proxy
    return (b"\x01" if address.version == 4 else b"\x04") + address.packed


async def _socks4(sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    """SOCKS4 CONNECT (an IPv4 address, resolved here) or SOCKS4a (the name, resolved
    by the proxy)."""
    user = (proxy.username or "").encode()
    try:
        address = ipaddress.ip_address(host)
        if address.version != 4:
            raise ProxyError(proxy.url, f"SOCKS4 cannot reach the IPv6 address {host}")
        request = address.packed + user + b"\x00"
    except ValueError:
        if proxy.scheme == "socks4a":
            request = b"\x00\x00\x00\x01" + user + b"\x00" + host.encode("idna") + b"\x00"
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, family=socket.AF_INET)
            except OSError as exc:
                raise ProxyError(
                    proxy.url, f"could not resolve {host} for the SOCKS4 proxy {proxy.url}: {exc}"
                ) from None
            request = socket.inet_aton(str(infos[0][4][0])) + user + b"\x00"
    await _send(sock, b"\x04\x01" + port.to_bytes(2, "big") + request, proxy)
    answer = await _recv_exactly(sock, 8, proxy, "before answering SOCKS4 CONNECT")
    if answer[0] != 0:
        raise ProxyError(proxy.url, f"{proxy.url} is not a SOCKS4 proxy")
    if answer[1] != 90:
        why = _SOCKS4_REPLIES.get(answer[1], f"reply code {answer[1]}")
        raise ProxyError(
            proxy.url,
            f"the SOCKS4 proxy {proxy.url} refused to open a tunnel to "
            f"{_authority(host, port)}: {why}",
            status=answer[1],
        )
