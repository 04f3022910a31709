"""Writing a Hugging Face hub cache by hand: snapshot files as relative symlinks into `blobs/`, refs naming them.

The layout `huggingface_hub` writes (models--org--name/{blobs, snapshots/<commit>, refs/<ref>}),
so that the loaders run on a replica exactly as on the real cache. Used by the random-weight
replicas of the tests (tests/radedit_replica.py) and of bench/rad_dino_replica.py.
"""

from __future__ import annotations

import hashlib
import os


def fake_commit(repo_id: str, seed: int) -> str:
    return hashlib.sha1(f"{repo_id}@{seed}".encode()).hexdigest()


def repo_dir(cache_root: str, repo_id: str) -> str:
    return os.path.join(cache_root, "models--" + repo_id.replace("/", "--"))


def place_file(cache_root: str, repo_id: str, commit: str, name: str, data: bytes) -> str:
    """Store `data` as a blob and link snapshots/<commit>/<name> to it, as the hub cache does."""
    repo = repo_dir(cache_root, repo_id)
    blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
    os.makedirs(os.path.dirname(blob), exist_ok=True)
    with open(blob, "wb") as stream:
        stream.write(data)
    link = os.path.join(repo, "snapshots", commit, name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return link


def place_folder(cache_root: str, repo_id: str, commit: str, folder: str, prefix: str = "") -> None:
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as stream:
            place_file(cache_root, repo_id, commit, prefix + name, stream.read())


def set_ref(cache_root: str, repo_id: str, commit: str, ref: str = "main") -> None:
    path = os.path.join(repo_dir(cache_root, repo_id), "refs", ref)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(commit)
