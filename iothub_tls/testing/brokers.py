"""Real broker processes for test suites and benchmarks: Mosquitto and RabbitMQ on free
loopback ports.

Plain classes, no pytest (this project's ``tests/brokers.py`` adds the skip logic). Every
broker runs from a private work directory with a generated configuration, listens on
127.0.0.1 only, and is stopped together with every process it spawned. A binary that is
not installed raises :class:`MissingBinaryError`, naming the Debian package.

Typical use, with certificates from :mod:`iothub_tls.testing.pki`::

    files = CertificateAuthority.root("Test Root").server("localhost").write(tmp, "server")
    listener = MosquittoListener(tls=True, certfile=files.certificate,
                                 keyfile=files.private_key)
    with Mosquitto([listener], workdir=tmp / "mosq") as mosq:
        connect("127.0.0.1", mosq.port)

    with RabbitMQ(workdir=tmp / "rmq", certfile=files.certificate,
                  keyfile=files.private_key, users={"alice": "secret"}) as rabbit:
        connect("127.0.0.1", rabbit.amqps_port)        # AMQP 1.0 (and 0-9-1) over TLS

Facts this module relies on (Debian 12: mosquitto 2.0.11, RabbitMQ 3.10.8, Erlang/OTP 25.2,
OpenSSL 3.0):

* Mosquitto's ``tls_version`` is a *minimum* since 2.0 and there is no per-listener
  maximum. :attr:`MosquittoListener.tls_max_version` is implemented with a private
  ``OPENSSL_CONF`` (``MaxProtocol``), which OpenSSL applies to every ``SSL_CTX`` of the
  process, so all TLS listeners of one :class:`Mosquitto` must agree on it. OpenSSL 3
  refuses TLS 1.0/1.1 at security level >= 1 (their handshake signatures use SHA-1 /
  MD5-SHA1), so a legacy ``tls_version``/``tls_max_version`` appends ``@SECLEVEL=0``
  to the listener's cipher string (without it a TLS 1.1 handshake ends in an
  ``internal_error`` alert). mosquitto 2.0.11 also refuses to start when *every*
  listener is a websockets one; a closed MQTT listener is added in that case.
* RabbitMQ runs through the real start script (``/usr/lib/rabbitmq/bin/rabbitmq-server``
  on Debian) rather than the ``/usr/sbin`` wrapper, which would ``su rabbitmq`` and lose
  our environment. Erlang's ``ssl`` accepts cipher suites by OpenSSL name
  (``ECDHE-RSA-AES128-GCM-SHA256``) *and* by IANA/RFC name
  (``TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256``); an unknown name makes the TLS listener
  fail to start (reported as a start-up error). OTP 25 still implements TLS 1.1 when
  ``versions`` asks for it, and accepts legacy suites (RSA key exchange, DHE, CBC-SHA1)
  when they are listed explicitly.
"""

# ruff: noqa: S603  (the brokers' own programs, found by find_binary, with arguments we build)

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from .ports import free_port, port_open, wait_port

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_TLS13_SUITES",
    "MARKER_ENV",
    "BrokerError",
    "MissingBinaryError",
    "Mosquitto",
    "MosquittoListener",
    "RabbitMQ",
    "find_binary",
    "rabbitmq_password_hash",
    "rabbitmq_version",
]

#: Which Debian package provides which binary (for the skip message).
APT_PACKAGES: dict[str, str] = {
    "mosquitto": "mosquitto",
    "mosquitto_passwd": "mosquitto",
    "mosquitto_pub": "mosquitto-clients",
    "mosquitto_sub": "mosquitto-clients",
    "rabbitmq-server": "rabbitmq-server",
    "rabbitmqctl": "rabbitmq-server",
    "epmd": "erlang-base",
    "erl": "erlang-base",
    "openssl": "openssl",
    # the proxies of .proxies
    "tinyproxy": "tinyproxy",
    "danted": "dante-server",
}

#: Environment variable put into every process we spawn; :meth:`_Process.sweep` kills
#: whatever still carries our value of it (children that re-parented or daemonised).
MARKER_ENV = "ITLS_TEST_BROKER_ID"

_TLS_MAX_TO_OPENSSL = {
    "tlsv1": "TLSv1",
    "tlsv1.1": "TLSv1.1",
    "tlsv1.2": "TLSv1.2",
    "tlsv1.3": "TLSv1.3",
}
_LEGACY_TLS = {"tlsv1", "tlsv1.1"}

