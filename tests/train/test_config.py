"""Configuration: layering, unknown keys, types, grids and validation-based selection."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Tuple

import pytest

from crane_pyg.train import config as config_module
from crane_pyg.train import trainer as trainer_module
from crane_pyg.train.config import (ConfigError, DataConfig, TrainConfig, expand_grid,
                                    load_config, load_yaml, parse_override)


class Alpha:
    """Signature-only stand-in for a model class (options: keyword-only args)."""
    def __init__(self, num_users: int, num_items: int, *, dim: int = 8, lam: float = 0.1,
                 mode: Literal['a', 'b'] = 'a', weights: Optional[Tuple[float, ...]] = None,
                 flag: bool = False, seed: int = 0) -> None:
        pass


class Beta:
    def __init__(self, num_users: int, num_items: int, *, depth: int = 2) -> None:
        pass


REGISTRY = {'alpha': Alpha, 'beta': Beta}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_dir(tmp_path):
    root = tmp_path / 'configs'
    write(root / 'overall.yaml', 'train:\n  lr: 1e-3\n  epochs: 100\n  patience: 7\n'
                                 '  batch_size: 64\n')
    write(root / 'model' / 'alpha.yaml', 'model:\n  dim: 16\n  lam: 0.2\n'
                                         'train:\n  epochs: 50\n')
    write(root / 'model' / 'beta.yaml', 'model:\n  depth: 3\n')
    write(root / 'dataset' / 'toy.yaml',
          'dataset:\n  modalities: [image]\n'
          'train:\n  patience: 5\n'
          'models:\n  alpha:\n    model:\n      lam: 0.3\n    train:\n      lr: 2e-3\n'
          '  beta:\n    model:\n      depth: 4\n')
    return root


def load(config_dir, **kwargs):
    return load_config(config_dir=config_dir, registry=REGISTRY, **kwargs)


# ---------------------------------------------------------------------------
# layering
# ---------------------------------------------------------------------------
def test_layering_order_and_sources(config_dir, tmp_path):
    user = write(tmp_path / 'user.yaml', 'model:\n  dim: 32\ntrain:\n  batch_size: 128\n')
    cfg = load(config_dir, model='alpha', dataset='toy', config_file=user,
               overrides=['train.batch_size=256', 'model.flag=true'],
               flags={'train.seed': 7})
    # overall < model yaml < dataset yaml < dataset's models.alpha < user < --set < flags
    assert cfg.train.lr == 2e-3                      # dataset's per-model block
    assert cfg.train.epochs == 50                    # model yaml over overall
    assert cfg.train.patience == 5                   # dataset yaml over overall
    assert cfg.train.batch_size == 256               # --set over user file
    assert cfg.train.seed == 7                       # flag
    assert cfg.model_options['dim'] == 32            # user file over model yaml
    assert cfg.model_options['lam'] == 0.3           # dataset's per-model block over model yaml
    assert cfg.model_options['flag'] is True
    assert cfg.dataset == DataConfig(name='toy', root=None, modalities=['image'])
    assert cfg.sources['train.epochs'] == str(config_dir / 'model' / 'alpha.yaml')
    assert cfg.sources['train.lr'] == f"{config_dir / 'dataset' / 'toy.yaml'} (models.alpha)"
    assert cfg.sources['train.batch_size'].startswith('command line (--set')
    assert cfg.sources['model.dim'] == str(user)
    # untouched fields keep the dataclass defaults
    assert cfg.train.stop_metric == 'recall@20' and cfg.train.ks == (10, 20, 50)


def test_per_model_block_applies_only_to_its_model(config_dir):
    cfg = load(config_dir, model='beta', dataset='toy')
    assert cfg.model_options == {'depth': 4}
    assert cfg.train.lr == 1e-3  # alpha's block does not apply


def test_dataset_without_yaml_uses_defaults(config_dir):
    cfg = load(config_dir, model='beta', dataset='unknown-set')
    assert cfg.dataset.modalities is None and cfg.train.patience == 7


def test_names_from_user_file_and_set(config_dir, tmp_path):
    user = write(tmp_path / 'u.yaml', 'model:\n  name: beta\ndataset:\n  name: toy\n')
    cfg = load(config_dir, config_file=user)
    assert (cfg.model_name, cfg.dataset.name) == ('beta', 'toy')
    assert cfg.model_options['depth'] == 4  # the dataset file selected by the user file
    cfg = load(config_dir, config_file=user, overrides=['model.name=alpha'])
    assert cfg.model_name == 'alpha'
    cfg = load(config_dir, model='alpha', config_file=write(tmp_path / 'v.yaml', ''),
               overrides=['model.name=beta'])
    assert cfg.model_name == 'alpha'  # the explicit --model wins


def test_model_seed_follows_train_seed_unless_set(config_dir):
    cfg = load(config_dir, model='alpha', flags={'train.seed': 5})
    assert cfg.model_options['seed'] == 5
    assert cfg.with_values({'train.seed': 11}).model_options['seed'] == 11
    cfg = load(config_dir, model='alpha', overrides=['model.seed=3'], flags={'train.seed': 5})
    assert cfg.model_options['seed'] == 3


def test_to_dict_is_complete(config_dir):
    cfg = load(config_dir, model='alpha')
    d = cfg.to_dict()
    assert d['model']['name'] == 'alpha'
    assert d['model']['mode'] == 'a' and d['model']['dim'] == 16  # default + set
    assert d['train']['ks'] == [10, 20, 50]
    json.dumps(d)  # plain data


# ---------------------------------------------------------------------------
# unknown keys: one test per level, each naming the file and the key
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('level', ['overall', 'model', 'dataset', 'dataset-models'])
def test_unknown_key_in_packaged_files(config_dir, level):
    path = {'overall': config_dir / 'overall.yaml',
            'model': config_dir / 'model' / 'alpha.yaml',
            'dataset': config_dir / 'dataset' / 'toy.yaml',
            'dataset-models': config_dir / 'dataset' / 'toy.yaml'}[level]
    if level == 'dataset-models':
        write(path, 'models:\n  beta:\n    model:\n      detph: 3\n')
        key, suggestion = 'models.beta.model.detph', 'model.depth'
    elif level == 'model':
        write(path, 'model:\n  lamb: 0.5\n')
        key, suggestion = 'model.lamb', 'model.lam'
    else:
        write(path, 'train:\n  pateince: 3\n')
        key, suggestion = 'train.pateince', 'train.patience'
    with pytest.raises(ConfigError) as info:
        load(config_dir, model='alpha', dataset='toy')
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message
    assert f"did you mean '{suggestion}'" in message
    assert info.value.source == str(path) and info.value.key == key


def test_unknown_key_in_user_file(config_dir, tmp_path):
    user = write(tmp_path / 'mine.yaml', 'train:\n  learning_rate: 0.1\n')
    with pytest.raises(ConfigError, match=r"mine\.yaml: key 'train\.learning_rate': unknown key"):
        load(config_dir, model='alpha', config_file=user)


def test_unknown_key_on_command_line(config_dir):
    with pytest.raises(ConfigError) as info:
        load(config_dir, model='alpha', overrides=['model.lamda=0.5'])
    assert "command line (--set model.lamda=0.5)" in str(info.value)
    assert "did you mean 'model.lam'" in str(info.value)


def test_unknown_section_and_model(config_dir, tmp_path):
    user = write(tmp_path / 'u.yaml', 'trian:\n  lr: 0.1\n')
    with pytest.raises(ConfigError, match=r"key 'trian': unknown section.*did you mean 'train'"):
        load(config_dir, model='alpha', config_file=user)
    with pytest.raises(ConfigError, match=r"unknown model 'alpah'.*did you mean 'alpha'"):
        load(config_dir, model='alpah')
    write(config_dir / 'dataset' / 'toy.yaml', 'models:\n  gamma:\n    model: {}\n')
    with pytest.raises(ConfigError, match=r"toy\.yaml: key 'models\.gamma': unknown model"):
        load(config_dir, model='alpha', dataset='toy')


def test_packaged_files_cannot_set_names_or_grid(config_dir):
    write(config_dir / 'model' / 'alpha.yaml', 'model:\n  name: beta\n')
    with pytest.raises(ConfigError, match=r"alpha\.yaml: key 'model\.name'"):
        load(config_dir, model='alpha')
    write(config_dir / 'model' / 'alpha.yaml', 'grid:\n  model.dim: [1, 2]\n')
    with pytest.raises(ConfigError, match=r"alpha\.yaml: key 'grid'"):
        load(config_dir, model='alpha')


# ---------------------------------------------------------------------------
# types
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('text, key, expected', [
    ('train:\n  lr: abc\n', 'train.lr', 'expected float'),
    ('train:\n  epochs: 1.5\n', 'train.epochs', 'expected int'),
    ('train:\n  epochs: true\n', 'train.epochs', 'expected int'),
    ('train:\n  deterministic: 1\n', 'train.deterministic', 'expected bool'),
    ('train:\n  ks: 20\n', 'train.ks', 'expected a list of int'),
    ('model:\n  mode: c\n', 'model.mode', "expected one of 'a', 'b'"),
    ('model:\n  weights: [0.1, x]\n', 'model.weights', 'expected a list of float or null'),
    ('dataset:\n  modalities: image\n', 'dataset.modalities', 'expected a list of str'),
])
def test_type_errors_name_file_key_and_type(config_dir, tmp_path, text, key, expected):
    user = write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError) as info:
        load(config_dir, model='alpha', config_file=user)
    message = str(info.value)
    assert message.startswith(f"{user}: key '{key}': {expected}")


def test_value_errors(config_dir):
    with pytest.raises(ConfigError, match=r"key 'train\.lr': must be > 0"):
        load(config_dir, model='alpha', overrides=['train.lr=0'])
    with pytest.raises(ConfigError, match=r"'train\.stop_metric'.*cut-off 30"):
        load(config_dir, model='alpha', overrides=['train.stop_metric=recall@30'])
    with pytest.raises(ConfigError, match=r"'train\.stop_metric'.*metric one of"):
        load(config_dir, model='alpha', overrides=['train.stop_metric=auc@20'])
    # the cross-field check names where ks came from
    with pytest.raises(ConfigError, match=r"--set train\.ks=\[5\]\): key 'train\.stop_metric'"):
        load(config_dir, model='alpha', overrides=['train.ks=[5]'])
    cfg = load(config_dir, model='alpha',
               overrides=['train.ks=[5, 10]', 'train.stop_metric=ndcg@10'])
    assert cfg.train.ks == (5, 10)


def test_coercions_and_yaml_floats(config_dir, tmp_path):
    user = write(tmp_path / 'ok.yaml', 'train:\n  lr: 5e-4\n  weight_decay: 0\n'
                                       'model:\n  weights: [1, 2.5]\n')
    cfg = load(config_dir, model='alpha', config_file=user)
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)   # YAML 1.1 would read a str
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.model_options['weights'] == (1.0, 2.5)
    assert parse_override('train.lr=1E-2') == ('train.lr', 0.01)
    assert parse_override('model.weights=[0.1, 0.9]') == ('model.weights', [0.1, 0.9])
    assert parse_override('dataset.root=./data') == ('dataset.root', './data')
    with pytest.raises(ConfigError, match='expected KEY=VALUE'):
        parse_override('train.lr')


def test_yaml_errors_name_file_and_line(tmp_path):
    dup = write(tmp_path / 'dup.yaml', 'train:\n  lr: 0.1\n  lr: 0.2\n')
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 3: .*duplicate key 'lr'"):
        load_yaml(dup)
    broken = write(tmp_path / 'broken.yaml', 'train:\n  lr: [0.1\n')
    with pytest.raises(ConfigError, match=r'broken\.yaml: line \d+: invalid YAML'):
        load_yaml(broken)
    with pytest.raises(ConfigError, match='config file not found'):
        load_yaml(tmp_path / 'missing.yaml')
    with pytest.raises(ConfigError, match='expected a mapping'):
        load_yaml(write(tmp_path / 'list.yaml', '- 1\n'))
    assert load_yaml(write(tmp_path / 'empty.yaml', '')) == {}


def test_dataclasses_validate_direct_construction():
    assert TrainConfig(lr=1).lr == 1.0
    assert TrainConfig(ks=[5, 10], stop_metric='hit@5').ks == (5, 10)
    with pytest.raises(ConfigError, match="'train.batch_size': expected int"):
        TrainConfig(batch_size='big')
    with pytest.raises(ConfigError, match="'train.patience': must be >= 1"):
        TrainConfig(patience=0)
    with pytest.raises(ConfigError, match="'train.device'"):
        TrainConfig(device='gpu')
    with pytest.raises(ConfigError, match="'dataset.name'"):
        DataConfig(name='a/b')


# ---------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------
def test_expand_grid_is_the_cartesian_product():
    points = expand_grid({'model.lam': [0.1, 0.2], 'train.lr': [1e-3, 5e-4, 1e-4]})
    assert len(points) == 6
    assert points[0] == {'model.lam': 0.1, 'train.lr': 1e-3}
    assert points[1] == {'model.lam': 0.1, 'train.lr': 5e-4}   # last key varies fastest
    assert points[-1] == {'model.lam': 0.2, 'train.lr': 1e-4}
    assert {(p['model.lam'], p['train.lr']) for p in points} == {
        (a, b) for a in (0.1, 0.2) for b in (1e-3, 5e-4, 1e-4)}
    assert expand_grid({}) == [{}]


def test_grid_from_file_and_command_line(config_dir, tmp_path):
    user = write(tmp_path / 'grid.yaml', 'grid:\n  model.lam: [0.01, 0.1]\n  train.lr: [1e-3]\n')
    cfg = load(config_dir, model='alpha', config_file=user,
               overrides=['grid.train.lr=[1e-3, 5e-4]', 'grid.model.dim=[4, 8]'])
    assert cfg.grid == {'model.lam': [0.01, 0.1], 'train.lr': [1e-3, 5e-4],
                        'model.dim': [4, 8]}
    assert len(expand_grid(cfg.grid)) == 8
    point = cfg.with_values({'model.lam': 0.01, 'train.lr': 5e-4, 'model.dim': 4})
    assert point.grid == {} and point.train.lr == 5e-4 and point.model_options['dim'] == 4
    assert point.sources['train.lr'] == 'grid'
    bad = write(tmp_path / 'bad.yaml', 'grid:\n  model.dim: [4, 8.5]\n')
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'grid\.model\.dim': expected int"):
        load(config_dir, model='alpha', config_file=bad)
    bad = write(tmp_path / 'bad2.yaml', 'grid:\n  model.dimm: [4]\n')
    with pytest.raises(ConfigError, match=r"key 'grid\.model\.dimm'.*did you mean 'model\.dim'"):
        load(config_dir, model='alpha', config_file=bad)
    bad = write(tmp_path / 'bad3.yaml', 'grid:\n  model.name: [alpha, beta]\n')
    with pytest.raises(ConfigError, match='cannot vary in a grid'):
        load(config_dir, model='alpha', config_file=bad)
    with pytest.raises(ConfigError, match='non-empty list'):
        load(config_dir, model='alpha', overrides=['grid.train.lr=[]'])


def _fake_results(valid: float, test: float, epoch: int) -> dict:
    return {'status': 'completed', 'best_epoch': epoch, 'stop_metric': 'recall@20',
            'valid': {'recall@20': valid, 'ndcg@20': valid / 2},
            'test': {'recall@20': test, 'ndcg@20': test / 2}}


def test_grid_selects_by_validation_never_by_test(config_dir, tmp_path):
    cfg = load(config_dir, model='alpha', overrides=['grid.model.lam=[0.01, 0.1, 1.0]'])
    # point 0 has the best test score, point 1 the best validation score
    table = {0.01: (0.10, 0.30, 3), 0.1: (0.20, 0.05, 7), 1.0: (0.15, 0.10, 2)}
    calls = []

    def runner(point_cfg, out_dir, **kwargs):
        calls.append((point_cfg.model_options['lam'], Path(out_dir)))
        return _fake_results(*table[point_cfg.model_options['lam']])

    out = tmp_path / 'run'
    results = trainer_module.run_grid(cfg, out, runner=runner, data=object(), log=lambda s: None)
    assert [lam for lam, _ in calls] == [0.01, 0.1, 1.0]
    assert [d.name for _, d in calls] == ['000', '001', '002']
    summary = json.loads((out / 'grid_summary.json').read_text())
    assert summary['winner'] == 1 and summary['params'] == {'model.lam': 0.1}
    assert summary['selected_by'] == 'valid recall@20'
    assert [p['winner'] for p in summary['points']] == [False, True, False]
    assert [p['test']['recall@20'] for p in summary['points']] == [0.30, 0.05, 0.10]
    assert results['valid']['recall@20'] == 0.20 and results['best_epoch'] == 7
    assert json.loads((out / 'results.json').read_text())['grid']['winner'] == 1
    markdown = (out / 'grid_summary.md').read_text()
    rows = [line for line in markdown.splitlines() if line.startswith('| ')][1:]
    assert len(rows) == 3 and '**winner**' in rows[1] and '**winner**' not in rows[0]


def test_grid_ties_go_to_the_first_point_and_resume_skips_finished(config_dir, tmp_path):
    cfg = load(config_dir, model='alpha', overrides=['grid.model.dim=[1, 2, 3]'])
    out = tmp_path / 'run'
    calls = []

    def runner(point_cfg, out_dir, **kwargs):
        calls.append(point_cfg.model_options['dim'])
        res = _fake_results(0.5, float(point_cfg.model_options['dim']), 1)
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / 'results.json').write_text(json.dumps(res))
        return res

    results = trainer_module.run_grid(cfg, out, runner=runner, data=object(), log=lambda s: None)
    assert results['grid']['winner'] == 0
    calls.clear()
    trainer_module.run_grid(cfg, out, runner=runner, data=object(), resume=True,
                            log=lambda s: None)
    assert calls == []  # every point was read back


# ---------------------------------------------------------------------------
# the packaged YAML files against the real models
# ---------------------------------------------------------------------------
def _packaged_datasets() -> list[str]:
    return sorted(p.stem for p in (config_module.CONFIG_DIR / 'dataset').glob('*.yaml'))


def test_packaged_files_exist():
    assert set(_packaged_datasets()) >= {'baby', 'sports', 'clothing', 'elec', 'tiktok',
                                         'synthetic'}
    for model in ('crane', 'lightgcn', 'vbpr', 'freedom', 'mgcn', 'lgmrec'):
        assert (config_module.CONFIG_DIR / 'model' / f'{model}.yaml').is_file()


@pytest.mark.parametrize('dataset', _packaged_datasets())
@pytest.mark.parametrize('model', ['crane', 'lightgcn', 'vbpr', 'freedom', 'mgcn', 'lgmrec'])
def test_packaged_files_are_valid_for_every_model(model, dataset):
    cfg = load_config(model=model, dataset=dataset)
    assert cfg.model_name == model and cfg.dataset.name == dataset
    assert cfg.train.stop_metric == 'recall@20' and cfg.train.seed == 999


def test_packaged_defaults_follow_the_protocol():
    cfg = load_config(model='crane', dataset='baby')
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.patience) == \
        (1e-3, 2048, 1000, 20)
    assert cfg.train.ks == (10, 20, 50)
    assert cfg.dataset.modalities == ['image', 'text']
    assert cfg.model_options['modality_weights'] == (0.1, 0.9)
    default = load_config()
    assert (default.model_name, default.dataset.name) == ('crane', 'synthetic')
    assert default.train.epochs < 1000  # a short budget for the embedded default run


# ---------------------------------------------------------------------------
# search spaces (compare_models.py --tune)
# ---------------------------------------------------------------------------
def test_search_space_from_the_model_file(config_dir, tmp_path):
    write(config_dir / 'model' / 'alpha.yaml',
          'model:\n  dim: 16\nsearch:\n  model.lam: [0.1, 0.2]\n  train.lr: [1e-3]\n')
    space = config_module.search_space('alpha', config_dir=config_dir, registry=REGISTRY)
    assert space == {'model.lam': [0.1, 0.2], 'train.lr': [1e-3]}
    assert config_module.search_space('beta', config_dir=config_dir, registry=REGISTRY) == {}
    # training ignores it
    assert load(config_dir, model='alpha').model_options['dim'] == 16
    write(config_dir / 'model' / 'alpha.yaml', 'search:\n  model.lamb: [0.1]\n')
    with pytest.raises(ConfigError, match='lamb'):
        config_module.search_space('alpha', config_dir=config_dir, registry=REGISTRY)
    write(config_dir / 'model' / 'alpha.yaml', 'search:\n  model.lam: []\n')
    with pytest.raises(ConfigError, match='non-empty'):
        config_module.search_space('alpha', config_dir=config_dir, registry=REGISTRY)
    user = write(tmp_path / 'mine.yaml', 'search:\n  model.lam: [0.1]\n')
    with pytest.raises(ConfigError, match='packaged model file'):
        load(config_dir, model='alpha', config_file=user)


def test_packaged_search_spaces_give_every_model_the_same_budget():
    sizes = {model: len(expand_grid(config_module.search_space(model)))
             for model in ('crane', 'lightgcn', 'vbpr', 'freedom', 'mgcn', 'lgmrec')}
    assert len(set(sizes.values())) == 1 and sizes['crane'] > 1, sizes
