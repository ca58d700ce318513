"""Fixtures for every test directory: the tiny chat model built in the tests (tests/tiny_gguf.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny llama-architecture chat GGUF with its own template (built once, ~0.5 MB)."""
    from tests.tiny_gguf import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("tiny-model") / "tiny-chat.gguf")
