"""`cxrmem verify RUN [--expect DIGEST] [--key [FILE]]`: a published run's files against its manifest (cxrmem/publish.py)."""

from __future__ import annotations

from typing import Optional

from cxrmem.publish import SIGNING_KEY_ENV, signing_key, verify_run
from cxrmem.storage import Store


def run(cfg, store: Store, run: str, expect: Optional[str] = None, key: Optional[str] = None) -> dict:
    """verify_run's result; `key` "" (--key without FILE) reads the HMAC key from $CXRMEM_SIGNING_KEY."""
    secret = None
    if key is not None:
        secret = signing_key(key, from_env=not key)
        if secret is None:
            raise ValueError(f"--key without a FILE reads ${SIGNING_KEY_ENV}, which is not set: give the key file")
    return verify_run(store, run, expect=expect, key=secret)
