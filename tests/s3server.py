"""pytest plugin: the real S3 server of bench/s3server.py (SeaweedFS `weed mini` on loopback), started by the tests.

Fixtures:
    s3_server      session: the running server (endpoint_url, keys, stop(), start(), stopped())
    s3_bucket      function: a fresh bucket; AWS_* variables point the test at the server
    s3_storage_cfg function: a `storage` config section for the server with short retries
"""

from __future__ import annotations

import uuid

import pytest

from bench.s3server import S3Server, find_weed


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS server on free loopback ports for the whole session; fails (never skips) without `weed`."""
    try:
        weed = find_weed()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    server = S3Server(data_dir=tmp_path_factory.mktemp("seaweedfs"), weed=weed)
    for attempt in range(3):
        try:
            server.start()
            break
        except RuntimeError:
            # Another process took one of the ports between choosing and binding: choose again.
            server.stop()
            if attempt == 2:
                raise
            server.ports = {}
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the standard AWS variables at the test server, so code that reads the environment finds it."""
    s3_server.start()  # no-op while running; brings it back if a test left it stopped
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, empty bucket on the test server; its name (use it as s3://<name>/...)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage_cfg(s3_server):
    return s3_server.storage_cfg()
