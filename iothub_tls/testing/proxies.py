"""Real proxy processes for tests and benchmarks: tinyproxy (HTTP CONNECT, optionally
with Basic authentication) and Dante's ``danted`` (SOCKS4 and SOCKS5, optionally with
user name / password authentication), on free loopback ports.

Plain classes, no pytest, like :mod:`.brokers` (whose process handling they share):
each proxy runs from a private work directory with a generated configuration, listens
on 127.0.0.1 only, logs every request to a file in that directory (:attr:`log_text`) and
is stopped together with every process it spawned. A program that is not installed
raises :class:`~.brokers.MissingBinaryError`, naming the Debian package
(``tinyproxy``, ``dante-server``)::

    with TinyProxy(tmp / "tp", users={"alice": "s3cret"}, connect_ports=[hub_port]) as tp:
        client = MqttDeviceClient.from_connection_string(cs, proxy=tp.url("alice", "s3cret"))

    with Dante(tmp / "dante", allow_ports=[hub_port]) as socks:
        client = AmqpDeviceClient.from_connection_string(cs, proxy=socks.url())

Facts these classes rely on (Debian 12: tinyproxy 1.11.1, Dante 1.4.2):

* tinyproxy answers a CONNECT without valid credentials ``407 Proxy Authentication
  Required`` when ``BasicAuth`` lines are configured, and a CONNECT to a port no
  ``ConnectPort`` line allows ``403 Access violation`` (without any ``ConnectPort``
  line every port is allowed). Started as root it switches to ``User``/``Group``; the
  generated configuration keeps root so that it can write its log in the work directory.
* danted's ``socksmethod: username`` checks the system's password database (it has no
  password file of its own). ``Dante(users=...)`` therefore creates each user as a
  system account without a home or a login shell for the proxy's lifetime (root only;
  removed again by :meth:`Dante.stop`), and danted runs with ``user.privileged: root``
  to read ``/etc/shadow``. SOCKS4 has no authentication: with ``users`` only SOCKS5
  clients that authenticate get through.
"""

# ruff: noqa: S603, S607  (the proxies' own programs and useradd/userdel, arguments we build)

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from .brokers import BrokerError, _Process, _read, find_binary
from .ports import free_port, wait_port

__all__ = ["Dante", "ProxyProcessError", "TinyProxy"]


class ProxyProcessError(BrokerError):
    """A proxy could not be started (the message holds the end of its log)."""


def _is_root() -> bool:
    return os.geteuid() == 0


