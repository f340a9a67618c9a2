"""Shared fixtures: tiny models built locally, once per session (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    from blockskip_ray.models.tiny import init_model

    return init_model("flux", tmp_path_factory.mktemp("models") / "flux-tiny")


@pytest.fixture(scope="session")
def tiny_sana_dir(tmp_path_factory) -> Path:
    from blockskip_ray.models.tiny import init_model

    return init_model("sana", tmp_path_factory.mktemp("models") / "sana-tiny")


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    from blockskip_ray.method.images import make_synthetic_subject

    d = tmp_path_factory.mktemp("subject")
    make_synthetic_subject(d, n=4, size=128, seed=1)
    return d
