"""Shared fixtures: the real default embedding model (built by `make models`), engines on temp dirs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

from engine.config import Config
from engine.embed import Embedder
from engine.pipeline import Engine

# CI runs the property tests on a fixed sequence of examples so a run is reproducible;
# HYPOTHESIS_PROFILE=explore draws fresh random examples (and more of them).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=2000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def config() -> Config:
    return Config(threads=2)


@pytest.fixture(scope="session")
def embedder(config) -> Embedder:
    emb = Embedder(config.embed_model_dir, variant="int8", threads=2)
    emb.warmup()
    return emb


@pytest.fixture(scope="session")
def embedder_fp32(config) -> Embedder:
    emb = Embedder(config.embed_model_dir, variant="fp32", threads=2)
    emb.warmup()
    return emb


@pytest.fixture(scope="session")
def generator(config):
    from engine.generate import Generator

    return Generator(config.gen_model_dir, variant="int8", threads=2, context_window=config.context_window)


@pytest.fixture()
def engine(tmp_path, config, embedder):
    eng = Engine(config.replace(data_dir=tmp_path / "data"), embedder=embedder)
    yield eng
    eng.close()


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