#: The TLS 1.3 suites added to an explicit RabbitMQ cipher list when TLS 1.3 is enabled.
DEFAULT_TLS13_SUITES: tuple[str, ...] = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
)


class BrokerError(RuntimeError):
    """A broker could not be started, or a management command failed."""


# --------------------------------------------------------------------------- utilities


class MissingBinaryError(BrokerError, FileNotFoundError):
    """A program a broker needs is not installed."""

    def __init__(self, name: str) -> None:
        #: the program, and the Debian package that provides it
        self.name, self.package = name, APT_PACKAGES.get(name, name)
        super().__init__(f"{name} not installed: apt-get install {self.package}")


def find_binary(name: str) -> str:
    """The path of executable ``name``: on ``PATH``, else in ``/usr/sbin`` or RabbitMQ's
    ``/usr/lib/rabbitmq/bin`` (where Debian puts the brokers).

    :raises MissingBinaryError: when it is nowhere, naming the package to install.
    """
    path = shutil.which(name)
    if path is None:
        for extra in ("/usr/sbin", "/usr/lib/rabbitmq/bin"):
            candidate = Path(extra) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                path = str(candidate)
                break
    if path is None:
        raise MissingBinaryError(name)
    return path


def _pids_with_marker(value: str) -> list[int]:
    """PIDs of live processes whose environment holds ``MARKER_ENV=value``."""
    needle = f"{MARKER_ENV}={value}".encode()
    found: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path("/proc", entry, "environ").read_bytes()
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # Zombies keep no environment worth sweeping; skip state "Z".
        if needle in environ.split(b"\0") and stat.rsplit(")", 1)[-1].split()[0] != "Z":
            found.append(int(entry))
    return found


def _read(path: Path, offset: int = 0) -> str:
    """The text of ``path`` from byte ``offset`` on ("" when missing)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class _Process:
    """One broker process we own, in its own session, tagged with a marker env var."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, output: Path
    ) -> None:
        self.marker = secrets.token_hex(8)
        full_env = dict(env)
        full_env[MARKER_ENV] = self.marker
        self._out = output.open("ab")
        try:
            self.popen = subprocess.Popen(
                list(argv),
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # our own process group: killpg reaches children
            )
        except BaseException:
            self._out.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; then sweep leftovers."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self.sweep()
        self._out.close()

    def sweep(self) -> None:
        """SIGKILL every process still carrying our marker (daemonised grandchildren)."""
        for _ in range(50):
            pids = _pids_with_marker(self.marker)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def leftovers(self) -> list[int]:
        return _pids_with_marker(self.marker)


#: Running brokers (strong references: an unreferenced broker is still stopped at exit).
_LIVE: set[_Broker] = set()


@atexit.register
def _stop_all() -> None:  # pragma: no cover - safety net for aborted sessions
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop()


