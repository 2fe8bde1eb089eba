"""Software stand-ins for device key hardware, for tests, benchmarks and labs: a SoftHSM2
token (PKCS#11) and a ``swtpm`` TPM 2.0 behind ``tpm2-abrmd`` (its resource manager:
without one, every process's transient objects stay loaded and the TPM runs out of
object memory, TPM_RC_OBJECT_MEMORY 0x902).

Everything lives in a directory of its own and is driven by the Debian tools
(softhsm2-util, pkcs11-tool, openssl, swtpm, dbus-daemon, tpm2-abrmd, tpm2_ptool).
:func:`missing_tools` says which are absent. The processes started here listen on
127.0.0.1 / a private D-Bus, and :meth:`SoftwareTpm.stop` ends exactly them.

The environment variables these set (``SOFTHSM2_CONF``, ``TPM2OPENSSL_TCTI``,
``DBUS_SESSION_BUS_ADDRESS`` ...) are returned as dictionaries: a process that loads
the key must have them in ``os.environ`` before it first touches the module or the
provider (both read them once).
"""

# The tools are run by name from PATH with argument lists built here (never a shell):
# this module exists to drive them, in tests, benchmarks and labs only.
# ruff: noqa: S603, S607

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "SOFTHSM2_MODULE",
    "TOOLS",
    "TPM2_PKCS11_MODULE",
    "SoftHsm",
    "SoftwareTpm",
    "missing_tools",
]

SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TPM2_PKCS11_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
ENGINE_SO = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"

#: tool -> Debian package
TOOLS: dict[str, str] = {
    "softhsm2-util": "softhsm2",
    "pkcs11-tool": "opensc",
    "openssl": "openssl",
    "swtpm": "swtpm",
    "dbus-daemon": "dbus",
    "tpm2-abrmd": "tpm2-abrmd",
    "tpm2_ptool": "libtpm2-pkcs11-tools",
    "tpm2_getcap": "tpm2-tools",
}


def missing_tools(names: Iterable[str]) -> list[str]:
    """``"tool (package)"`` for each tool not on PATH."""
    return [f"{n} ({TOOLS.get(n, n)})" for n in names if shutil.which(n) is None]


