"""Shared pytest fixtures.

Real datasets are read from ``$CRANE_DATA_ROOT`` or, by default, from
``../shared/data`` beside the repository; tests that need them are skipped
when the folder is absent.
"""
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get('CRANE_DATA_ROOT', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def data_root() -> Path:
    return shared_data_root()


def require_dataset(name: str) -> Path:
    """Path of ``<data_root>/<name>``, or skip the test when it is absent."""
    path = shared_data_root() / name
    if not (path / f'{name}.inter').is_file():
        pytest.skip(f'real dataset {name!r} not found under {shared_data_root()}')
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MMRec folder, written once per test session."""
    from crane_pyg.data import make_synthetic
    root = tmp_path_factory.mktemp('synthetic')
    return make_synthetic(root / 'synthetic-small', num_users=300, num_items=200,
                          num_interactions=4000, seed=0)


@pytest.fixture(scope='session')
def synthetic_data(synthetic_root):
    """The small synthetic dataset as HeteroData (no item-item graph yet)."""
    from crane_pyg.data import load_mmrec
    return load_mmrec(synthetic_root)


@pytest.fixture(scope='session')
def synthetic_knn_data(synthetic_data):
    """The small synthetic dataset with its item kNN graph (k = 10)."""
    import copy
    from crane_pyg.transforms import ItemKNNGraph
    return ItemKNNGraph(k=10)(copy.copy(synthetic_data))


def small_crane(data, **options):
    """A CRANE with d = 16 built from ``data`` after ``torch.manual_seed(0)``."""
    from crane_pyg.models import CRANE
    torch.manual_seed(0)
    return CRANE.from_data(data, embedding_dim=16, **options)


def bpr_batch(data, size=64, seed=0):
    """``(users, pos, neg)``: the first BPR batch of epoch 0 (seed ``seed``)."""
    from crane_pyg.data import BPRSampler
    return next(iter(BPRSampler.from_data(data, seed=seed).batches(0, size)))
