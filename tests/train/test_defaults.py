"""One source of truth per default: the packaged YAML files agree with the
class signatures, list every option, and every documented option can be set
from YAML and --set."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from crane_pyg.models import MODELS
from crane_pyg.train import TrainConfig, load_config
from crane_pyg.train.config import CONFIG_DIR, DataConfig, model_option_types
from crane_pyg.train.trainer import run_name

#: model options deliberately absent from the model files: the model's seed
#: follows train.seed unless set (a YAML value would pin it)
NOT_IN_YAML = {'seed'}


def _same(yaml_value, default) -> bool:
    if isinstance(default, tuple):
        return list(default) == yaml_value
    return yaml_value == default and type(yaml_value) in (type(default), int, type(None))


def _yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_model_files_match_the_class_signatures(name):
    options = model_option_types(MODELS[name])
    listed = _yaml(CONFIG_DIR / 'model' / f'{name}.yaml')['model']
    assert set(listed) <= set(options), f'{name}.yaml: unknown {set(listed) - set(options)}'
    assert set(options) - set(listed) == NOT_IN_YAML & set(options), \
        f'{name}.yaml lacks {set(options) - set(listed) - NOT_IN_YAML}'
    for key, value in listed.items():
        assert _same(value, options[key][1]), \
            f'{name}.yaml: {key}: {value!r}, but {MODELS[name].__name__} defaults to ' \
            f'{options[key][1]!r}'


@pytest.mark.parametrize('section, cls', [('train', TrainConfig), ('dataset', DataConfig)])
def test_overall_file_matches_the_config_dataclasses(section, cls):
    listed = _yaml(CONFIG_DIR / 'overall.yaml')[section]
    fields = {f.name: (f.default if f.default is not dataclasses.MISSING
                       else f.default_factory()) for f in dataclasses.fields(cls)}
    expected = set(fields) - {'name'}  # the dataset's name comes from the command line
    assert set(listed) == expected, (set(listed) ^ expected)
    for key, value in listed.items():
        assert _same(value, fields[key]), f'overall.yaml: {section}.{key}: {value!r} != ' \
            f'{fields[key]!r}'


def test_every_train_option_is_documented():
    doc = TrainConfig.__doc__
    for f in dataclasses.fields(TrainConfig):
        assert f'        {f.name} (' in doc, f'TrainConfig.{f.name} is not documented'


def test_mask_valid_in_test_from_set_and_yaml(tmp_path):
    assert load_config().train.mask_valid_in_test is False
    cfg = load_config(overrides=['train.mask_valid_in_test=true'])
    assert cfg.train.mask_valid_in_test is True
    path = tmp_path / 'strict.yaml'
    path.write_text('train:\n  mask_valid_in_test: true\n')
    assert load_config(config_file=path).train.mask_valid_in_test is True


def test_a_later_option_at_its_default_keeps_run_names():
    """Runs recorded before train.mask_valid_in_test existed keep their folder
    (and stay resumable); setting it gives another folder."""
    cfg = load_config().to_dict()
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    del older['train']['mask_valid_in_test']
    assert run_name('d', 'm', 0, cfg) == run_name('d', 'm', 0, older)
    strict = load_config(overrides=['train.mask_valid_in_test=true']).to_dict()
    assert run_name('d', 'm', 0, strict) != run_name('d', 'm', 0, cfg)