class _Broker:
    """Context-manager plumbing shared by both brokers."""

    def start(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Broker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- Mosquitto


@dataclass
class MosquittoListener:
    """One ``listener`` block of a generated ``mosquitto.conf`` (always on 127.0.0.1).

    ``port=0`` picks a free port when the broker first starts (kept across restarts).
    Paths may be ``str`` or ``Path``; ``certfile`` is the server chain PEM (leaf first),
    ``cafile`` the CA(s) that sign client certificates. ``tls_version`` is mosquitto's own
    option, a *minimum* (``"tlsv1.1"``, ``"tlsv1.2"``, ``"tlsv1.3"``). ``tls_max_version``
    is not a mosquitto option: see the module docstring (process-wide ``OPENSSL_CONF``).
    ``ciphers`` (OpenSSL names, ``:``-separated) governs TLS <= 1.2, ``ciphers_tls13``
    (``TLS_AES_128_GCM_SHA256:...``) TLS 1.3. ``password_file=True`` points the listener
    at the broker's generated password file (built from ``Mosquitto(users=...)``).
    WebSockets listeners support only certfile/keyfile/cafile/ciphers/ciphers_tls13 for
    TLS (a mosquitto limitation).
    """

    port: int = 0
    tls: bool = False
    certfile: str | Path | None = None
    keyfile: str | Path | None = None
    cafile: str | Path | None = None
    require_certificate: bool = False
    use_identity_as_username: bool = False
    tls_version: str | None = None
    tls_max_version: str | None = None
    ciphers: str | None = None
    ciphers_tls13: str | None = None
    dhparamfile: str | Path | None = None
    protocol: Literal["mqtt", "websockets"] = "mqtt"
    password_file: bool = False
    allow_anonymous: bool = True

    def config_lines(self, password_file: Path | None, acl_file: Path | None) -> list[str]:
        """The ``listener`` block for ``mosquitto.conf`` (``per_listener_settings true``)."""
        if self.port <= 0:
            raise ValueError("listener port must be resolved before writing the config")
        lines = [f"listener {self.port} 127.0.0.1", f"protocol {self.protocol}"]
        if self.protocol == "mqtt":
            lines.append("socket_domain ipv4")
        lines.append(f"allow_anonymous {'true' if self.allow_anonymous else 'false'}")
        if self.password_file:
            if password_file is None:
                raise ValueError("password_file=True needs Mosquitto(users={...})")
            lines.append(f"password_file {password_file}")
        if acl_file is not None:
            lines.append(f"acl_file {acl_file}")
        if self.tls:
            if not (self.certfile and self.keyfile):
                raise ValueError("a TLS listener needs certfile and keyfile")
            lines += [
                f"certfile {Path(self.certfile).resolve()}",
                f"keyfile {Path(self.keyfile).resolve()}",
            ]
            if self.cafile:
                lines.append(f"cafile {Path(self.cafile).resolve()}")
            if self.dhparamfile:
                lines.append(f"dhparamfile {Path(self.dhparamfile).resolve()}")
            if self.protocol == "mqtt":
                lines.append(
                    f"require_certificate {'true' if self.require_certificate else 'false'}"
                )
                if self.use_identity_as_username:
                    lines.append("use_identity_as_username true")
                if self.tls_version:
                    lines.append(f"tls_version {self.tls_version}")
            elif self.require_certificate or self.use_identity_as_username or self.tls_version:
                raise ValueError(
                    "mosquitto websockets listeners do not support "
                    "require_certificate/use_identity_as_username/tls_version"
                )
            ciphers = self.ciphers
            legacy = self.tls_version in _LEGACY_TLS or self.tls_max_version in _LEGACY_TLS
            if legacy and "@SECLEVEL" not in (ciphers or ""):
                ciphers = f"{ciphers or 'DEFAULT'}:@SECLEVEL=0"
            if ciphers:
                lines.append(f"ciphers {ciphers}")
            if self.ciphers_tls13:
                lines.append(f"ciphers_tls1.3 {self.ciphers_tls13}")
        elif self.require_certificate or self.use_identity_as_username or self.tls_version:
            raise ValueError("certificate options need tls=True")
        return lines


class Mosquitto(_Broker):
    """A private ``mosquitto`` process with a generated configuration.

    ``users`` fills a password file (``mosquitto_passwd -b``) used by listeners with
    ``password_file=True``; ``acl`` is the text of an ACL file applied to every listener.
    Persistence lives in ``workdir/persist`` so :meth:`restart` keeps retained messages
    and persistent sessions; the log (``log_type all``) is ``workdir/mosquitto.log``.
    """

    def __init__(
        self,
        listeners: Iterable[MosquittoListener],
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        persistence: bool = True,
        workdir: Path,
        extra_config: Sequence[str] = (),
    ) -> None:
        self.listeners: list[MosquittoListener] = [dataclasses.replace(x) for x in listeners]
        if not self.listeners:
            raise ValueError("at least one listener is needed")
        self.users: dict[str, str] = dict(users or {})
        self.acl = acl
        self.persistence = persistence
        self.workdir = Path(workdir).resolve()
        self.extra_config = list(extra_config)
        self._auto_ports = [x.port <= 0 for x in self.listeners]
        self._proc: _Process | None = None
        self._placeholder_port = 0
        self.startup_seconds: float | None = None
        maxes = {x.tls_max_version for x in self.listeners if x.tls}
        if len(maxes) > 1:
            raise ValueError(
                "tls_max_version is process-wide in mosquitto (OpenSSL MaxProtocol); all "
                f"TLS listeners of one broker must agree, got {sorted(map(str, maxes))}"
            )
        self.tls_max_version: str | None = maxes.pop() if maxes else None
        if self.tls_max_version and self.tls_max_version not in _TLS_MAX_TO_OPENSSL:
            raise ValueError(f"unknown tls_max_version {self.tls_max_version!r}")

    # paths --------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def output_path(self) -> Path:
        """stdout/stderr of the process (configuration errors land here)."""
        return self.workdir / "mosquitto.out"

    @property
    def password_path(self) -> Path:
        return self.workdir / "passwd"

    @property
    def port(self) -> int:
        """Port of the first listener."""
        return self.listeners[0].port

    @property
    def ports(self) -> list[int]:
        return [x.port for x in self.listeners]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.alive()

    # lifecycle ----------------------------------------------------------------------
    def _resolve_ports(self, fresh: bool) -> None:
        if fresh:
            self._placeholder_port = 0
        taken: set[int] = set()
        for listener, auto in zip(self.listeners, self._auto_ports, strict=True):
            if auto and (fresh or listener.port <= 0):
                port = free_port()
                while port in taken:
                    port = free_port()
                listener.port = port
            taken.add(listener.port)

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "persist").mkdir(exist_ok=True)
        password_file: Path | None = None
        if self.users:
            passwd = find_binary("mosquitto_passwd")
            self.password_path.unlink(missing_ok=True)
            self.password_path.touch(mode=0o600)
            for user, password in self.users.items():
                subprocess.run(
                    [passwd, "-b", str(self.password_path), user, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            password_file = self.password_path
        acl_file: Path | None = None
        if self.acl is not None:
            acl_file = self.workdir / "acl"
            acl_file.write_text(self.acl if self.acl.endswith("\n") else self.acl + "\n")
        lines = [
            "# generated by iothub_tls.testing.brokers",
            "per_listener_settings true",
            "user root" if os.geteuid() == 0 else "# not root: no user switch",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir / 'persist'}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp true",
            "connection_messages true",
            "",
        ]
        for listener in self.listeners:
            lines += listener.config_lines(password_file, acl_file)
            lines.append("")
        if all(x.protocol == "websockets" for x in self.listeners):
            # mosquitto 2.0.11 exits with "Unable to start any listening sockets" when
            # every listener is a websockets one: add a closed (no-anonymous) MQTT one.
            if not self._placeholder_port:
                self._placeholder_port = free_port()
            lines += [
                "# workaround: mosquitto 2.0.x needs one non-websockets listener",
                f"listener {self._placeholder_port} 127.0.0.1",
                "socket_domain ipv4",
                "allow_anonymous false",
                "",
            ]
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")
        if self.tls_max_version:
            self._write_openssl_conf()

    def _write_openssl_conf(self) -> None:
        assert self.tls_max_version is not None
        maximum = _TLS_MAX_TO_OPENSSL[self.tls_max_version]
        seclevel = 0 if self.tls_max_version in _LEGACY_TLS else 1
        (self.workdir / "openssl.cnf").write_text(
            "openssl_conf = openssl_init\n"
            "[openssl_init]\nssl_conf = ssl_sect\n"
            "[ssl_sect]\nsystem_default = system_default_sect\n"
            "[system_default_sect]\n"
            "MinProtocol = TLSv1\n"
            f"MaxProtocol = {maximum}\n"
            f"CipherString = DEFAULT:@SECLEVEL={seclevel}\n"
        )

    def start(self, timeout: float = 10.0) -> None:
        """Write the configuration, launch ``mosquitto -c`` and wait for every port."""
        if self.running():
            raise BrokerError("mosquitto is already running")
        binary = find_binary("mosquitto")
        first_start = self.startup_seconds is None
        attempts = 3 if first_start and any(self._auto_ports) else 1
        for attempt in range(attempts):
            self._resolve_ports(fresh=attempt > 0)
            self._write_files()
            env = dict(os.environ)
            if self.tls_max_version:
                env["OPENSSL_CONF"] = str(self.workdir / "openssl.cnf")
            began = time.monotonic()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            out_offset = self.output_path.stat().st_size if self.output_path.exists() else 0
            self._proc = _Process(
                [binary, "-c", str(self.config_path)], env, self.workdir, self.output_path
            )
            try:
                self._wait_ready(timeout, log_offset)
            except BrokerError as error:
                proc = self._proc
                self._proc = None
                proc.stop(2)
                new = _read(self.log_path, log_offset) + _read(self.output_path, out_offset)
                if attempt + 1 < attempts and "in use" in new:
                    continue  # lost a port race: pick fresh ports and retry
                raise BrokerError(f"{error}\n--- mosquitto log ---\n{self.log_text()}") from None
            self.startup_seconds = time.monotonic() - began
            _LIVE.add(self)
            return

    def _wait_ready(self, timeout: float, log_offset: int) -> None:
        """Wait for the "running" log line, written once every listener is set up (the
        sockets are bound *before* certificates load, so an open port alone proves
        nothing). No port is probed: a TCP connection closed without a TLS handshake is
        logged by the broker as a protocol error, which tests and benchmarks count."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self._proc.alive():
                raise BrokerError(
                    f"mosquitto exited with status {self._proc.popen.returncode} at start-up"
                )
            log = _read(self.log_path, log_offset)
            if " running" in log and "mosquitto version" in log:
                return
            if time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not log that it is running in {timeout:g} s")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence database), then reap everything."""
        if self._proc is not None:
            self._proc.stop(timeout)
            self._proc = None
        _LIVE.discard(self)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same ports with the same persistence database."""
        self.stop()
        self.start(timeout)

    def leftover_pids(self) -> list[int]:
        """Processes of the last run still alive (empty after :meth:`stop`)."""
        return self._proc.leftovers() if self._proc else []

    def log_text(self) -> str:
        """The broker log, plus anything the process printed (config errors)."""
        out = _read(self.output_path)
        return _read(self.log_path) + (f"\n--- stdout/stderr ---\n{out}" if out else "")

    def __enter__(self) -> Mosquitto:
        self.start()
        return self


# --------------------------------------------------------------------------- RabbitMQ


def rabbitmq_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` format (for definitions files)."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def _real_script(found: str, name: str) -> Path:
    """Follow Debian's ``su rabbitmq`` wrapper in /usr/sbin to the real script."""
    path = Path(found).resolve()
    if path.name == "rabbitmq-script-wrapper" and (path.parent / name).exists():
        return (path.parent / name).resolve()
    return path


def _rabbit_script(name: str) -> str:
    """The real RabbitMQ script (:class:`MissingBinaryError` when missing)."""
    return str(_real_script(find_binary(name), name))


def rabbitmq_version() -> tuple[int, int, int] | None:
    """Version of the installed RabbitMQ, from its install path (no Erlang VM boot);
    ``None`` when not installed or the layout is unknown."""
    found = shutil.which("rabbitmq-server") or shutil.which("rabbitmq-server", path="/usr/sbin")
    if found is None:
        return None
    real = _real_script(found, "rabbitmq-server")
    match = re.search(r"rabbitmq_server-(\d+)\.(\d+)\.(\d+)", str(real))
    if match is None:
        return None
    major, minor, patch = (int(x) for x in match.groups())
    return major, minor, patch


#: Log lines that mean the boot will not complete (the node may keep running without
#: its listener, e.g. after an unknown cipher name in ``ssl_options``).
_RABBIT_BOOT_ERRORS = ("Failed to start Ranch listener", "BOOT FAILED", "Error during startup")


@dataclass
class _RabbitPorts:
    amqp: int = 0
    amqps: int = 0
    dist: int = 0
    epmd: int = 0


class RabbitMQ(_Broker):
    """A private RabbitMQ node (no systemd, no /var/lib/rabbitmq) with a TLS listener.

    * ``amqps_port``: TLS listener (AMQP 0-9-1 and, through ``rabbitmq_amqp1_0``,
      AMQP 1.0), ``amqp_port``: the plain listener (both on 127.0.0.1).
    * TLS: ``certfile`` (server chain PEM), ``keyfile``, ``cacertfile`` (client CAs;
      required for ``verify="verify_peer"``), ``versions`` (Erlang atoms ``tlsv1.1``,
      ``tlsv1.2``, ``tlsv1.3``), ``ciphers`` (OpenSSL *or* IANA names; when TLS 1.3 is
      among ``versions`` and ``ciphers`` is given, ``ciphers_tls13`` — default
      :data:`DEFAULT_TLS13_SUITES` — is appended, since Erlang filters one list per
      version and would otherwise have no TLS 1.3 suite), ``fail_if_no_peer_cert``.
    * ``auth_mechanisms``: e.g. ``("PLAIN", "EXTERNAL")``; EXTERNAL enables
      ``rabbitmq_auth_mechanism_ssl`` with ``ssl_cert_login_from = common_name`` (the user
      named like the client certificate's CN must exist: add it with password ``None``).
    * ``users``: name -> password (``None``: no password, for EXTERNAL), created with
      full permissions on ``vhost`` during boot (a ``load_definitions`` file, so no
      ``rabbitmqctl`` call, which costs 0.5-3 s each); :meth:`add_user` adds more on a
      running node (one ``rabbitmqctl import_definitions``, the equivalent of
      ``add_user`` + ``set_permissions``). :meth:`ctl` runs any ``rabbitmqctl`` command
      against the node. With ``users`` the default ``guest`` is *not* created (RabbitMQ
      skips its default-user seeding when definitions load at boot); without, it is.
    * ``amqp1_0_default_user``: who an AMQP 1.0 client without SASL becomes;
      ``None`` (default) disables that so every AMQP 1.0 client must authenticate.
      RabbitMQ 3.x only (plugin ``rabbitmq_amqp1_0``); on 4.x, where AMQP 1.0 is built
      in, the plugin and the ``amqp1_0.*`` keys are left out (untested here: Debian 12
      ships 3.10.8).

    A private ``epmd`` on a free port (``ERL_EPMD_PORT``, loopback only) is started and
    stopped with the node, so parallel runs cannot collide and nothing outlives
    :meth:`stop`.
    """

    def __init__(
        self,
        *,
        workdir: Path,
        certfile: str | Path,
        keyfile: str | Path,
        cacertfile: str | Path | None = None,
        versions: Sequence[str] = ("tlsv1.2", "tlsv1.3"),
        ciphers: Sequence[str] | None = None,
        ciphers_tls13: Sequence[str] | None = None,
        verify: Literal["verify_none", "verify_peer"] = "verify_none",
        fail_if_no_peer_cert: bool = False,
        honor_cipher_order: bool = True,
        auth_mechanisms: Sequence[str] = ("PLAIN", "AMQPLAIN"),
        users: Mapping[str, str | None] | None = None,
        vhost: str = "/",
        amqp1_0_default_user: str | None = None,
        plugins: Sequence[str] = (),
        extra_config: Sequence[str] = (),
    ) -> None:
        if verify == "verify_peer" and cacertfile is None:
            raise ValueError("verify_peer needs cacertfile")
        if fail_if_no_peer_cert and verify != "verify_peer":
            raise ValueError("fail_if_no_peer_cert needs verify='verify_peer'")
        self.workdir = Path(workdir).resolve()
        self.certfile = Path(certfile).resolve()
        self.keyfile = Path(keyfile).resolve()
        self.cacertfile = Path(cacertfile).resolve() if cacertfile else None
        self.versions = tuple(versions)
        self.ciphers = tuple(ciphers) if ciphers is not None else None
        self.ciphers_tls13 = tuple(ciphers_tls13) if ciphers_tls13 is not None else None
        self.verify = verify
        self.fail_if_no_peer_cert = fail_if_no_peer_cert
        self.honor_cipher_order = honor_cipher_order
        self.auth_mechanisms = tuple(auth_mechanisms)
        self.users: dict[str, str | None] = dict(users or {})
        self.vhost = vhost
        self.amqp1_0_default_user = amqp1_0_default_user
        version = rabbitmq_version()
        #: RabbitMQ 4 speaks AMQP 1.0 natively (no plugin, no ``amqp1_0.*`` settings).
        self.native_amqp10 = version is not None and version >= (4, 0, 0)
        plugin_set = [*([] if self.native_amqp10 else ["rabbitmq_amqp1_0"]), *plugins]
        if "EXTERNAL" in self.auth_mechanisms:
            plugin_set.append("rabbitmq_auth_mechanism_ssl")
        self.plugins = tuple(dict.fromkeys(plugin_set))
        self.extra_config = list(extra_config)
        self.nodename = f"itls-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self._ports = _RabbitPorts()
        self._node: _Process | None = None
        self._epmd: _Process | None = None
        self.startup_seconds: float | None = None

    # ports / paths ------------------------------------------------------------------
    @property
    def amqps_port(self) -> int:
        return self._ports.amqps

    @property
    def amqp_port(self) -> int:
        return self._ports.amqp

    @property
    def dist_port(self) -> int:
        return self._ports.dist

    @property
    def epmd_port(self) -> int:
        return self._ports.epmd

    @property
    def config_path(self) -> Path:
        return self.workdir / "rabbitmq.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "log" / "rabbit.log"

    @property
    def definitions_path(self) -> Path:
        """Boot-time definitions (``load_definitions``): the ``users`` given at creation."""
        return self.workdir / "definitions.json"

    @property
    def output_path(self) -> Path:
        return self.workdir / "rabbitmq-server.out"

    @property
    def pid(self) -> int | None:
        return self._node.pid if self._node else None

    def running(self) -> bool:
        return self._node is not None and self._node.alive()

    # configuration ------------------------------------------------------------------
    def config_text(self) -> str:
        """The generated new-style ``rabbitmq.conf``."""
        lines = [
            "# generated by iothub_tls.testing.brokers",
            f"listeners.tcp.default = 127.0.0.1:{self._ports.amqp}",
            f"listeners.ssl.default = 127.0.0.1:{self._ports.amqps}",
            f"ssl_options.certfile = {self.certfile}",
            f"ssl_options.keyfile = {self.keyfile}",
            f"ssl_options.verify = {self.verify}",
            f"ssl_options.fail_if_no_peer_cert = {str(self.fail_if_no_peer_cert).lower()}",
            f"ssl_options.honor_cipher_order = {str(self.honor_cipher_order).lower()}",
        ]
        if self.cacertfile:
            lines.append(f"ssl_options.cacertfile = {self.cacertfile}")
        for i, version in enumerate(self.versions, 1):
            lines.append(f"ssl_options.versions.{i} = {version}")
        if self.ciphers is not None:
            suites = list(self.ciphers)
            if "tlsv1.3" in self.versions:
                extra = (
                    self.ciphers_tls13 if self.ciphers_tls13 is not None else DEFAULT_TLS13_SUITES
                )
                suites += [s for s in extra if s not in suites]
            # zero-padded keys: the schema sorts them, so the order given is preserved
            # (it matters with honor_cipher_order)
            for i, suite in enumerate(suites, 1):
                lines.append(f"ssl_options.ciphers.{i:03d} = {suite}")
        for i, mechanism in enumerate(self.auth_mechanisms, 1):
            lines.append(f"auth_mechanisms.{i} = {mechanism}")
        if "EXTERNAL" in self.auth_mechanisms:
            lines.append("ssl_cert_login_from = common_name")
        lines += [
            "loopback_users = none",
            f"log.file = {self.log_path}",
            "log.file.level = debug",
            "log.console = false",
        ]
        if not self.native_amqp10:
            lines += [
                f"amqp1_0.default_user = {self.amqp1_0_default_user or 'none'}",
                f"amqp1_0.default_vhost = {self.vhost}",
            ]
        if self.users:
            lines.append(f"load_definitions = {self.definitions_path}")
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    def _env(self) -> dict[str, str]:
        base = self.workdir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(base / "home"),
                "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.config_path),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
                "RABBITMQ_LOG_BASE": str(base / "log"),
                "RABBITMQ_LOGS": str(self.log_path),
                "RABBITMQ_PID_FILE": str(base / "rabbit.pid"),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_USE_LONGNAME": "false",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self._ports.amqp),
                "RABBITMQ_DIST_PORT": str(self._ports.dist),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_EPMD_PORT": str(self._ports.epmd),
                # never let erl spawn a stray "epmd -daemon": ours is already running
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
                ),
                "RABBITMQ_CTL_ERL_ARGS": "-start_epmd false",
                "LANG": os.environ.get("LANG", "C.UTF-8"),
            }
        )
        return env

    def _write_files(self) -> None:
        base = self.workdir
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq-env.conf").write_text("# intentionally empty\n")
        (base / "advanced.config").write_text("[].\n")
        (base / "enabled_plugins").write_text(f"[{','.join(self.plugins)}].\n")
        if self.users and not self.definitions_path.exists():
            self.definitions_path.write_text(json.dumps(self._definitions(self.users)))
        self.config_path.write_text(self.config_text())

    # lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Launch epmd and the node; wait for "Server startup complete" and the TLS port."""
        if self.running():
            raise BrokerError("rabbitmq is already running")
        server = _rabbit_script("rabbitmq-server")
        epmd = find_binary("epmd")
        began = time.monotonic()
        if not self._ports.amqps:
            ports: set[int] = set()
            while len(ports) < 4:
                ports.add(free_port())
            self._ports = _RabbitPorts(*sorted(ports))
        self._write_files()
        env = self._env()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._epmd = _Process(
            [epmd, "-port", str(self._ports.epmd), "-address", "127.0.0.1"],
            env,
            self.workdir,
            self.workdir / "epmd.out",
        )
        _LIVE.add(self)
        try:
            try:
                wait_port(self._ports.epmd, timeout=10)
            except TimeoutError as exc:
                raise BrokerError(f"epmd: {exc}") from None
            self._node = _Process([server], env, self.workdir, self.output_path)
            self._wait_booted(timeout - (time.monotonic() - began), log_offset)
        except BaseException as error:
            log = self.log_text()
            self.stop()
            if isinstance(error, BrokerError):
                raise BrokerError(f"{error}\n--- rabbitmq log ---\n{log}") from None
            raise
        self.startup_seconds = time.monotonic() - began

    def _wait_booted(self, timeout: float, log_offset: int) -> None:
        assert self._node is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self._node.alive():
                raise BrokerError(
                    f"rabbitmq-server exited with status "
                    f"{self._node.popen.returncode} during start-up"
                )
            log = _read(self.log_path, log_offset)
            for fatal in _RABBIT_BOOT_ERRORS:
                if fatal in log:  # e.g. a bad ssl_options value: the node would idle on
                    raise BrokerError(f"rabbitmq start-up failed: {fatal!r} in its log")
            if "Server startup complete" in log and port_open(self._ports.amqps):
                return
            if time.monotonic() > deadline:
                raise BrokerError(f"rabbitmq did not finish booting in {timeout:g} s")
            time.sleep(0.05)

    def ctl(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <node> ARGS`` against this node; raise on failure."""
        ctl = _rabbit_script("rabbitmqctl")
        env = self._env()
        # the CLI's own distribution port: one free port instead of the shared 35672+
        port = str(free_port())
        env["RABBITMQ_CTL_DIST_PORT_MIN"] = port
        env["RABBITMQ_CTL_DIST_PORT_MAX"] = port
        env[MARKER_ENV] = self._node.marker if self._node else ""
        result = subprocess.run(
            [ctl, "-n", self.nodename, *args],
            env=env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def add_user(self, name: str, password: str | None, *, tags: Sequence[str] = ()) -> None:
        """Create (or update) ``name`` with full permissions on the vhost.

        ``None`` = no password (EXTERNAL only). Same effect as ``rabbitmqctl add_user`` +
        ``set_permissions`` (+ ``set_user_tags``) but one CLI call instead of two or three.
        """
        self.import_users({name: password}, tags=tags)

    def import_users(self, users: Mapping[str, str | None], *, tags: Sequence[str] = ()) -> None:
        """Create users (full permissions on the vhost) with one ``import_definitions``.

        Each ``rabbitmqctl`` call boots an Erlang VM (0.5-2 s), so this is one call for
        any number of users; ``None`` means no password.
        """
        path = self.workdir / f"definitions-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(self._definitions(users, tags)))
        self.ctl("import_definitions", str(path))

    def _definitions(
        self, users: Mapping[str, str | None], tags: Sequence[str] = ()
    ) -> dict[str, list[dict[str, object]]]:
        """A definitions document: the vhost, the users and their full permissions."""
        return {
            "vhosts": [{"name": self.vhost}],
            "users": [
                {
                    "name": u,
                    "password_hash": rabbitmq_password_hash(p) if p is not None else "",
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": list(tags),
                }
                for u, p in users.items()
            ],
            "permissions": [
                {"user": u, "vhost": self.vhost, "configure": ".*", "write": ".*", "read": ".*"}
                for u in users
            ],
        }

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node (SIGTERM: orderly shutdown), then epmd; leave no process behind."""
        if self._node is not None:
            self._node.stop(timeout)
        if self._epmd is not None:
            self._epmd.stop(5)
        _LIVE.discard(self)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        self.start(timeout)

    def leftover_pids(self) -> list[int]:
        """Processes of the node or its epmd still alive (empty after :meth:`stop`)."""
        pids: list[int] = []
        for proc in (self._node, self._epmd):
            if proc is not None:
                pids += proc.leftovers()
        return pids

    def log_text(self) -> str:
        """The node's log file plus the start script's stdout/stderr."""
        out = _read(self.output_path)
        return _read(self.log_path) + (f"\n--- stdout/stderr ---\n{out}" if out else "")

    def __enter__(self) -> RabbitMQ:
        self.start()
        return self
