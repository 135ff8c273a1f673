"""The trainer's mini-batch mode (``train.num_neighbors``) with all neighbours
trains exactly like full-batch (the modules: tests/models/test_minibatch.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch_geometric.typing as pyg_typing

from crane_pyg.models import MiniBatchLightGCN

pytestmark = pytest.mark.skipif(
    not (pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE),
    reason='neighbour sampling needs pyg-lib or torch-sparse')


def test_trainer_minibatch_mode_equals_full_batch(tmp_path):
    """``train.num_neighbors=[-1, -1]`` trains exactly like full-batch LightGCN."""
    from crane_pyg.train import Trainer

    from .test_distributed import make_model, tiny_config, tiny_data
    config = dataclasses.replace(tiny_config(), epochs=1)
    full = Trainer(make_model(), tiny_data(), config, tmp_path / 'full', quiet=True,
                   plot=False, restore_best=False)
    full.fit()
    mini_config = dataclasses.replace(config, num_neighbors=(-1, -1))
    mini = Trainer(make_model(), tiny_data(), mini_config, tmp_path / 'mini', quiet=True,
                   plot=False, restore_best=False)
    assert isinstance(mini.train_model, MiniBatchLightGCN)
    mini.fit()
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(mini.model.state_dict()[name], value, atol=1e-5, rtol=0)
    assert mini.history[0]['loss'] == pytest.approx(full.history[0]['loss'], abs=1e-6)
