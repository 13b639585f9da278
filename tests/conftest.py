"""Shared fixtures: a tiny random checkpoint written once per session by our own writer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tide.checkpoint import write_random_checkpoint
from tide.config import preset

torch.set_num_threads(1)  # fixed thread count: results must not depend on the machine's core count
# `PYTHONPATH=. pytest` (how a machine without the venv runs the suite): subprocesses that start in another folder
# must still find the checkout, so its entries are made absolute once, here.
if os.environ.get("PYTHONPATH"):
    paths = os.environ["PYTHONPATH"].split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in paths if p)


@pytest.fixture(scope="session")
def tiny_cfg():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_cfg):
    """A sharded tiny checkpoint (several shards, index, byte tokenizer)."""
    return write_random_checkpoint(tiny_cfg, tmp_path_factory.mktemp("tiny"), seed=1, max_shard_bytes=150_000)
