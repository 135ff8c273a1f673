r"""Experiment configuration: typed dataclasses, layered YAML files and
command-line overrides.

A configuration has four sections, each a key of the YAML files:

.. code-block:: yaml

    dataset:            # DataConfig
      name: baby
      root: ./data
    model:              # the model's keyword-only __init__ options (+ 'name')
      name: crane
      lambda_cl: 0.1
    train:              # TrainConfig
      lr: 0.001
    grid:               # optional hyper-parameter grid: dotted key -> list of values
      model.lambda_cl: [0.01, 0.1]

Layers, each overriding the previous one (MMRec's layering, plus the command line):

1. ``crane_pyg/configs/overall.yaml``: the evaluation protocol's defaults;
2. ``crane_pyg/configs/model/<model>.yaml``: the model's defaults;
3. ``crane_pyg/configs/dataset/<dataset>.yaml``: the dataset's settings; its
   ``models: {<model>: {...}}`` block holds per-model overrides for that
   dataset (same sections as a layer), applied right after it;
4. the user's ``--config FILE`` (may also hold a ``models:`` block);
5. ``--set KEY=VALUE`` command-line overrides with dotted keys
   (``--set train.lr=5e-4 --set model.lambda_cl=0.05``; the value is parsed as
   YAML, ``--set 'grid.train.lr=[1e-3, 5e-4]'`` sets a grid axis), then the
   dedicated flags (``--epochs``, ``--seed``, ...).

Merging replaces values (a dict-valued option such as ``modality_weights`` is
replaced as a whole, not merged). Every key is checked when its layer is read:
an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the file (or command-line flag), the dotted key and, for unknown keys,
the closest valid key. Model options are checked against the keyword-only
parameters of the model's ``__init__`` (their annotations give the types), so
a model's signature is its configuration schema.

The model and dataset names select which files are layered, so they are
resolved first, from (highest first) the explicit ``model=``/``dataset=``
arguments (the ``--model``/``--dataset`` flags), ``--set model.name=...``,
the user file, and the defaults (``crane`` on ``synthetic``). The packaged
YAML files may not set the names or a grid.

A packaged model file may declare the model's hyper-parameter **search
space** (MMRec's ``hyper_parameters``), a ``search:`` mapping dotted key ->
list of values like a grid; training ignores it, and
``benchmarks/compare_models.py --tune`` searches it (:func:`search_space`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import itertools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, Union

import yaml

from crane_pyg.metrics import METRIC_NAMES  # the metric names of ``train.stop_metric``

__all__ = [
    'ConfigError', 'DataConfig', 'TrainConfig', 'ExperimentConfig', 'CONFIG_DIR',
    'METRIC_NAMES', 'load_config', 'expand_grid', 'parse_override', 'load_yaml',
    'default_data_root', 'search_space',
]

#: directory of the packaged YAML files
CONFIG_DIR: Path = Path(__file__).resolve().parents[1] / 'configs'

SECTIONS = ('dataset', 'model', 'train')
_LAYER_KEYS = SECTIONS + ('grid', 'models', 'search')
COMMAND_LINE = 'command line'
_INT64_MAX = 2**63 - 1
_FOLLOWS_TRAIN_SEED = 'train.seed (a model seed follows the training seed unless set)'


class ConfigError(ValueError):
    r"""An invalid configuration. The message starts with the file (or
    ``command line``) and the dotted key at fault.

    Attributes:
        source (str or None): the file or command-line flag.
        key (str or None): the dotted key.
    """
    def __init__(self, message: str, source: str | None = None,
                 key: str | None = None) -> None:
        self.source = source
        self.key = key
        prefix = ''
        if source is not None:
            prefix = f'{source}: '
        if key is not None:
            prefix += f"key '{key}': "
        super().__init__(prefix + message)


# ---------------------------------------------------------------------------
# the dataclasses
# ---------------------------------------------------------------------------
@dataclass
class DataConfig:
    r"""Which dataset to load.

    Attributes:
        name (str): dataset name, the folder ``<root>/<name>/`` holding
            ``<name>.inter`` and ``<modality>_feat.npy`` files (MMRec format).
            ``'synthetic'`` with no ``root`` is the embedded synthetic dataset
            (:func:`crane_pyg.data.load_synthetic`). (default: ``'synthetic'``)
        root (str, optional): the folder holding the dataset folders; ``None``
            means ``$CRANE_DATA_ROOT``, else ``./data``. (default: ``None``)
        modalities (list of str, optional): the modalities to use, each of
            which must be present; ``None`` uses every ``*_feat.npy`` file of
            the folder, ``[]`` none (ID-only). (default: ``None``)
    """
    name: str = 'synthetic'
    root: Union[str, None] = None
    modalities: Union[list[str], None] = None

    def __post_init__(self) -> None:
        _coerce_fields(self, 'dataset')
        if not self.name or '/' in self.name or self.name in ('.', '..'):
            raise ConfigError(f'must be a folder name, got {self.name!r}', key='dataset.name')


@dataclass
class TrainConfig:
    r"""The training and evaluation protocol (MMRec's defaults).

    Attributes:
        lr (float): Adam learning rate. (default: ``1e-3``)
        weight_decay (float): Adam weight decay (L2 on all parameters, on top
            of the models' own batch regularisers). (default: ``0.0``)
        batch_size (int): BPR triples per optimisation step. (default: ``2048``)
        epochs (int): maximum number of training epochs. (default: ``1000``)
        patience (int): early stopping: stop after this many consecutive
            *evaluations* without improvement of ``stop_metric`` on the
            validation split. (default: ``20``)
        eval_every (int): evaluate on the validation split every this many
            epochs (and after the last epoch). (default: ``1``)
        stop_metric (str): validation metric for early stopping and model
            selection, ``<metric>@<k>`` with metric in :data:`METRIC_NAMES` and
            ``k`` in ``ks``. (default: ``'recall@20'``)
        ks (tuple of int): evaluation cut-offs, at most the number of items
            of the dataset (checked by :class:`~crane_pyg.train.Trainer`).
            (default: ``(10, 20, 50)``)
        eval_batch_size (int): users scored at once in full-ranking evaluation
            (memory ``O(eval_batch_size x num_items)``). (default: ``4096``)
        seed (int): seed of Python, NumPy, torch and the BPR sampler
            (MMRec's default seed). (default: ``999``)
        deterministic (bool): deterministic torch kernels
            (``torch.use_deterministic_algorithms(True, warn_only=True)``) and a
            fixed number of CPU threads (``num_threads``, else 1).
            (default: ``False``)
        device (str): ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'``,
            ``'cuda:<n>'`` or ``'mps'``. (default: ``'auto'``)
        num_threads (int, optional): CPU threads for torch; ``None`` keeps
            torch's default. More than the CPUs available to the process is
            allowed (a configuration stays valid on other machines) but warned
            about by :class:`~crane_pyg.train.Trainer`. (default: ``None``)
        grad_clip (float, optional): clip the gradient norm to this value;
            ``None`` disables clipping. (default: ``None``)
        flush_denormal (bool): :func:`torch.set_flush_denormal` on CPU:
            denormal floats (below ~1.2e-38) become zero. Arithmetic on
            denormals is many times slower on x86 CPUs: a CRANE run on TikTok
            with ``content_reg`` slowed from 6 s to 78 s per epoch as its
            activations drifted into that range (a step of its checkpoint took
            657 ms, 274 ms with flushing). The change of results is below
            float32 precision. (default: :obj:`True`)
        num_neighbors (list of int, optional): mini-batch mode
            (:mod:`crane_pyg.models.minibatch`, CRANE and LightGCN; other
            models raise :class:`TypeError`): each step propagates over the
            batch's sampled user-item L-hop subgraph with this fan-out per hop
            (``-1``: all neighbours, exact), one entry per user-item layer
            (LightGCN ``num_layers``, CRANE ``num_ui_layers``); CRANE also
            computes its semantic view on the batch's items and their
            item-item neighbourhood only, with the item mean of a user over
            at most ``num_neighbors[0]`` of its items. Evaluation stays
            full-batch. ``None``: full-batch training. (default: ``None``)
        compile (bool): compile the model's dense hot spots with
            :func:`torch.compile` before training
            (:meth:`~crane_pyg.models.Recommender.compile_modules`; CRANE:
            its RCA module: a TikTok epoch 3.24 -> 2.48 s on 2 CPU cores; the
            baselines have nothing to compile and say so in the log). Costs
            seconds of compilation at the start (23 s on 2 CPU cores with a
            cold cache, 4 s warm) and needs a C++ compiler (CPU) or Triton (CUDA).
            (default: :obj:`False`)
        mask_valid_in_test (bool): when ranking for the test split, also
            mask each user's validation items (the stricter protocol); the
            default masks training items only, as MMRec does (see
            :class:`~crane_pyg.metrics.FullRankingEvaluator`).
            (default: :obj:`False`)
        semantic_cache (int, optional): CRANE only: the training loss runs
            the encoders and RCA on the batch's items only and reads every
            other item's RCA code from a cache refreshed (without gradient)
            at each epoch start and every this many steps
            (:mod:`crane_pyg.models.semantic_cache`); evaluation stays exact.
            With ``num_neighbors`` the sampled-subgraph loss reads the
            item-graph neighbours' and the item mean's codes from the cache
            (:class:`~crane_pyg.models.MiniBatchCRANE`). ``None``: the exact
            loss.
            (default: ``None``)
        precision (str): ``'fp32'``, ``'bf16'`` (autocast of the dense
            parts: encoders, RCA, InfoNCE, the evaluation's embeddings; the
            sparse propagation, the weights, Adam and the ranking scores stay
            float32) or ``'tf32'`` (CUDA: TensorFloat-32 products). Where the
            device lacks the format the run falls back to float32 with one
            warning (:mod:`crane_pyg.train.precision`). (default: ``'fp32'``)
        logger (str): where the per-epoch loss parts and validation metrics
            go besides ``history.jsonl``: ``'csv'`` (``metrics.csv``, one
            row per epoch) or ``'tensorboard'`` (event files in
            ``tensorboard/``; needs the ``tensorboard`` package,
            ``pip install crane_pyg[tensorboard]``). (default: ``'csv'``)
    """
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 2048
    epochs: int = 1000
    patience: int = 20
    eval_every: int = 1
    stop_metric: str = 'recall@20'
    ks: tuple[int, ...] = (10, 20, 50)
    eval_batch_size: int = 4096
    seed: int = 999
    deterministic: bool = False
    device: str = 'auto'
    num_threads: Union[int, None] = None
    grad_clip: Union[float, None] = None
    flush_denormal: bool = True
    num_neighbors: Union[tuple[int, ...], None] = None
    compile: bool = False
    precision: Literal['fp32', 'bf16', 'tf32'] = 'fp32'
    semantic_cache: Union[int, None] = None
    logger: Literal['csv', 'tensorboard'] = 'csv'
    mask_valid_in_test: bool = False

    def __post_init__(self) -> None:
        _coerce_fields(self, 'train')
        problem = _check_train_values(dataclasses.asdict(self))
        if problem is not None:
            raise ConfigError(problem[1], key=f'train.{problem[0]}')


def _coerce_fields(obj: Any, section: str) -> None:
    r"""Type-checks (and coerces: int -> float, list -> tuple) every field of a
    config dataclass against its annotation."""
    for name, tp in _dataclass_types(type(obj)).items():
        object.__setattr__(obj, name, _check_value(getattr(obj, name), tp, None,
                                                   f'{section}.{name}'))


def _check_train_values(values: Mapping[str, Any]) -> tuple[str, str] | None:
    r"""Range checks of :class:`TrainConfig`; returns ``(field, message)`` of
    the first violation, or ``None``."""
    positive = ('batch_size', 'epochs', 'patience', 'eval_every', 'eval_batch_size')
    for name in positive:
        if name in values and values[name] < 1:
            return name, f'must be >= 1, got {values[name]!r}'
    for name in positive + ('seed', 'num_threads'):  # torch takes 64-bit integers
        if values.get(name) is not None and values[name] > _INT64_MAX:
            return name, f'must be at most 2**63 - 1 = {_INT64_MAX}, got {values[name]!r}'
    if 'lr' in values and not values['lr'] > 0:
        return 'lr', f'must be > 0, got {values["lr"]!r}'
    if 'weight_decay' in values and values['weight_decay'] < 0:
        return 'weight_decay', f'must be >= 0, got {values["weight_decay"]!r}'
    if 'seed' in values and values['seed'] < 0:
        return 'seed', f'must be >= 0, got {values["seed"]!r}'
    if values.get('num_threads') is not None and values['num_threads'] < 1:
        return 'num_threads', f'must be >= 1 or null, got {values["num_threads"]!r}'
    if values.get('grad_clip') is not None and not values['grad_clip'] > 0:
        return 'grad_clip', f'must be > 0 or null, got {values["grad_clip"]!r}'
    if values.get('semantic_cache') is not None:
        if values['semantic_cache'] < 1:
            return 'semantic_cache', (f'must be >= 1 (refresh the cache every this many '
                                      f'steps) or null, got {values["semantic_cache"]!r}')
    fanout = values.get('num_neighbors')
    if fanout is not None and (len(fanout) == 0 or any(k == 0 or k < -1 for k in fanout)):
        return 'num_neighbors', (f'must be a non-empty list of positive ints or -1 (all '
                                 f'neighbours), one per layer, or null; got {list(fanout)!r}')
    if 'ks' in values:
        ks = values['ks']
        if len(ks) == 0 or any(k < 1 for k in ks):
            return 'ks', f'must be a non-empty list of positive ints, got {list(ks)!r}'
    if 'device' in values and not re.fullmatch(r'auto|cpu|cuda(:\d+)?|mps', values['device']):
        return 'device', (f"must be 'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps', "
                          f"got {values['device']!r}")
    if 'stop_metric' in values:
        match = re.fullmatch(r'([a-z]+)@(\d+)', values['stop_metric'])
        if match is None or match.group(1) not in METRIC_NAMES:
            return 'stop_metric', (f"must be '<metric>@<k>' with metric one of "
                                   f"{list(METRIC_NAMES)}, got {values['stop_metric']!r}")
        if 'ks' in values and int(match.group(2)) not in values['ks']:
            return 'stop_metric', (f"cut-off {match.group(2)} of {values['stop_metric']!r} "
                                   f"is not in train.ks = {list(values['ks'])}")
    return None


def default_data_root() -> str:
    r"""``$CRANE_DATA_ROOT`` when set, else ``./data``."""
    return os.environ.get('CRANE_DATA_ROOT') or './data'


@dataclass
class ExperimentConfig:
    r"""A resolved experiment: dataset, model (name and options), training
    protocol and an optional hyper-parameter grid.

    Attributes:
        dataset (DataConfig): the dataset.
        model_name (str): key of :data:`crane_pyg.models.MODELS`.
        model_options (dict): the options set by the configuration (passed to
            ``from_data``); the model's own defaults apply to the others.
        model_defaults (dict): every option of the model with its default
            (for the record).
        train (TrainConfig): the protocol.
        grid (dict): dotted key -> list of values (empty: a single run).
        sources (dict): dotted key -> the file or flag that set it last.
    """
    dataset: DataConfig = field(default_factory=DataConfig)
    model_name: str = 'crane'
    model_options: dict[str, Any] = field(default_factory=dict)
    model_defaults: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    registry: Mapping[str, type] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        r"""The full configuration as plain data (the ``config`` of ``results.json``):
        model options include the model's defaults for options not set."""
        model = {'name': self.model_name}
        model.update({k: v for k, v in self.model_defaults.items() if _plain(v)})
        model.update(self.model_options)
        out: dict[str, Any] = {
            'dataset': dataclasses.asdict(self.dataset),
            'model': model,
            'train': dataclasses.asdict(self.train),
        }
        out['train']['ks'] = list(self.train.ks)
        if self.grid:
            out['grid'] = copy.deepcopy(self.grid)
        return out

    def with_values(self, values: Mapping[str, Any], source: str = 'grid') -> 'ExperimentConfig':
        r"""A copy with dotted keys set (type-checked like any layer), without the grid."""
        schema = _Schema(self.model_name, self.registry)
        flat = self._flat()
        sources = dict(self.sources)
        for key, value in values.items():
            if key in ('model.name', 'dataset.name'):
                raise ConfigError('the model and dataset names cannot vary in a grid',
                                  source, key)
            flat[key] = schema.check(key, value, source)
            sources[key] = source
        return _build(flat, {}, sources, schema)

    def _flat(self) -> dict[str, Any]:
        flat = {f'dataset.{k}': v for k, v in dataclasses.asdict(self.dataset).items()}
        flat.update({f'train.{k}': v for k, v in dataclasses.asdict(self.train).items()})
        flat.update({f'model.{k}': v for k, v in self.model_options.items()})
        flat['model.name'] = self.model_name
        return flat


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


# ---------------------------------------------------------------------------
# type checking against annotations
# ---------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return 'null'
    if origin is Literal:
        return 'one of ' + ', '.join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return ' or '.join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence, typing.Sequence, Iterable):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else 'values'
        if origin is tuple and args and Ellipsis not in typing.get_args(tp):
            return f'a list of {len(args)} values ({", ".join(_type_name(a) for a in args)})'
        return f'a list of {inner}'
    if origin in (dict, Mapping, typing.Mapping):
        args = typing.get_args(tp)
        return f'a mapping {_type_name(args[0])} -> {_type_name(args[1])}' if args else 'a mapping'
    if tp is float:
        return 'float'
    return getattr(tp, '__name__', str(tp))


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    r"""``value`` converted to annotation ``tp`` (int -> float, list -> tuple),
    or :class:`_Mismatch`. Supports ``Any``, ``None``, ``bool``, ``int``,
    ``float``, ``str``, ``Literal``, ``Optional``/``Union``, ``list``/``tuple``/
    ``Sequence`` and ``dict``/``Mapping``; other classes by ``isinstance``."""
    if tp is Any or tp is inspect.Parameter.empty or tp is object:
        return value
    if tp is None or tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        for option in typing.get_args(tp):
            if value == option and type(value) is type(option):
                return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        # exact type matches first, so that 1 stays an int in `int | float`
        for arg in args:
            if isinstance(arg, type) and type(value) is arg:
                return value
        for arg in args:
            try:
                return coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple, Sequence, typing.Sequence, Iterable) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Mismatch
            return tuple(coerce(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [coerce(v, inner) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        args = typing.get_args(tp) or (Any, Any)
        return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value  # an annotation we cannot interpret: accept


def _check_value(value: Any, tp: Any, source: str, key: str) -> Any:
    try:
        return coerce(value, tp)
    except _Mismatch:
        raise ConfigError(f'expected {_type_name(tp)}, got {value!r} '
                          f'({type(value).__name__})', source, key) from None


def _suggest(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ''


# ---------------------------------------------------------------------------
# the schema: which dotted keys exist and their types
# ---------------------------------------------------------------------------
def _dataclass_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def model_option_types(model_cls: type) -> dict[str, tuple[Any, Any]]:
    r"""``{option: (type, default)}`` of a model: the keyword-only parameters of
    its ``__init__`` (those with a default), annotations resolved."""
    try:
        hints = typing.get_type_hints(model_cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks
        hints = {}
    out: dict[str, tuple[Any, Any]] = {}
    for name, p in inspect.signature(model_cls.__init__).parameters.items():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty:
            out[name] = (hints.get(name, Any), p.default)
    return out


class _Schema:
    def __init__(self, model_name: str, registry: Mapping[str, type] | None) -> None:
        self.registry = registry if registry is not None else _default_registry()
        self.model_name = model_name
        self.sections = {
            'dataset': _dataclass_types(DataConfig),
            'train': _dataclass_types(TrainConfig),
        }
        self._models: dict[str, dict[str, tuple[Any, Any]]] = {}

    def model_types(self, name: str, source: str, key: str = 'model.name') -> dict:
        if name not in self.registry:
            raise ConfigError(f'unknown model {name!r}; available: {sorted(self.registry)}'
                              f'{_suggest(name, self.registry)}', source, key)
        if name not in self._models:
            self._models[name] = model_option_types(self.registry[name])
        return self._models[name]

    def all_keys(self, model_name: str) -> list[str]:
        keys = [f'{s}.{k}' for s, fields in self.sections.items() for k in fields]
        keys += ['model.name'] + [f'model.{k}' for k in self._models.get(model_name, {})]
        return keys

    def check(self, key: str, value: Any, source: str, model_name: str | None = None,
              display: str | None = None) -> Any:
        r"""Validates one dotted key/value; returns the coerced value."""
        model_name = model_name or self.model_name
        display = display or key
        section, _, name = key.partition('.')
        if section == 'model':
            if name == 'name':
                return _check_value(value, str, source, display)
            types_ = self.model_types(model_name, source)
            if name not in types_:
                raise ConfigError(
                    f'unknown option of model {model_name!r}'
                    f'{_suggest(key, [f"model.{k}" for k in types_])} '
                    f'(options: {", ".join(types_) or "none"})',
                    source, display)
            return _check_value(value, types_[name][0], source, display)
        if section in self.sections and name in self.sections[section]:
            coerced = _check_value(value, self.sections[section][name], source, display)
            if section == 'train':
                problem = _check_train_values({name: coerced})
                if problem is not None:
                    raise ConfigError(problem[1], source, display)
            return coerced
        self.model_types(model_name, source)
        candidates = self.all_keys(model_name)
        raise ConfigError(f'unknown key{_suggest(key, candidates)}', source, display)


def _default_registry() -> Mapping[str, type]:
    from crane_pyg.models import MODELS
    return MODELS


# ---------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    r"""Safe YAML loader that reads ``1e-3`` as a float (YAML 1.1 requires a
    dot) and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                   |[-+]?\.[0-9_]+[eE][-+]?[0-9]+)$''', re.X),
    list('-+0123456789.'))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f'duplicate key {key!r} (first on line {seen[key] + 1})', mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    r"""Reads a YAML mapping (an empty file is ``{}``); errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError('is a directory, not a YAML file', str(path))
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}', str(path))
    try:
        text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError as exc:
        raise ConfigError(f'not a YAML text file: byte {exc.object[exc.start]:#04x} at offset '
                          f'{exc.start} is not UTF-8', str(path)) from None
    except OSError as exc:
        raise ConfigError(f'cannot read the file: {exc.strerror}', str(path)) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f'line {mark.line + 1}: ' if mark is not None else ''
        raise ConfigError(f'{line}invalid YAML: {exc.problem or exc}', str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f'invalid YAML: {exc}', str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'expected a mapping of sections {list(_LAYER_KEYS)}, '
                          f'got {type(data).__name__}', str(path))
    return data


def parse_override(text: str, source: str | None = None) -> tuple[str, Any]:
    r"""``'train.lr=5e-4'`` -> ``('train.lr', 0.0005)``; the value is parsed as YAML."""
    source = source or f'{COMMAND_LINE} (--set {text})'
    key, sep, raw = text.partition('=')
    key = key.strip()
    if not sep or not key:
        raise ConfigError("expected KEY=VALUE with a dotted key, e.g. 'train.lr=5e-4'", source)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f'cannot parse value {raw!r}: {exc}', source, key) from None
    return key, value


# ---------------------------------------------------------------------------
# layering
# ---------------------------------------------------------------------------
@dataclass
class _Layer:
    source: str
    data: dict[str, Any]
    packaged: bool = False   # files of crane_pyg/configs: no names, no grid


def _flatten_layer(layer: _Layer, schema: _Schema, model_name: str) -> tuple[
        dict[str, Any], dict[str, list[Any]], dict[str, Any] | None]:
    r"""(values by dotted key, grid, this model's ``models:`` block) of one layer."""
    values: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    per_model = None
    for top, content in layer.data.items():
        if top not in _LAYER_KEYS:
            raise ConfigError(f'unknown section; expected one of {list(_LAYER_KEYS)}'
                              f'{_suggest(str(top), _LAYER_KEYS)}', layer.source, str(top))
        if top == 'models':
            if not isinstance(content, dict):
                raise ConfigError('expected a mapping model name -> overrides',
                                  layer.source, 'models')
            for name, block in content.items():
                schema.model_types(str(name), layer.source, f'models.{name}')
                if not isinstance(block, dict):
                    raise ConfigError('expected a mapping with sections model/train/dataset',
                                      layer.source, f'models.{name}')
                sub = _Layer(layer.source, block, packaged=True)
                for section in block:
                    if section not in SECTIONS:
                        raise ConfigError(
                            f'unknown section; expected one of {list(SECTIONS)}'
                            f'{_suggest(str(section), SECTIONS)}', layer.source,
                            f'models.{name}.{section}')
                # validate every block (typos in other models' blocks are errors too)
                for key, value in _section_items(sub, prefix=f'models.{name}.'):
                    if key in ('model.name', 'dataset.name'):
                        raise ConfigError('cannot be set in a per-model block',
                                          layer.source, f'models.{name}.{key}')
                    checked = schema.check(key, value, layer.source, model_name=str(name),
                                           display=f'models.{name}.{key}')
                    if str(name) == model_name:
                        per_model = per_model or {}
                        per_model[key] = checked
            continue
        if top == 'search':
            if not layer.packaged:
                raise ConfigError('a search space is declared in the packaged model file '
                                  '(crane_pyg/configs/model/<model>.yaml); use grid: here',
                                  layer.source, 'search')
            continue  # read by search_space(), not a training value
        if top == 'grid':
            if layer.packaged:
                raise ConfigError('a packaged config may not define a grid', layer.source, 'grid')
            if not isinstance(content, dict):
                raise ConfigError('expected a mapping dotted key -> list of values',
                                  layer.source, 'grid')
            for key, options in content.items():
                key = str(key)
                if key in ('model.name', 'dataset.name', 'dataset.root'):
                    raise ConfigError('cannot vary in a grid (compare models with '
                                      'benchmarks/compare_models.py)', layer.source,
                                      f'grid.{key}')
                if not isinstance(options, list) or not options:
                    raise ConfigError('expected a non-empty list of values',
                                      layer.source, f'grid.{key}')
                grid[key] = [schema.check(key, v, layer.source, model_name,
                                          display=f'grid.{key}') for v in options]
            continue
    for key, value in _section_items(layer):
        if key in ('model.name', 'dataset.name'):
            if layer.packaged:
                raise ConfigError('the packaged configs may not set the model or dataset name',
                                  layer.source, key)
            values[key] = schema.check(key, value, layer.source, model_name)
            continue
        values[key] = schema.check(key, value, layer.source, model_name)
    return values, grid, per_model


def _section_items(layer: _Layer, prefix: str = '') -> list[tuple[str, Any]]:
    out = []
    for section in SECTIONS:
        if section not in layer.data:
            continue
        content = layer.data[section]
        if content is None:
            continue
        if not isinstance(content, dict):
            raise ConfigError(f'expected a mapping, got {type(content).__name__}',
                              layer.source, prefix + section)
        for key, value in content.items():
            out.append((f'{section}.{key}', value))
    return out


def _build(flat: dict[str, Any], grid: dict[str, list[Any]], sources: dict[str, str],
           schema: _Schema) -> ExperimentConfig:
    section_values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in flat.items():
        section, _, name = key.partition('.')
        section_values[section][name] = value
    model_name = section_values['model'].pop('name', schema.model_name)
    train_values = section_values['train']
    # cross-field check (stop_metric's cut-off must be in ks)
    merged = {**dataclasses.asdict(TrainConfig()), **train_values}
    problem = _check_train_values(merged)
    if problem is not None:
        key = f'train.{problem[0]}'
        raise ConfigError(problem[1], sources.get(key, sources.get('train.ks', 'defaults')), key)
    types_ = schema.model_types(model_name, 'defaults')
    defaults = {k: d for k, (_, d) in types_.items()}
    # a model's own `seed` option (per-epoch randomness, e.g. edge dropout)
    # follows train.seed unless a layer sets it
    if 'seed' in types_ and sources.get('model.seed', _FOLLOWS_TRAIN_SEED) == _FOLLOWS_TRAIN_SEED:
        section_values['model']['seed'] = train_values.get('seed', TrainConfig.seed)
        sources = {**sources, 'model.seed': _FOLLOWS_TRAIN_SEED}
    return ExperimentConfig(
        dataset=DataConfig(**section_values['dataset']),
        model_name=model_name,
        model_options=section_values['model'],
        model_defaults=defaults,
        train=TrainConfig(**train_values),
        grid=grid,
        sources=sources,
        registry=schema.registry,
    )


def load_config(
    model: str | None = None,
    dataset: str | None = None,
    config_file: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    *,
    config_dir: str | os.PathLike | None = None,
    registry: Mapping[str, type] | None = None,
    config_source: str = 'configuration mapping',
) -> ExperimentConfig:
    r"""Resolves an experiment configuration from the layered YAML files.

    Args:
        model (str, optional): model name (the ``--model`` flag); highest priority.
        dataset (str, optional): dataset name (the ``--dataset`` flag).
        config_file (path or mapping, optional): the user's YAML file, or its
            content as a mapping (e.g. the ``config`` of a checkpoint;
            errors then name ``config_source``).
        overrides (sequence of str): ``KEY=VALUE`` strings (``--set``).
        flags (mapping, optional): dotted key -> value set by dedicated
            command-line flags (``{'train.epochs': 5}``), applied last.
        config_dir (path, optional): folder with ``overall.yaml``,
            ``model/*.yaml`` and ``dataset/*.yaml`` (default :data:`CONFIG_DIR`).
        registry (mapping, optional): model name -> class (default
            :data:`crane_pyg.models.MODELS`).

    Raises:
        ConfigError: unknown key, wrong type or value, unreadable file; the
            message names the file (or flag) and the key.
    """
    config_dir = Path(config_dir) if config_dir is not None else CONFIG_DIR
    user = None
    if isinstance(config_file, Mapping):
        user = _Layer(config_source, copy.deepcopy(dict(config_file)))
    elif config_file is not None:
        user = _Layer(str(config_file), load_yaml(config_file))
    parsed = [(parse_override(text), f'{COMMAND_LINE} (--set {text})') for text in overrides]
    flag_items = [((key, value), f'{COMMAND_LINE} ({key})') for key, value in (flags or {}).items()]

    # 1. the names select the layered files
    def pick(key: str, explicit: str | None, default: str) -> tuple[str, str]:
        if explicit is not None:
            return explicit, COMMAND_LINE
        for (k, v), source in reversed(parsed + flag_items):
            if k == key:
                return _check_value(v, str, source, key), source
        if user is not None:
            section = user.data.get(key.split('.')[0])
            if isinstance(section, dict) and 'name' in section:
                return _check_value(section['name'], str, user.source, key), user.source
        return default, 'defaults'

    model_name, model_source = pick('model.name', model, 'crane')
    dataset_name, dataset_source = pick('dataset.name', dataset, 'synthetic')
    schema = _Schema(model_name, registry)
    schema.model_types(model_name, model_source)

    layers: list[_Layer] = []
    overall = config_dir / 'overall.yaml'
    if overall.is_file():
        layers.append(_Layer(str(overall), load_yaml(overall), packaged=True))
    model_file = config_dir / 'model' / f'{model_name}.yaml'
    if model_file.is_file():
        layers.append(_Layer(str(model_file), load_yaml(model_file), packaged=True))
    dataset_file = config_dir / 'dataset' / f'{dataset_name}.yaml'
    if dataset_file.is_file():
        layers.append(_Layer(str(dataset_file), load_yaml(dataset_file), packaged=True))
    if user is not None:
        layers.append(user)

    flat: dict[str, Any] = {'model.name': model_name, 'dataset.name': dataset_name}
    sources: dict[str, str] = {'model.name': model_source, 'dataset.name': dataset_source}
    grid: dict[str, list[Any]] = {}

    def apply(values: Mapping[str, Any], source: str) -> None:
        for key, value in values.items():
            if key in ('model.name', 'dataset.name'):
                continue  # resolved above
            flat[key] = value
            sources[key] = source

    for layer in layers:
        values, layer_grid, per_model = _flatten_layer(layer, schema, model_name)
        apply(values, layer.source)
        if per_model:
            apply(per_model, f'{layer.source} (models.{model_name})')
        for key, options in layer_grid.items():
            grid[key] = options
            sources[f'grid.{key}'] = layer.source
    for (key, value), source in parsed + flag_items:
        if key.startswith('grid.'):
            axis = key[len('grid.'):]
            if axis in ('model.name', 'dataset.name', 'dataset.root'):
                raise ConfigError('cannot vary in a grid', source, key)
            if not isinstance(value, list) or not value:
                raise ConfigError('expected a non-empty list of values, e.g. [0.1, 0.2]',
                                  source, key)
            grid[axis] = [schema.check(axis, v, source, display=key) for v in value]
            sources[key] = source
            continue
        checked = schema.check(key, value, source)
        if key not in ('model.name', 'dataset.name'):
            flat[key] = checked
            sources[key] = source
    return _build(flat, grid, sources, schema)


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    r"""The cartesian product of a grid, in the order of its keys (the last key
    varies fastest): ``{'a': [1, 2], 'b': [3]}`` -> ``[{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]``.
    An empty grid gives one empty point."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def search_space(model: str, *, config_dir: str | os.PathLike | None = None,
                 registry: Mapping[str, type] | None = None) -> dict[str, list[Any]]:
    r"""The hyper-parameter search space declared in ``search:`` of the
    packaged ``model/<model>.yaml`` (dotted key -> list of values, checked like
    a grid; empty when the file declares none), for tuning with the same
    budget for every model (``benchmarks/compare_models.py --tune``).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, an empty list,
            or a key that cannot vary (``model.name``, ``dataset.*``).
    """
    config_dir = Path(config_dir) if config_dir is not None else CONFIG_DIR
    schema = _Schema(model, registry)
    path = config_dir / 'model' / f'{model}.yaml'
    schema.model_types(model, str(path))
    if not path.is_file():
        return {}
    content = load_yaml(path).get('search') or {}
    if not isinstance(content, dict):
        raise ConfigError('expected a mapping dotted key -> list of values', str(path),
                          'search')
    space: dict[str, list[Any]] = {}
    for key, options in content.items():
        key = str(key)
        if key == 'model.name' or key.startswith('dataset.'):
            raise ConfigError('cannot vary in a search', str(path), f'search.{key}')
        if not isinstance(options, list) or not options:
            raise ConfigError('expected a non-empty list of values', str(path),
                              f'search.{key}')
        space[key] = [schema.check(key, v, str(path), model, display=f'search.{key}')
                      for v in options]
    return space