class _ProxyProcess:
    """What both proxies share: a work directory, one process, a port, a log."""

    binary = ""
    scheme = ""

    def __init__(self, workdir: str | os.PathLike[str], *, port: int = 0) -> None:
        self.workdir = Path(workdir)
        self.requested_port = port
        self.port = 0
        self._process: _Process | None = None
        self._log_offset = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.binary}.log"

    @property
    def log_text(self) -> str:
        """What the proxy logged since it started."""
        return _read(self.log_path, self._log_offset)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """The proxy's URL for a client (with these credentials, when given)."""
        auth = ""
        if user is not None:
            auth = quote(user, safe="")
            if password is not None:
                auth += ":" + quote(password, safe="")
            auth += "@"
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}"

    def _config(self) -> str:
        raise NotImplementedError

    def _argv(self, binary: str, config: Path) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before the process starts (system users, for Dante)."""

    def _cleanup(self) -> None:
        """After the process stopped."""

    def start(self, timeout: float = 10.0) -> None:
        binary = find_binary(self.binary)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.requested_port or self.port or free_port()
        config = self.workdir / f"{self.binary}.conf"
        self._prepare()
        try:
            config.write_text(self._config(), encoding="utf-8")
            self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._process = _Process(
                self._argv(binary, config),
                os.environ,
                self.workdir,
                self.workdir / f"{self.binary}.out",
            )
            try:
                wait_port(self.port, timeout, self._process.popen)
            except (TimeoutError, RuntimeError) as exc:
                output = _read(self.workdir / f"{self.binary}.out")[-2000:]
                raise ProxyProcessError(
                    f"{self.binary} did not start on 127.0.0.1:{self.port}: {exc}\n"
                    f"{output}\n{self.log_text[-2000:]}"
                ) from None
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self._process = self._process, None
        try:
            if process is not None:
                process.stop(10.0)
        finally:
            self._cleanup()

    def __enter__(self) -> _ProxyProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TinyProxy(_ProxyProcess):
    """tinyproxy: an HTTP proxy whose CONNECT opens tunnels.

    :param users: user name -> password for ``BasicAuth`` (None: no authentication).
    :param connect_ports: the ports CONNECT may reach (``ConnectPort``); None: every port.
    """

    binary = "tinyproxy"
    scheme = "http"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        users: Mapping[str, str] | None = None,
        connect_ports: Iterable[int] | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(workdir, port=port)
        self.users = dict(users or {})
        self.connect_ports = None if connect_ports is None else sorted(set(connect_ports))
        for user, password in self.users.items():
            if not user or any(c.isspace() for c in user + password) or not password:
                raise ValueError("tinyproxy BasicAuth users and passwords need no spaces")

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 120",
            "MaxClients 200",
            "Allow 127.0.0.1",
            "LogLevel Info",
            f'LogFile "{self.log_path}"',
            "DisableViaHeader Yes",
        ]
        if _is_root():
            lines += ["User root", "Group root"]
        lines += [f"BasicAuth {user} {password}" for user, password in self.users.items()]
        lines += [f"ConnectPort {port}" for port in self.connect_ports or ()]
        return "\n".join(lines) + "\n"

    def _argv(self, binary: str, config: Path) -> list[str]:
        return [binary, "-d", "-c", str(config)]


class Dante(_ProxyProcess):
    """Dante's SOCKS server (``danted``): SOCKS4 and SOCKS5 CONNECT.

    :param users: user name -> password: SOCKS5 user name / password authentication
        (``socksmethod: username``), with each user made a temporary system account
        (root only: :class:`ProxyProcessError` otherwise). None: no authentication.
    :param allow_ports: the destination ports on 127.0.0.1 tunnels may reach; every
        other destination is refused (SOCKS reply 2, "not allowed by ruleset"). None:
        every port on 127.0.0.0/8.
    """

    binary = "danted"
    scheme = "socks5"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        users: Mapping[str, str] | None = None,
        allow_ports: Iterable[int] | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(workdir, port=port)
        self.users = dict(users or {})
        self.allow_ports = None if allow_ports is None else sorted(set(allow_ports))
        self._accounts: list[str] = []
        #: user -> the system account made for it (a short name, random per proxy):
        #: what a client sends as its user name
        self.accounts = {user: f"itlsp{secrets.token_hex(4)}" for user in self.users}

    def url(self, user: str | None = None, password: str | None = None) -> str:
        """With ``user`` one of :attr:`users`, its system account name is sent."""
        return super().url(self.accounts.get(user, user) if user else user, password)

    def socks4_url(self) -> str:
        return f"socks4://127.0.0.1:{self.port}"

    def _prepare(self) -> None:
        if not self.users:
            return
        if not _is_root():
            raise ProxyProcessError(
                "Dante checks SOCKS5 user names and passwords against the system's accounts: "
                "users= needs root (to add temporary accounts)"
            )
        for user, password in self.users.items():
            account = self.accounts[user]
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    account,
                ],
                check=True,
                capture_output=True,
            )
            self._accounts.append(account)
            subprocess.run(
                ["chpasswd"],
                input=f"{account}:{password}\n".encode(),
                check=True,
                capture_output=True,
            )

    def _cleanup(self) -> None:
        while self._accounts:
            account = self._accounts.pop()
            subprocess.run(["userdel", account], check=False, capture_output=True)

    def _config(self) -> str:
        method = "username" if self.users else "none"
        lines = [
            f"logoutput: {self.log_path}",
            f"internal: 127.0.0.1 port = {self.port}",
            "external: 127.0.0.1",
            f"socksmethod: {method}",
            "clientmethod: none",
        ]
        if _is_root():
            lines += ["user.privileged: root", "user.unprivileged: nobody"]
        # one setting per line: a list value (command, log) runs to the end of its line
        lines += ["client pass {", "  from: 127.0.0.0/8 to: 0.0.0.0/0", "  log: error", "}"]
        destinations = (
            [f"127.0.0.1/32 port = {port}" for port in self.allow_ports]
            if self.allow_ports is not None
            else ["127.0.0.0/8"]
        )
        for destination in destinations:
            lines += [
                "socks pass {",
                f"  from: 127.0.0.0/8 to: {destination}",
                "  command: connect",
                "  log: connect disconnect error",
                "}",
            ]
        lines += ["socks block {", "  from: 0.0.0.0/0 to: 0.0.0.0/0", "  log: connect error", "}"]
        return "\n".join(lines) + "\n"

    def _argv(self, binary: str, config: Path) -> list[str]:
        return [binary, "-f", str(config), "-p", str(self.workdir / "danted.pid")]
