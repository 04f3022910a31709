"""Shared fixtures: real tiny models built in seconds, never mocks."""

import os

import pytest

# Keep torch from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins: list[str] = ["tests.s3server"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised tiny diffusers model (UNet, BERT text encoder, WordPiece tokenizer, DDIM)."""
    from cxrmem.corpus.synthetic import tokenizer_texts
    from cxrmem.models.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(str(out), tokenizer_texts(), seed=0)
    return str(out)
