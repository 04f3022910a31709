"""Local paths, s3:// URIs and any registered scheme behind one small API: the `Store`.

Every reader and writer in cxrmem goes through a Store, so that a run's inputs and outputs can
live on local disk or in S3 without the rest of the code knowing which. Its settings are
resolved once (`Store.from_config(cfg.storage)`) and the object is passed on by the stages.

    uris.py, errors.py   pure: a URI's scheme, join / relative; StorageError and the messages that say what to fix
    backend.py           the backend protocol and the registry: scheme -> backend class
    local.py, s3.py      the backends of local paths and s3:// (settings, clients, diagnosis, conditional writes)
    store.py             the Store: one retry layer, one atomic writer, the transfer threads

A new scheme is one module holding a `@register`ed Backend (tests/test_storage_backends.py shows
memory:// in a test file). Code outside this package asks a URI's backend questions
(`local_path`, `canonical`) instead of testing for a scheme.
"""

from cxrmem.storage.backend import Backend, canonical, local_path, register
from cxrmem.storage.errors import StorageError, name_too_long
from cxrmem.storage.local import PARTIAL_MARK  # importing local and s3 registers their backends
from cxrmem.storage.s3 import S3Settings, StorageConfig, s3_settings
from cxrmem.storage.store import CHUNK_BYTES, Store
from cxrmem.storage.uris import join, join_inside, relative, scheme_of

__all__ = [
    "CHUNK_BYTES",
    "PARTIAL_MARK",
    "Backend",
    "S3Settings",
    "StorageConfig",
    "StorageError",
    "Store",
    "canonical",
    "join",
    "join_inside",
    "local_path",
    "name_too_long",
    "register",
    "relative",
    "s3_settings",
    "scheme_of",
]
