"""Shared fixtures for the evaluation tests; helpers live in ``vlp_eval_testutils`` beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from vlp_eval_testutils import DummyModel, WordTokenizer  # noqa: E402


@pytest.fixture
def model() -> DummyModel:
    return DummyModel(image_size=16, dim=8, seed=0)


@pytest.fixture
def tokenizer() -> WordTokenizer:
    return WordTokenizer(context_length=8)
