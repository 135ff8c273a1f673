import json
import warnings

import numpy as np
import pytest
import torch

from crane_pyg.data import ITEM, USER, USER_ITEM, load_mmrec, load_synthetic, make_synthetic

SMALL = dict(num_users=120, num_items=60, num_interactions=1200,
             modalities={'image': 32, 'text': 48})


def all_interactions(data):
    store = data[USER_ITEM]
    return torch.cat([store.edge_index, store.val_edge_index, store.test_edge_index], dim=1)


def test_deterministic_files(tmp_path):
    a = make_synthetic(tmp_path / 'a', seed=3, **SMALL)
    b = make_synthetic(tmp_path / 'b', seed=3, **SMALL)
    c = make_synthetic(tmp_path / 'c', seed=4, **SMALL)
    assert (a / 'a.inter').read_bytes() == (b / 'b.inter').read_bytes()
    assert (a / 'a.inter').read_bytes() != (c / 'c.inter').read_bytes()
    for name in ('image_feat.npy', 'text_feat.npy'):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert not np.array_equal(np.load(a / name), np.load(c / name))
    assert sorted(p.name for p in a.iterdir()) == [
        'a.inter', 'image_feat.npy', 'latent.npz', 'synthetic.json', 'text_feat.npy']


def test_modalities_do_not_change_interactions(tmp_path):
    a = make_synthetic(tmp_path / 'x', **SMALL)
    b = make_synthetic(tmp_path / 'y', **{**SMALL, 'modalities': {}})
    assert (a / 'x.inter').read_text() == (b / 'y.inter').read_text()
    data = load_mmrec(b)
    assert data.modalities == []


def test_reuse_conflict_and_overwrite(tmp_path):
    folder = make_synthetic(tmp_path / 'ds', **SMALL)
    inter = folder / 'ds.inter'
    stamp = inter.stat().st_mtime_ns, inter.stat().st_ino
    assert make_synthetic(tmp_path / 'ds', **SMALL) == folder
    assert (inter.stat().st_mtime_ns, inter.stat().st_ino) == stamp  # not rewritten

    with pytest.raises(FileExistsError, match=r'seed: stored 0, requested 1'):
        make_synthetic(folder, seed=1, **SMALL)

    make_synthetic(folder, seed=1, overwrite=True, **{**SMALL, 'modalities': {'audio': 8}})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ['audio_feat.npy', 'ds.inter', 'latent.npz', 'synthetic.json']  # no stale
    assert json.loads((folder / 'synthetic.json').read_text())['seed'] == 1
    assert load_mmrec(folder).modalities == ['audio']


def test_refuses_foreign_folder(tmp_path):
    folder = tmp_path / 'mine'
    folder.mkdir()
    (folder / 'mine.inter').write_text('userID\titemID\trating\ttimestamp\tx_label\n')
    with pytest.raises(FileExistsError, match='not written by make_synthetic'):
        make_synthetic(folder, **SMALL)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_users=100, num_items=60, num_interactions=299), 'num_interactions'),
    (dict(num_users=10, num_items=60, num_interactions=50), 'num_interactions'),
    (dict(num_users=10, num_items=20, num_interactions=101), 'num_interactions'),
    (dict(num_items=5), 'num_items'),
    (dict(modalities={'bad name': 4}), 'identifier'),
    (dict(modalities={'image': 0}), 'positive integer'),
    (dict(temperature=0.0), 'temperature'),
])
def test_invalid_parameters(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(tmp_path / 'bad', **kwargs)


def test_loader_accepts_output(synthetic_root):
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no duplicates, no user without train
        data = load_mmrec(synthetic_root)
    assert data.name == 'synthetic-small'
    assert data[USER].num_nodes == 300 and data[ITEM].num_nodes == 200
    assert all_interactions(data).size(1) == 4000
    assert data.modalities == ['image', 'text']
    assert data[ITEM]['image'].shape == (200, 256)
    assert data[ITEM]['text'].shape == (200, 384)
    assert bool(data[USER].has_train.all())


def test_every_user_has_all_splits_80_10_10(synthetic_data):
    store = synthetic_data[USER_ITEM]
    num_users = synthetic_data[USER].num_nodes
    counts = torch.stack([torch.bincount(e[0], minlength=num_users) for e in
                          (store.edge_index, store.val_edge_index, store.test_edge_index)])
    assert bool((counts >= 1).all())
    total = counts.sum(0)
    held_out = torch.clamp(torch.floor(total / 10 + 0.5), min=1).long()
    assert torch.equal(counts[1], held_out) and torch.equal(counts[2], held_out)
    assert counts[0].sum() / total.sum() > 0.7


def _top_decile_share(data) -> float:
    counts = torch.bincount(all_interactions(data)[1])
    assert counts.min() >= 1  # contiguous: every item occurs
    top = counts.sort(descending=True).values[:len(counts) // 10]
    return top.sum().item() / counts.sum().item()


def test_popularity_skew(tmp_path, synthetic_data):
    share = _top_decile_share(synthetic_data)
    assert share > 0.25  # uniform item popularity would give about 0.10
    # The skew comes from the power-law popularity term, not only from the
    # affinities: without it (exponent 0) the share drops markedly.
    flat = make_synthetic(tmp_path / 'flat', num_users=300, num_items=200,
                          num_interactions=4000, popularity_exponent=0.0, modalities={})
    assert share > _top_decile_share(load_mmrec(flat)) + 0.08


def test_interactions_follow_latent_preference(synthetic_root, synthetic_data):
    latent = np.load(synthetic_root / 'latent.npz')
    p = torch.from_numpy(latent['user_factors'])
    q = torch.from_numpy(latent['item_factors'])
    users, items = all_interactions(synthetic_data)
    observed = (p[users] * q[items]).sum(-1).mean()
    everything = (p @ q.t()).mean()
    # affinities have standard deviation sqrt(latent_dim) = 4 over all pairs
    assert observed - everything > 2.0


def _knn(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ x.t()
    sim.fill_diagonal_(-float('inf'))
    return sim.topk(k, dim=-1).indices


def test_features_carry_signal(synthetic_root, synthetic_data):
    # Measurable property: the k nearest neighbours of an item by cosine
    # similarity of its features overlap with its k nearest neighbours by its
    # planted latent factors far more than by chance (k / (I - 1) = 5 %).
    k = 10
    latent = torch.from_numpy(np.load(synthetic_root / 'latent.npz')['item_factors'])
    truth = _knn(latent, k)
    num_items = latent.size(0)
    chance = k / (num_items - 1)
    for modality in synthetic_data.modalities:
        found = _knn(synthetic_data[ITEM][modality], k)
        hits = (found.unsqueeze(-1) == truth.unsqueeze(-2)).any(-1).float().mean().item()
        assert hits > 6 * chance, (modality, hits)


def test_load_synthetic_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('CRANE_CACHE', str(tmp_path))
    data = load_synthetic(**SMALL)
    folders = [p.name for p in tmp_path.iterdir()]
    assert len(folders) == 1 and folders[0].startswith('synthetic-')
    assert data.name == folders[0]
    assert data[USER].num_nodes == 120 and data[ITEM].num_nodes == 60
    again = load_synthetic(**SMALL)  # reused, same content
    assert torch.equal(again[USER_ITEM].edge_index, data[USER_ITEM].edge_index)
    explicit = load_synthetic(tmp_path / 'elsewhere', name='synthetic', **SMALL)
    assert explicit.name == 'synthetic'
    assert torch.equal(explicit[ITEM]['image'], data[ITEM]['image'])
    assert not list(tmp_path.rglob('*.tmp'))  # atomic writes leave no temporaries
