"""Test session setup: caches and offline flags (see tests/helpers.py), shared fixtures."""

from __future__ import annotations

import pytest

import tests.helpers  # noqa: F401  (sets the environment for every test and subprocess)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rosa_ds.config import ModelConfig
    from rosa_ds.model import resolve_model_path

    return resolve_model_path(ModelConfig(name_or_path="builtin:tiny-llama"))
