"""Smoke tests of benchmarks/: every script runs at tiny sizes in this process
and writes JSON of the documented schema; plus exact checks of the helpers
(slope fit, summary statistics, the synthetic graph). No timing assertions."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (attention_memory, backends, common, electronics_scale,  # noqa: E402
                        memory_linear, minibatch_memory, scalability, tiktok_epoch_time)


def _is_timing(entry) -> bool:
    return (set(entry) >= {'median', 'min', 'max', 'spread', 'repeats', 'samples'}
            and entry['repeats'] >= 3 and entry['min'] <= entry['median'] <= entry['max'])


def test_loglog_slope_exact():
    x = [1, 2, 4, 8, 16]
    assert common.loglog_slope(x, [3 * v ** 2 for v in x]) == pytest.approx(2.0)
    # only the largest `last` points count: a kink at the small end is ignored
    y = [100, 100, 4, 8, 16]
    assert common.loglog_slope(x, y, last=3) == pytest.approx(1.0)
    assert common.loglog_slope([1], [1]) is None


def test_summarize_and_power_law_graph():
    s = common.summarize([1.0, 3.0, 2.0])
    assert (s['median'], s['min'], s['max'], s['spread']) == (2.0, 1.0, 3.0, 1.0)
    g = common.power_law_graph(50, 30, 400, seed=1)
    assert g.shape == (2, 400)  # duplicates are topped up
    key = g[0] * 30 + g[1]
    assert np.all(np.diff(key) > 0)  # unique and sorted by (user, item)
    assert g[0].min() >= 0 and g[0].max() < 50 and g[1].max() < 30
    assert np.unique(g[0]).size == 50  # every user has an interaction
    np.testing.assert_array_equal(g, common.power_law_graph(50, 30, 400, seed=1))


def test_random_item_graph_is_normalised():
    index, weight = common.random_item_graph(40, 5, seed=0)
    dense = torch.zeros(40, 40).index_put_((index[0], index[1]), weight, accumulate=True)
    binary = torch.zeros(40, 40).index_put_((index[0], index[1]), torch.ones_like(weight))
    deg = binary.sum(1)
    assert torch.allclose(dense, binary / deg.sqrt().unsqueeze(1) / deg.sqrt().unsqueeze(0))
    assert torch.all(binary.diagonal() == 1)


def test_write_json_atomic(tmp_path):
    path = tmp_path / 'a' / 'b.json'
    common.write_json({'x': [1, 2]}, path)
    assert json.loads(path.read_text()) == {'x': [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ['b.json']


def test_scalability_quick(tmp_path):
    out = tmp_path / 's.json'
    scalability.main(['--quick', '--in-process', '--device', 'cpu', '--axes', 'd',
                      '--output', str(out)])
    res = json.loads(out.read_text())
    assert res['benchmark'] == 'scalability' and 'loadavg' in res['environment']
    entry = res['axes']['d']
    assert entry['predicted']['slope'] == 2.0 and entry['predicted']['parts'] == ['rca']
    assert len(entry['points']) == 2
    for p in entry['points']:
        assert p['status'] == 'ok'
        assert set(p['step']) == set(scalability.PARTS) | {'step'}
        assert all(_is_timing(t) for t in p['step'].values())
        assert _is_timing(p['evaluation'])
        assert p['memory']['peak_rss_mb'] > 0
        # the hooked parts really ran
        assert p['step']['rca']['median'] > 0 and p['step']['ui_prop']['median'] > 0
    assert set(entry['fitted_slopes']) >= set(scalability.PARTS) | {'evaluation'}
    assert out.with_suffix('.png').stat().st_size > 0


def test_scalability_grid_and_base_overrides(tmp_path, capsys):
    out = tmp_path / 's.json'
    threads = torch.get_num_threads()
    scalability.main(['--quick', '--in-process', '--device', 'cpu', '--axes', 'R',
                      '--grid', 'R=1,3', '--base', 'd=8', '--threads', '1',
                      '--output', str(out)])
    assert torch.get_num_threads() == threads  # restored after the in-process points
    res = json.loads(out.read_text())
    assert res['config']['base']['d'] == 8 and res['config']['grid']['R'] == [1, 3]
    points = res['axes']['R']['points']
    assert [p['params']['R'] for p in points] == [1, 3]
    assert all(p['params']['d'] == 8 and p['params']['threads'] == 1 for p in points)
    for bad in (['--grid', 'Q=1,2'], ['--grid', 'R=1,x'], ['--base', 'N=1,2']):
        with pytest.raises(SystemExit):
            scalability.main(['--quick', '--in-process', '--output', str(out)] + bad)
    assert 'expected AXIS=' in capsys.readouterr().err


def test_backends_quick(tmp_path):
    from crane_pyg.nn import available_backends
    out = tmp_path / 'b.json'
    backends.main(['--quick', '--in-process', '--device', 'cpu', '--output', str(out)])
    res = json.loads(out.read_text())
    assert set(res['backends']) == set(available_backends()) | set(backends.PYG_REFERENCES)
    for points in res['backends'].values():
        assert [p['status'] for p in points] == ['ok', 'ok']
        assert all(_is_timing(p['time']) for p in points)
    assert set(res['fastest']) == {'2000', '8000'}
    for f in res['fastest'].values():
        assert f['backend'] in res['backends']
        assert f['ratio_to_best'][f['backend']] == 1.0
        assert min(f['ratio_to_best'].values()) == 1.0
    assert out.with_suffix('.png').stat().st_size > 0


def test_attention_memory_quick(tmp_path):
    out = tmp_path / 'a.json'
    attention_memory.main(['--quick', '--in-process', '--device', 'cpu', '--output', str(out)])
    res = json.loads(out.read_text())
    assert set(res['points']) == {'rca', 'all_items'}
    for kind in ('rca', 'all_items'):
        assert [p['N'] for p in res['points'][kind]] == [200, 400]
        assert all(p['status'] == 'ok' and p['memory_mb'] > 0 for p in res['points'][kind])
    assert res['predicted_slopes'] == {'rca': 1.0, 'all_items': 2.0}
    assert out.with_suffix('.png').stat().st_size > 0


def test_attention_memory_skips_over_cap(tmp_path):
    out = tmp_path / 'a.json'
    attention_memory.main(['--quick', '--in-process', '--device', 'cpu', '--output', str(out),
                           '--cap-gb', '1e-9'])
    res = json.loads(out.read_text())
    assert [p['status'] for p in res['points']['all_items']] == ['skipped', 'skipped']
    assert res['fitted_slopes']['all_items'] is None


def test_electronics_quick(tmp_path):
    out = tmp_path / 'e.json'
    res = electronics_scale.main(['--quick', '--device', 'cpu', '--max-batches', '1',
                                  '--knn-sample-items', '100', '--max-eval-users', '200',
                                  '--precisions', 'fp32,bf16', '--semantic-cache', '2',
                                  '--num-neighbors', '5,5', '--output', str(out)])
    saved = json.loads(out.read_text())
    assert saved['stages'].keys() == {'build_data', 'knn_build', 'build_model', 'side_by_side',
                                      'train_epoch', 'evaluation'}
    train = saved['stages']['train_epoch']
    # 6000 pairs -> ~4.4k training triples -> 3 batches of 2048; 1 warm-up, 1 measured
    assert train['extrapolated'] is True and train['measured_batches'] == 1
    assert train['time_s'] == pytest.approx(train['epoch_start_s']
                                            + train['seconds_per_batch'] * train['num_batches'])
    side = saved['stages']['side_by_side']['settings']
    assert set(side) == {f'{m}/{p}' for m in ('crane', 'crane-cache', 'crane-mb', 'freedom',
                                              'lightgcn') for p in ('fp32', 'bf16')}
    # the cached settings add their refreshes: ceil(3 batches / T=2) per epoch
    assert side['crane-cache/fp32']['refreshes_per_epoch'] == 2
    assert side['crane-mb/fp32']['refreshes_per_epoch'] == 2
    assert side['crane/fp32']['time_s'] == pytest.approx(train['time_s'])
    assert side['freedom/fp32']['ratio_to_freedom'] == pytest.approx(1.0)
    assert all(e['time_s'] > 0 and e['extrapolated'] for e in side.values())
    knn = saved['stages']['knn_build']
    assert knn['extrapolated'] is True
    assert knn['time_s'] == pytest.approx(knn['measured_time_s'] * (300 / 100) ** 2)
    assert saved['stages']['evaluation']['extrapolated'] is True
    assert math.isfinite(saved['stages']['evaluation']['recall_at_20'])
    assert saved['within_24_gb'] is True and res['peak_memory']['peak_rss_mb'] > 0


def test_memory_linear_small(tmp_path):
    # two tiny sizes in fresh subprocesses: the JSON records finite gradients,
    # the requested sizes and a fitted slope (no timing or memory assertion)
    out = tmp_path / 'm.json'
    assert memory_linear.main(['--sizes', '300', '600', '--output', str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [p['N'] for p in saved['points']] == [300, 600]
    assert all(p['status'] == 'ok' and p['finite_gradients'] for p in saved['points'])
    assert all(p['E_train'] > 0 and p['peak_rss_mb'] > 0 for p in saved['points'])
    assert saved['predicted_slope'] == 1.0
    assert isinstance(saved['slope_memory_above_baseline_vs_N'], float)


def test_minibatch_memory_quick(tmp_path):
    # the quick grid in this process: every (N, mode) point ran with finite
    # losses, reports memory and timing, and [5,5] fan-outs encode fewer items
    # than the full batch (all I) while [-1,-1] reaches more UI nodes than [5,5]
    out = tmp_path / 'mb.json'
    minibatch_memory.main(['--quick', '--in-process', '--device', 'cpu', '--output', str(out)])
    res = json.loads(out.read_text())
    assert res['benchmark'] == 'minibatch_memory' and 'loadavg' in res['environment']
    assert set(res) >= {'config', 'points', 'fitted_slopes', 'summary', 'baseline_rss_mb'}
    assert list(res['points']) == ['full', 'mini[-1,-1]', 'mini[10,10]', 'mini[5,5]']
    sizes = res['config']['sizes']
    for mode, points in res['points'].items():
        assert [p['N'] for p in points] == sizes
        for p in points:
            assert p['status'] == 'ok' and p['finite_loss'] and len(p['losses']) == 4
            assert p['memory_mb'] > 0 and p['process_peak_mb'] > 0
            assert _is_timing(p['time']) and p['step_ms'] > 0
            assert (p['last_stats'] is None) == (mode == 'full')
        assert set(res['fitted_slopes'][mode]) == {'memory', 'time'}
    for full, mb5, mb_all in zip(*(res['points'][m] for m in ('full', 'mini[5,5]',
                                                               'mini[-1,-1]'))):
        stats = mb5['last_stats']
        assert 0 < stats['items_seed'] <= stats['items_encoded'] < full['num_items']
        assert stats['ui_nodes'] < mb_all['last_stats']['ui_nodes']
    assert len(res['summary']) == 4 * len(sizes)
    assert all('memory_saving' in r for r in res['summary'] if r['mode'] != 'full')
    assert out.with_suffix('.png').stat().st_size > 0


def test_tiktok_epoch_time_on_synthetic_data(synthetic_root, tmp_path):
    """The side-by-side epoch timer and its step breakdown, on the small
    synthetic dataset (the script's real input is TikTok)."""
    out = tmp_path / 't.json'
    assert tiktok_epoch_time.main([
        '--data-root', str(synthetic_root.parent), '--dataset', synthetic_root.name,
        '--models', 'crane,freedom', '--epochs', '3', '--warmup', '0', '--batch-size', '512',
        '--breakdown', '--breakdown-repeats', '3', '--output', str(out)]) == 0
    saved = json.loads(out.read_text())
    assert out.with_suffix('.png').is_file()
    models = saved['models']
    assert set(models) == {'crane', 'freedom'}
    for entry in models.values():
        assert _is_timing(entry['epoch_seconds'])
        assert 0.0 <= entry['validation']['recall@20'] <= 1.0
    assert saved['ratio_crane_over_freedom'] == pytest.approx(
        models['crane']['epoch_seconds']['median'] / models['freedom']['epoch_seconds']['median'])
    # the ratio of each interleaved epoch pair: epoch e of CRANE over epoch e of FREEDOM
    per_epoch = saved['ratio_crane_over_freedom_per_epoch']
    assert _is_timing(per_epoch) and per_epoch['repeats'] == 3
    assert per_epoch['samples'] == pytest.approx(
        [c / f for c, f in zip(models['crane']['epoch_seconds']['samples'],
                               models['freedom']['epoch_seconds']['samples'])])
    parts = saved['step_breakdown_ms']
    assert set(parts) == {'crane', 'freedom', 'lightgcn'}
    crane = parts['crane']
    assert crane['semantic_rest'] == pytest.approx(
        crane['semantic'] - crane['encoders'] - crane['rca'])
    assert crane['optimizer'] == pytest.approx(crane['step'] - crane['loss_backward'])
    # RCA runs on every item and the first batch's unique users
    from crane_pyg.data import BPRSampler, load_mmrec
    data = load_mmrec(synthetic_root)
    users = next(iter(BPRSampler.from_data(data, seed=0).batches(0, 512)))[0]
    assert crane['rca_rows'] == data['item'].num_nodes + torch.unique(users).numel()
    assert crane['rca_matmul_floor'] > 0 and parts['freedom']['step'] > 0


def test_baseline_rss_does_not_inherit_the_parents_memory():
    """A child's peak resident set is its own: a parent holding 400 MiB more
    does not raise it (``ru_maxrss`` on Linux would: a forked child starts
    from the parent's resident set)."""
    before = common.baseline_rss_mb()
    ballast = np.ones(400 * 2 ** 20 // 8)  # 400 MiB, touched
    after = common.baseline_rss_mb()
    assert ballast.sum() > 0
    assert abs(after - before) < 50, (before, after)


def test_tiktok_epoch_time_precision_settings(synthetic_root, tmp_path):
    """Precision suffixes: ``crane-bf16`` is timed and validated next to
    ``crane`` and FREEDOM, gets its ratio, and the breakdown has its parts
    and RCA's bfloat16 floor (where the CPU has bfloat16)."""
    from crane_pyg.train.precision import bf16_support
    out = tmp_path / 't.json'
    assert tiktok_epoch_time.main([
        '--data-root', str(synthetic_root.parent), '--dataset', synthetic_root.name,
        '--models', 'crane,crane-bf16,crane-cache2,freedom', '--epochs', '3', '--warmup', '0',
        '--batch-size', '1024', '--breakdown', '--breakdown-repeats', '3',
        '--output', str(out)]) == 0
    saved = json.loads(out.read_text())
    bf16 = bf16_support(torch.device('cpu'))[0]
    models = saved['models']
    assert models['crane']['precision'] == 'fp32'
    assert models['crane-bf16']['precision'] == ('bf16' if bf16 else 'fp32')
    assert 0.0 <= models['crane-bf16']['validation']['recall@20'] <= 1.0
    assert models['crane-cache2']['semantic_cache'] == 2 and models['crane']['semantic_cache'] is None
    assert 'ratio_crane_cache2_over_freedom' in saved
    assert saved['ratio_crane_bf16_over_freedom'] == pytest.approx(
        models['crane-bf16']['epoch_seconds']['median']
        / models['freedom']['epoch_seconds']['median'])
    parts = saved['step_breakdown_ms']
    if bf16:
        assert parts['crane-bf16']['step'] > 0 and parts['crane']['rca_matmul_floor_bf16'] > 0
    with pytest.raises(SystemExit):
        tiktok_epoch_time.main(['--models', 'crane-fp16', '--output', str(out)])
    with pytest.raises(SystemExit):
        tiktok_epoch_time.main(['--models', 'freedom-cache2', '--output', str(out)])
