r"""A deterministic synthetic multimodal recommendation dataset with planted
structure, written in the MMRec format (so :func:`~crane_pyg.data.load_mmrec`
reads it like any published dataset)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
from torch_geometric.data import HeteroData

from .mmrec import FEATURE_SUFFIX, INTER_COLUMNS, load_mmrec

__all__ = ['make_synthetic', 'load_synthetic', 'DEFAULT_MODALITIES']

#: modalities (name -> feature dimension) written when ``modalities=None``
DEFAULT_MODALITIES: Dict[str, int] = {'image': 256, 'text': 384}
#: file holding the generator parameters (marks a complete dataset folder)
PARAMS_FILE = 'synthetic.json'
#: file holding the planted latent structure (ignored by the MMRec loader)
LATENT_FILE = 'latent.npz'
_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def make_synthetic(
    folder: PathLike,
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    num_interactions: int = 30000,
    modalities: Optional[Mapping[str, int]] = None,
    latent_dim: int = 16,
    popularity_exponent: float = 0.8,
    noise: float = 1.0,
    temperature: float = 0.5,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    r"""Writes a synthetic MMRec-format dataset into :obj:`folder` and returns
    the folder.

    The folder receives ``<basename>.inter``, one ``<m>_feat.npy`` per modality,
    ``latent.npz`` (the planted ground truth: ``user_factors``,
    ``item_factors``, ``item_popularity``; the loader ignores it) and
    ``synthetic.json`` (the parameters, written last).  Every file is written
    atomically (temporary file + :func:`os.replace`).  Generation is a pure
    function of the parameters (NumPy :class:`~numpy.random.Generator` streams
    derived from :obj:`seed`), so equal parameters give byte-identical files.

    **Generative model.**  With :math:`d` = :obj:`latent_dim`:

    * latent factors :math:`\mathbf{p}_u, \mathbf{q}_i \sim \mathcal{N}(0, \mathbf{I}_d)`;
    * item popularity: a random rank :math:`\pi(i) \in \{0, \ldots, I-1\}` and
      :math:`w_i = (1 + \pi(i))^{-\alpha}` with :math:`\alpha` =
      :obj:`popularity_exponent` (a power law);
    * user activity: :math:`n_u = 3 + m_u` with
      :math:`\mathbf{m} \sim \mathrm{Multinomial}(N - 3U, \boldsymbol\rho)`,
      :math:`\rho_u \propto \mathrm{LogNormal}(0, 1)`, capped at
      :math:`\lfloor I/2 \rfloor` (:math:`N` = :obj:`num_interactions`);
    * user :math:`u` picks :math:`n_u` distinct items without replacement
      (Plackett-Luce, drawn exactly by the Gumbel-top-:math:`k` trick) from

      .. math::
          P(i \mid u) \propto w_i \exp\left(\frac{\mathbf{p}_u^{\top}
          \mathbf{q}_i}{\sqrt{d}\,\tau}\right),

      :math:`\tau` = :obj:`temperature`; items nobody picked then replace
      randomly chosen surplus interactions of items picked several times, so
      every item id occurs (contiguous ids);
    * each modality :math:`m` of size :math:`d_m` is a noisy random linear view
      of the item factors,
      :math:`\mathbf{x}_m(i) = \mathbf{W}_m^{\top} \mathbf{q}_i + \sigma
      \boldsymbol\epsilon`, :math:`(\mathbf{W}_m)_{kl} \sim \mathcal{N}(0, 1/d)`,
      :math:`\boldsymbol\epsilon \sim \mathcal{N}(0, \mathbf{I}_{d_m})`,
      :math:`\sigma` = :obj:`noise` (per-coordinate noise-to-signal ratio);
    * per user, a random 80/10/10 split: :math:`\max(1, \mathrm{round}(n_u/10))`
      valid and as many test interactions, the rest (at least one) train.

    Because the interactions depend on :math:`\mathbf{q}_i` and the features
    are a linear function of :math:`\mathbf{q}_i` plus independent noise, the
    features carry signal: items close in feature space (cosine) are close in
    latent space, so a model that uses them can beat an ID-only model,
    especially on items with few training interactions.  The popularity term
    gives the long-tailed item distribution of real data.

    Args:
        folder (str or os.PathLike): the dataset folder (created if needed);
            its basename is the dataset name.
        num_users (int, optional): :math:`U`. (default: :obj:`2000`)
        num_items (int, optional): :math:`I`, at least 10. (default: :obj:`1000`)
        num_interactions (int, optional): :math:`N`, between :math:`\max(3U, I)`
            and :math:`U \lfloor I/2 \rfloor`. (default: :obj:`30000`)
        modalities (dict, optional): modality name -> feature dimension; an
            empty dict gives an interaction-only dataset.
            (default: :obj:`{'image': 256, 'text': 384}`)
        latent_dim (int, optional): :math:`d`. (default: :obj:`16`)
        popularity_exponent (float, optional): :math:`\alpha \ge 0`.
            (default: :obj:`0.8`)
        noise (float, optional): :math:`\sigma \ge 0`. (default: :obj:`1.0`)
        temperature (float, optional): :math:`\tau > 0`; smaller means
            sharper personal preferences. (default: :obj:`0.5`)
        seed (int, optional): the random seed. (default: :obj:`0`)
        overwrite (bool, optional): replace a dataset that :obj:`folder` holds
            with other parameters. Without it, such a folder raises
            :class:`FileExistsError`; a folder holding this very dataset is
            reused without rewriting. (default: :obj:`False`)
    """
    params = _normalise_params(
        num_users=num_users, num_items=num_items, num_interactions=num_interactions,
        modalities=modalities, latent_dim=latent_dim,
        popularity_exponent=popularity_exponent, noise=noise, temperature=temperature,
        seed=seed)
    folder = Path(folder)
    name = Path(os.path.abspath(folder)).name
    inter_path = folder / f'{name}.inter'
    params_path = folder / PARAMS_FILE
    expected = [inter_path, folder / LATENT_FILE]
    expected += [folder / f'{m}{FEATURE_SUFFIX}' for m in params['modalities']]

    if params_path.is_file():
        try:
            stored = json.loads(params_path.read_text())
        except (OSError, ValueError):
            stored = None
        if stored == params and all(p.is_file() for p in expected):
            return folder
        if stored != params and not overwrite:
            raise FileExistsError(
                f'{folder} holds a synthetic dataset with other parameters '
                f'({_describe_difference(stored, params)}); pass overwrite=True to '
                f'replace it or choose another folder')
    elif not overwrite and (inter_path.exists() or any(folder.glob('*' + FEATURE_SUFFIX))):
        raise FileExistsError(f'{folder} holds dataset files not written by make_synthetic; '
                              f'pass overwrite=True to replace them or choose another folder')

    folder.mkdir(parents=True, exist_ok=True)
    params_path.unlink(missing_ok=True)  # the folder is incomplete until it is rewritten
    for stale in folder.glob('*' + FEATURE_SUFFIX):
        if stale not in expected:
            stale.unlink()

    users, items, labels, latent, features = _generate(params)

    order = np.lexsort((items, labels, users))
    table = np.stack([users[order], items[order], np.ones_like(users), np.zeros_like(users),
                      labels[order]], axis=1)
    _atomic_write(inter_path, lambda fh: np.savetxt(
        fh, table, fmt='%d', delimiter='\t', header='\t'.join(INTER_COLUMNS), comments=''))
    for modality, array in features.items():
        _atomic_write(folder / f'{modality}{FEATURE_SUFFIX}',
                      lambda fh, a=array: np.save(fh, a, allow_pickle=False))
    _atomic_write(folder / LATENT_FILE, lambda fh: np.savez(fh, **latent))
    _atomic_write(params_path, lambda fh: fh.write(
        (json.dumps(params, indent=2, sort_keys=True) + '\n').encode()))
    return folder


def load_synthetic(root: Optional[PathLike] = None, *, name: Optional[str] = None,
                   **kwargs: Any) -> HeteroData:
    r"""Makes (or reuses) a synthetic dataset with :func:`make_synthetic` and
    loads it with :func:`~crane_pyg.data.load_mmrec`.

    Args:
        root (str or os.PathLike, optional): the cache folder; defaults to
            ``$CRANE_CACHE`` or ``~/.cache/crane_pyg``.
        name (str, optional): the dataset folder under :obj:`root`; defaults
            to ``synthetic`` for the default parameters and to
            ``synthetic-<8 hex digits of the parameters>`` otherwise, so that
            datasets with different parameters never collide.
        **kwargs: the keyword arguments of :func:`make_synthetic`.
    """
    if root is None:
        root = os.environ.get('CRANE_CACHE') or Path.home() / '.cache' / 'crane_pyg'
    if name is None:
        generator_kwargs = {k: v for k, v in kwargs.items() if k != 'overwrite'}
        params = _normalise_params(**generator_kwargs)
        if params == _normalise_params():
            name = 'synthetic'
        else:
            import hashlib
            digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
            name = f'synthetic-{digest[:8]}'
    folder = make_synthetic(Path(root) / name, **kwargs)
    return load_mmrec(folder)


# generation ##################################################################

def _normalise_params(
    *,
    num_users: int = 2000,
    num_items: int = 1000,
    num_interactions: int = 30000,
    modalities: Optional[Mapping[str, int]] = None,
    latent_dim: int = 16,
    popularity_exponent: float = 0.8,
    noise: float = 1.0,
    temperature: float = 0.5,
    seed: int = 0,
) -> Dict[str, Any]:
    r"""Validates the generator parameters; returns them as a JSON-ready dict."""
    if modalities is None:
        modalities = DEFAULT_MODALITIES
    ints = dict(num_users=num_users, num_items=num_items, num_interactions=num_interactions,
                latent_dim=latent_dim, seed=seed)
    for key, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"'{key}' must be an integer (got {value!r})")
    if num_users < 1 or latent_dim < 1 or seed < 0:
        raise ValueError(f"'num_users' and 'latent_dim' must be positive and 'seed' "
                         f"non-negative (got {num_users}, {latent_dim}, {seed})")
    if num_items < 10:
        raise ValueError(f"'num_items' must be at least 10 (got {num_items})")
    cap = num_items // 2
    low, high = max(3 * num_users, num_items), num_users * cap
    if not low <= num_interactions <= high:
        raise ValueError(
            f"'num_interactions' must lie in [{low}, {high}] for {num_users} users and "
            f"{num_items} items: every user needs >= 3 interactions (train, valid, test), "
            f"every item >= 1, and no user more than num_items // 2 (got {num_interactions})")
    for key, value in (('popularity_exponent', popularity_exponent), ('noise', noise)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"'{key}' must be a finite number >= 0 (got {value!r})")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"'temperature' must be a finite number > 0 (got {temperature!r})")
    mods: Dict[str, int] = {}
    for key, dim in dict(modalities).items():
        if not isinstance(key, str) or not key.isidentifier() or key == 'num_nodes':
            raise ValueError(f'modality names must be Python identifiers (got {key!r})')
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f'modality {key!r} needs a positive integer dimension '
                             f'(got {dim!r})')
        mods[key] = int(dim)
    return dict(format=_FORMAT_VERSION, num_users=int(num_users), num_items=int(num_items),
                num_interactions=int(num_interactions), modalities=dict(sorted(mods.items())),
                latent_dim=int(latent_dim), popularity_exponent=float(popularity_exponent),
                noise=float(noise), temperature=float(temperature), seed=int(seed))


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _generate(params: Dict[str, Any]):
    r"""The generative model of :func:`make_synthetic`; returns ``(users, items,
    x_labels, latent, features)``.  Separate random streams per stage, so that
    e.g. changing the modalities leaves the interactions unchanged."""
    U, I, N = params['num_users'], params['num_items'], params['num_interactions']
    d, seed = params['latent_dim'], params['seed']

    rng = _rng(seed, 0)
    user_factors = rng.standard_normal((U, d))
    item_factors = rng.standard_normal((I, d))
    popularity = (1.0 + rng.permutation(I)) ** -params['popularity_exponent']
    popularity /= popularity.sum()

    # Interactions per user: 3 + a heavy-tailed share of the rest, capped.
    rng = _rng(seed, 1)
    counts = np.full(U, 3, dtype=np.int64)
    activity = rng.lognormal(0.0, 1.0, U)
    cap, extra = I // 2, N - 3 * U
    while extra > 0:  # a few rounds: redistributes what the cap cut off
        room = cap - counts
        weights = np.where(room > 0, activity, 0.0)
        added = np.minimum(rng.multinomial(extra, weights / weights.sum()), room)
        counts += added
        extra -= int(added.sum())

    # Items per user, without replacement, by Gumbel-top-k on the logits.
    log_pop = np.log(popularity)
    scale = 1.0 / (math.sqrt(d) * params['temperature'])
    chunk = max(1, (1 << 22) // I)
    users, items = [], []
    for start in range(0, U, chunk):  # bounded memory: chunk x I logits
        stop = min(start + chunk, U)
        logits = scale * (user_factors[start:stop] @ item_factors.T) + log_pop
        keys = logits + rng.gumbel(size=logits.shape)
        top = int(counts[start:stop].max())  # the top-n_u keys of every row, in order:
        if top < I:
            candidates = np.argpartition(-keys, top - 1, axis=1)[:, :top]
        else:
            candidates = np.broadcast_to(np.arange(I), keys.shape)
        order = np.argsort(-np.take_along_axis(keys, candidates, axis=1), axis=1)
        ranking = np.take_along_axis(candidates, order, axis=1)
        taken = np.arange(ranking.shape[1]) < counts[start:stop, None]
        items.append(ranking[taken])
        users.append(np.repeat(np.arange(start, stop), counts[start:stop]))
    users, items = np.concatenate(users), np.concatenate(items)

    # Every item must occur: give each unpicked item one surplus interaction of
    # an item picked several times (never a first occurrence, so no item is
    # emptied; the unpicked item is new to that user, so no duplicate arises).
    picked = np.bincount(items, minlength=I)
    missing = np.flatnonzero(picked == 0)
    if missing.size:
        by_item = np.argsort(items, kind='stable')
        first = np.zeros(N, dtype=bool)
        first[by_item[np.r_[0, np.flatnonzero(np.diff(items[by_item])) + 1]]] = True
        surplus = np.flatnonzero(~first)
        items[rng.choice(surplus, missing.size, replace=False)] = rng.permutation(missing)

    # Per-user random 80/10/10 split.
    rng = _rng(seed, 2)
    order = np.lexsort((rng.random(N), users))
    users, items = users[order], items[order]
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(N) - start[users]
    held_out = np.maximum(1, np.floor(counts / 10 + 0.5).astype(np.int64))[users]
    num_train = counts[users] - 2 * held_out
    labels = np.where(rank < num_train, 0, np.where(rank < num_train + held_out, 1, 2))

    features = {}
    for modality, dim in params['modalities'].items():
        rng = _rng(seed, 3, *modality.encode())
        weight = rng.standard_normal((d, dim)) / math.sqrt(d)
        feats = item_factors @ weight + params['noise'] * rng.standard_normal((I, dim))
        features[modality] = feats.astype(np.float32)

    latent = dict(user_factors=user_factors.astype(np.float32),
                  item_factors=item_factors.astype(np.float32),
                  item_popularity=popularity)
    return users, items, labels.astype(np.int64), latent, features


# files #######################################################################

def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    r"""Writes :obj:`path` through a temporary file in the same folder and
    :func:`os.replace`, so readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _describe_difference(stored: Any, params: Dict[str, Any]) -> str:
    if not isinstance(stored, dict):
        return f'{PARAMS_FILE} is unreadable'
    diffs = [f'{k}: stored {stored.get(k)!r}, requested {v!r}'
             for k, v in params.items() if stored.get(k) != v]
    return '; '.join(diffs) or 'unknown keys differ'
