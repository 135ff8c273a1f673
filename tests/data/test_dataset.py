"""MMRecDataset: an InMemoryDataset caching load_mmrec's HeteroData."""
import os
import shutil
import time

import pytest
import torch

from crane_pyg.data import USER_ITEM, DataFormatError, load_mmrec
from crane_pyg.datasets import MMRecDataset
from crane_pyg.transforms import ItemKNNGraph


def same_graph(a, b):
    assert a.name == b.name and a.modalities == b.modalities
    assert a['user'].num_nodes == b['user'].num_nodes
    assert a['item'].num_nodes == b['item'].num_nodes
    for attr in ('edge_index', 'val_edge_index', 'test_edge_index'):
        assert torch.equal(a[USER_ITEM][attr], b[USER_ITEM][attr])
    for m in a.modalities:
        assert torch.equal(a['item'][m], b['item'][m])
    assert torch.equal(a['user'].has_train, b['user'].has_train)


@pytest.fixture
def root(synthetic_root, tmp_path):
    shutil.copytree(synthetic_root, tmp_path / synthetic_root.name)
    return tmp_path


def test_first_load_processes_second_reads_the_cache(root, synthetic_root, monkeypatch):
    name = synthetic_root.name
    dataset = MMRecDataset(root, name)
    assert len(dataset) == 1
    same_graph(dataset[0], load_mmrec(root / name))
    cached = list((root / name / 'processed').glob('data_v*.pt'))
    assert len(cached) == 1
    # the second load must not parse the .inter again
    import crane_pyg.data.dataset as module
    monkeypatch.setattr(module, 'load_mmrec', lambda *a, **k: pytest.fail('parsed again'))
    again = MMRecDataset(root, name)
    same_graph(again[0], dataset[0])


def test_changed_files_and_pre_transform_are_processed_again(root, synthetic_root):
    name = synthetic_root.name
    first = MMRecDataset(root, name)[0]
    inter = root / name / f'{name}.inter'
    lines = inter.read_text().splitlines(keepends=True)
    inter.write_text(''.join(lines[:-1]))  # drop the last interaction
    stat = os.stat(inter)
    os.utime(inter, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = MMRecDataset(root, name)[0]
    total = lambda d: sum(d[USER_ITEM][a].size(1)  # noqa: E731
                          for a in ('edge_index', 'val_edge_index', 'test_edge_index'))
    assert total(second) == total(first) - 1
    knn = MMRecDataset(root, name, pre_transform=ItemKNNGraph(k=5))[0]
    assert ('item', 'similar', 'item') in knn.edge_types
    assert len(list((root / name / 'processed').glob('data_v*.pt'))) == 1


def test_transform_and_processed_root(synthetic_root, tmp_path):
    calls = []

    def transform(data):
        calls.append(1)
        data.flag = 1
        return data
    dataset = MMRecDataset(synthetic_root.parent, synthetic_root.name, transform=transform,
                           processed_root=tmp_path / 'cache')
    assert dataset[0].flag == 1 and calls == [1]
    assert list((tmp_path / 'cache' / synthetic_root.name).glob('data_v*.pt'))


def test_missing_folder(tmp_path):
    with pytest.raises(DataFormatError, match="'nope.inter' not found"):
        MMRecDataset(tmp_path, 'nope')