def _run(args: list[str], env: dict[str, str], *, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(
        args, env={**os.environ, **env}, input=stdin, capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        shown = " ".join(a if "pin" not in a.lower() else "<pin>" for a in args[:4])
        raise RuntimeError(
            f"{shown} ... failed ({done.returncode}): {done.stderr.decode(errors='replace')[-800:]}"
        )
    return done.stdout


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free loopback ports")


class SoftHsm:
    """A SoftHSM2 token directory: ``env`` must be in the environment of any process
    that uses the module (SoftHSM reads ``SOFTHSM2_CONF`` when it is initialised)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.tokens = self.directory / "tokens"
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.config = self.directory / "softhsm2.conf"
        self.config.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        self.module = SOFTHSM2_MODULE
        self.env = {"SOFTHSM2_CONF": str(self.config)}

    def init_token(self, label: str, pin: str, so_pin: str = "87654321") -> None:
        _run(
            ["softhsm2-util", "--init-token", "--free", "--label", label,
             "--so-pin", so_pin, "--pin", pin],
            self.env,
        )  # fmt: skip

    def token_directory(self, label: str) -> Path:
        """The directory SoftHSM keeps a token in (removing it removes the token)."""
        for child in self.tokens.iterdir():
            info = child / "token.object"
            if info.is_file() and label.encode() in info.read_bytes():
                return child
        raise LookupError(f"no token {label!r} in {self.tokens}")

    def _tool(self, token: str, pin: str, *args: str) -> bytes:
        return _run(
            ["pkcs11-tool", "--module", self.module, "--token-label", token,
             "--login", "--pin", pin, *args],
            self.env,
        )  # fmt: skip

    def generate_key(
        self, token: str, pin: str, label: str, key_id: str, kind: str = "EC:prime256v1"
    ) -> None:
        """A key pair generated inside the token (never extractable)."""
        self._tool(token, pin, "--keypairgen", "--key-type", kind, "--label", label, "--id", key_id)

    def import_certificate(self, token: str, pin: str, label: str, key_id: str, der: bytes) -> None:
        path = self.directory / f"{uuid.uuid4().hex}.der"
        path.write_bytes(der)
        try:
            self._tool(
                token, pin, "--write-object", str(path), "--type", "cert",
                "--label", label, "--id", key_id,
            )  # fmt: skip
        finally:
            path.unlink()

    def csr(self, uri: str, pin: str, common_name: str) -> bytes:
        """A PKCS#10 request signed inside the token (``openssl req`` with the engine)."""
        return _run(
            ["openssl", "req", "-new", "-engine", "pkcs11", "-keyform", "engine",
             "-key", f"{uri};pin-value={pin}" if "?" not in uri else uri,
             "-subj", f"/CN={common_name}", "-outform", "PEM"],
            {**self.env, "PKCS11_MODULE_PATH": self.module},
        )  # fmt: skip


class SoftwareTpm:
    """``swtpm`` (TPM 2.0) on free loopback ports, a private D-Bus session bus and
    ``tpm2-abrmd`` on it. ``env`` reaches it from tpm2-tools, the tpm2 provider and
    tpm2-pkcs11."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.state = self.directory / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._fds: list[int] = []
        self.env: dict[str, str] = {}

    def start(self) -> SoftwareTpm:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        port = _free_port_pair()
        ctrl = port + 1  # the swtpm TCTI expects the control channel on the next port
        self._procs.append(
            subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
                 "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        _wait_port(ctrl, self._procs[-1])  # not the TPM port: swtpm serves one client there
        bus = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1", "--nopidfile"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._procs.append(bus)
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        if not address:
            raise RuntimeError("dbus-daemon did not print its address")
        name = f"com.intel.tss2.Tabrmd.itls{os.getpid()}x{port}"
        env = {
            "DBUS_SESSION_BUS_ADDRESS": address,
            "TSS2_LOG": "all+none",
        }
        tcti = f"tabrmd:bus_type=session,bus_name={name}"
        env |= {
            "TPM2OPENSSL_TCTI": tcti,
            "TPM2TOOLS_TCTI": tcti,
            "TPM2_PKCS11_TCTI": tcti,
            "TPM2_PKCS11_STORE": str(self.directory / "pkcs11-store"),
        }
        self.env = env
        problem = ""
        for _attempt in range(5):  # swtpm may not take a connection the moment it listens
            abrmd = subprocess.Popen(
                ["tpm2-abrmd", "--session", "--allow-root", "--flush-all",
                 f"--dbus-name={name}", f"--tcti=swtpm:host=127.0.0.1,port={port}"],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL, stderr=self._log("tpm2-abrmd"),
            )  # fmt: skip
            self._procs.append(abrmd)
            deadline = time.monotonic() + 15
            while abrmd.poll() is None and time.monotonic() < deadline:
                done = subprocess.run(
                    ["tpm2_getcap", "properties-fixed"], env={**os.environ, **env},
                    capture_output=True, timeout=30, check=False,
                )  # fmt: skip
                if done.returncode == 0:
                    (self.directory / "pkcs11-store").mkdir(exist_ok=True)
                    return
                problem = done.stderr.decode(errors="replace")[-300:]
                time.sleep(0.1)
            if abrmd.poll() is None:
                break  # running but not answering: waiting longer will not help
            time.sleep(0.3)
        raise RuntimeError(f"tpm2-abrmd did not come up (see its log): {problem}")

    def _log(self, name: str) -> int:
        fd = os.open(self.directory / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fds.append(fd)
        return fd

    def generate_key(self, path: str | os.PathLike[str], algorithm: str = "EC") -> Path:
        """A TSS2 key file (the private part is wrapped by the TPM's storage key)."""
        opts = ["-pkeyopt", "group:P-256"] if algorithm == "EC" else []
        _run(
            ["openssl", "genpkey", "-provider", "tpm2", "-provider", "default",
             "-algorithm", algorithm, *opts, "-out", os.fspath(path)],
            self.env,
        )  # fmt: skip
        return Path(path)

    def csr(self, keyfile: str | os.PathLike[str], common_name: str) -> bytes:
        return _run(
            ["openssl", "req", "-new", "-provider", "tpm2", "-provider", "default",
             "-key", os.fspath(keyfile), "-subj", f"/CN={common_name}", "-outform", "PEM"],
            self.env,
        )  # fmt: skip

    def public_key(self, keyfile: str | os.PathLike[str]) -> bytes:
        """The key's public half, PEM (SubjectPublicKeyInfo)."""
        return _run(
            ["openssl", "pkey", "-provider", "tpm2", "-provider", "default",
             "-in", os.fspath(keyfile), "-pubout"],
            self.env,
        )  # fmt: skip

    def pkcs11_token(self, label: str, pin: str, key_label: str, so_pin: str = "87654321") -> None:
        """A tpm2-pkcs11 token with an EC P-256 key made in the TPM."""
        _run(["tpm2_ptool", "init"], self.env)
        _run(
            ["tpm2_ptool", "addtoken", "--pid=1", f"--label={label}",
             f"--userpin={pin}", f"--sopin={so_pin}"],
            self.env,
        )  # fmt: skip
        _run(
            ["tpm2_ptool", "addkey", "--algorithm=ecc256", f"--label={label}",
             f"--key-label={key_label}", f"--userpin={pin}"],
            self.env,
        )  # fmt: skip

    def pkcs11_csr(self, uri: str, pin: str, common_name: str) -> bytes:
        return _run(
            ["openssl", "req", "-new", "-engine", "pkcs11", "-keyform", "engine",
             "-key", f"{uri};pin-value={pin}", "-subj", f"/CN={common_name}", "-outform", "PEM"],
            {**self.env, "PKCS11_MODULE_PATH": TPM2_PKCS11_MODULE},
        )  # fmt: skip

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SoftwareTpm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"swtpm does not listen on {port}")
