r"""Shared helpers of the crane_pyg benchmarks: timing (median of repeats and
spread), peak memory (a fresh subprocess per point on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), atomic JSON output, log-log
slope fits and a fast synthetic interaction graph for large sizes.

The synthetic graph here is *not* :func:`crane_pyg.data.make_synthetic`
(which is :math:`O(UI)`): users draw their degree from a Zipf-like law and
their items from a power-law item popularity with :mod:`numpy`, in
:math:`O(E \log E)`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / 'results'
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

__all__ = [
    'resolve_device', 'synchronize', 'time_fn', 'summarize', 'peak_rss_mb',
    'reset_peak', 'peak_memory_mb', 'run_subprocess_point', 'measure_point',
    'baseline_rss_mb', 'current_rss_mb', 'reset_peak_rss', 'write_json',
    'loglog_slope', 'power_law_graph', 'random_item_graph', 'make_heterodata',
    'environment', 'add_common_args', 'make_parser', 'train_epoch', 'run_child_point',
    'evaluate', 'child_env', 'save_figure',
]


# ---------------------------------------------------------------------------
# devices, timing
# ---------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    r""":func:`crane_pyg.train.utils.resolve_device` (``'auto'`` -> CUDA when
    available, else CPU), with a missing GPU ending the script
    (:class:`SystemExit`) instead of raising."""
    from crane_pyg.train.utils import resolve_device as resolve
    try:
        return resolve(name)
    except RuntimeError as exc:
        raise SystemExit(f'--device {name}: {exc}') from None


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def train_epoch(model: Any, optimizer: torch.optim.Optimizer, sampler: Any, epoch: int,
                batch_size: int, device: torch.device,
                max_batches: Optional[int] = None, precision: str = 'fp32',
                loss_module: Any = None) -> Dict[str, Any]:
    r"""One training epoch as :class:`~crane_pyg.train.Trainer` runs it:
    ``on_epoch_start``, then for every batch of the BPR sampler (sampling
    included) ``zero_grad``, ``loss`` (under :obj:`precision`'s autocast,
    :mod:`crane_pyg.train.precision`, as the Trainer does), ``backward`` and an
    optimizer step; only the first :obj:`max_batches` batches when given.
    Returns the wall time (``'seconds'``, device synchronised) and
    ``'batches'`` run. :obj:`loss_module` (e.g.
    :class:`~crane_pyg.train.CachedSemanticCRANE`) replaces ``model.loss``
    and has its ``on_epoch_start`` called after the model's."""
    from crane_pyg.train.precision import autocast
    loss_fn = model.loss if loss_module is None else loss_module
    model.train()
    synchronize(device)
    start = time.perf_counter()
    model.on_epoch_start(epoch)
    if loss_module is not None and hasattr(loss_module, 'on_epoch_start'):
        loss_module.on_epoch_start(epoch)
    done = 0
    for users, pos, neg in sampler.batches(epoch, batch_size):
        if done == max_batches:
            break
        users, pos, neg = users.to(device), pos.to(device), neg.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss, _ = loss_fn(users, pos, neg)
        loss.backward()
        optimizer.step()
        done += 1
    synchronize(device)
    return {'seconds': time.perf_counter() - start, 'batches': done}


@torch.no_grad()
def evaluate(model: Any, evaluator: Any,
             after_embeddings: Optional[Callable[[], None]] = None,
             precision: str = 'fp32') -> Dict[str, float]:
    r"""One full-ranking evaluation without gradients: ``model.eval()``,
    ``model.embeddings()`` once (under :obj:`precision`'s autocast, then
    float32, as :meth:`~crane_pyg.train.Trainer.evaluate` does), then
    :obj:`evaluator` ranks every item for its users
    (``model.score_all_items``); returns the metrics dict.
    :obj:`after_embeddings` (optional) is called between the two, e.g. to
    time the embeddings apart. Timing is the caller's."""
    from crane_pyg.train.precision import autocast
    model.eval()
    with autocast(precision, next(model.parameters()).device):
        emb = tuple(e.float() for e in model.embeddings())
    if after_embeddings is not None:
        after_embeddings()
    return evaluator.evaluate(lambda users: model.score_all_items(users, emb))


def summarize(samples: Sequence[float]) -> Dict[str, Any]:
    r"""Median, min, max and relative spread ``(max - min) / median`` of
    repeated measurements (seconds)."""
    samples = [float(s) for s in samples]
    med = statistics.median(samples)
    return {'median': med, 'min': min(samples), 'max': max(samples),
            'spread': (max(samples) - min(samples)) / med if med > 0 else 0.0,
            'repeats': len(samples), 'samples': samples}


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int = 3,
            warmup: int = 1) -> Dict[str, Any]:
    r"""Wall-clock time of :obj:`fn` (synchronising CUDA): ``warmup`` untimed
    calls, then :func:`summarize` of ``repeats`` (>= 3) timed calls."""
    if repeats < 3:
        raise ValueError(f'repeats must be >= 3 (got {repeats})')
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return summarize(out)


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------

def _proc_status_mb(key: str) -> Optional[float]:
    r"""The ``key`` line (kB) of ``/proc/self/status`` in MiB; :obj:`None`
    where that file does not exist."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    r"""Peak resident set of *this* process in MiB.

    On Linux ``VmHWM`` of ``/proc/self/status``: the high-water mark of the
    process's own address space, which starts afresh at ``exec`` and which
    :func:`reset_peak_rss` resets. Not ``ru_maxrss``: on Linux a child's
    ``ru_maxrss`` starts from the resident set of the parent it was forked
    from (a point run by a 360 MiB driver reported at least 360 MiB).
    Elsewhere ``ru_maxrss`` (bytes on macOS)."""
    hwm = _proc_status_mb('VmHWM')
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if platform.system() == 'Darwin' else rss / 1024


def current_rss_mb() -> Optional[float]:
    r"""Current resident set of *this* process in MiB (``VmRSS`` of
    ``/proc/self/status``); :obj:`None` where that file does not exist."""
    return _proc_status_mb('VmRSS')


def reset_peak_rss() -> bool:
    r"""Resets this process's peak resident set to its current one (Linux
    >= 4.0: ``5`` written to ``/proc/self/clear_refs``), so that
    :func:`peak_rss_mb` afterwards reports the peak of what ran since.
    Returns whether it worked (:obj:`False`: the peak keeps counting from
    the process start). :func:`reset_peak` does not call it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> Dict[str, float]:
    r"""``{'peak_rss_mb': ...}`` plus ``'cuda_max_allocated_mb'`` on CUDA."""
    out = {'peak_rss_mb': peak_rss_mb()}
    if device.type == 'cuda':
        out['cuda_max_allocated_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def run_subprocess_point(script: Path, point: Dict[str, Any],
                         timeout: Optional[float] = None,
                         memory_cap_mb: Optional[float] = None) -> Dict[str, Any]:
    r"""Runs ``python script --_point JSON`` in a fresh interpreter and returns
    the JSON object the child prints on its last stdout line.

    A fresh process per point makes ``ru_maxrss`` the peak of that point
    alone. With :obj:`memory_cap_mb` the child gets an address-space limit
    (``RLIMIT_AS``); a point that exceeds it (or the timeout) comes back as
    ``{'status': 'failed', 'error': ...}`` instead of raising.
    """
    def limit() -> None:  # runs in the child
        if memory_cap_mb is not None:
            cap = int(memory_cap_mb * 2 ** 20)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, str(script), '--_point', json.dumps(point)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=limit if memory_cap_mb else None, env=child_env())
    except subprocess.TimeoutExpired:
        return {'status': 'failed', 'error': f'timeout after {timeout} s'}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith('{')]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        return {'status': 'failed', 'returncode': proc.returncode,
                'error': err[-1] if err else 'no output'}
    out = json.loads(lines[-1])
    out.setdefault('status', 'ok')
    return out


def measure_point(script: Path, run_point: Callable[[Dict[str, Any]], Dict[str, Any]],
                  point: Dict[str, Any], in_process: bool = False,
                  timeout: Optional[float] = None,
                  memory_cap_mb: Optional[float] = None) -> Dict[str, Any]:
    r""":func:`run_subprocess_point`, or :obj:`run_point` called directly
    when :obj:`in_process` (then ``memory`` is this process's cumulative peak
    and the point is flagged ``'in_process': True``)."""
    if not in_process:
        out = run_subprocess_point(script, point, timeout, memory_cap_mb)
        out['in_process'] = False
        return out
    try:
        out = run_point(point)
        out['status'] = 'ok'
    except (RuntimeError, MemoryError) as exc:
        out = {'status': 'failed', 'error': f'{type(exc).__name__}: {exc}'}
    out['in_process'] = True
    return out


def child_env() -> Dict[str, str]:
    r"""This process's environment for a child interpreter, with the
    repository root prepended to any existing ``PYTHONPATH`` (so that the
    child imports this checkout's ``crane_pyg`` and ``benchmarks``)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get('PYTHONPATH')]))
    return env


def baseline_rss_mb() -> float:
    r"""Peak RSS of a fresh interpreter that only imported torch and
    crane_pyg (subtract it to get what a point itself used)."""
    code = ('import torch, crane_pyg; from benchmarks.common import peak_rss_mb; '
            'print(peak_rss_mb())')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env=child_env(), check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

def environment(device: torch.device) -> Dict[str, Any]:
    r"""Machine description stored in every JSON file. ``loadavg`` matters:
    the machine these numbers come from may be shared."""
    env = {
        'python': platform.python_version(), 'torch': torch.__version__,
        'platform': platform.platform(), 'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(), 'device': str(device),
        'loadavg': list(os.getloadavg()),
        'time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    }
    try:
        import torch_geometric
        env['torch_geometric'] = torch_geometric.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == 'cuda':
        env['cuda_device'] = torch.cuda.get_device_name(device)
    return env


def write_json(obj: Any, path: Path) -> None:
    r"""Writes :obj:`obj` as JSON atomically (temp file beside :obj:`path` +
    rename, parent folders created):
    :func:`crane_pyg.train.utils.atomic_write_json`."""
    from crane_pyg.train.utils import atomic_write_json
    atomic_write_json(path, obj)


def loglog_slope(x: Sequence[float], y: Sequence[float],
                 last: Optional[int] = 3) -> Optional[float]:
    r"""Least-squares slope of :math:`\log y` against :math:`\log x`
    (:func:`numpy.polyfit`, degree 1) over the :obj:`last` largest points
    (all when :obj:`None`); :obj:`None` with fewer than 2 usable points."""
    pts = [(float(a), float(b)) for a, b in zip(x, y)
           if a is not None and b is not None and a > 0 and b > 0]
    pts.sort()
    if last is not None:
        pts = pts[-last:]
    if len(pts) < 2:
        return None
    lx, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(lx, ly, 1)[0])


def save_figure(fig, path, dpi: int = 110) -> None:
    """Lays out, writes (PNG, :obj:`dpi`; parent folders created) and closes
    a matplotlib figure."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def run_child_point(args: Any, run_point: Callable[[Dict[str, Any]], Dict[str, Any]]) -> bool:
    r"""The child side of :func:`run_subprocess_point`: when this process was
    started for one point (``--_point JSON``), runs it, prints its result as
    JSON and returns :obj:`True` (the caller then returns); else
    :obj:`False`."""
    if args._point is None:
        return False
    print(json.dumps(run_point(json.loads(args._point))))
    return True


def make_parser(doc: str, default_output: str, quick_help: str = 'tiny sizes (smoke test)',
                timeout: float = 600.0):
    """An argument parser described by the first paragraph of :obj:`doc`,
    with the options every benchmark shares (:func:`add_common_args`)."""
    import argparse
    parser = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_output, quick_help, timeout)
    return parser


def add_common_args(parser, default_output: str, quick_help: str = 'tiny sizes (smoke test)',
                    timeout: float = 600.0) -> None:
    parser.add_argument('--device', choices=('cpu', 'cuda', 'auto'), default='auto')
    parser.add_argument('--output', default=str(RESULTS_DIR / default_output),
                        help='JSON path (the PNG goes beside it, same stem)')
    parser.add_argument('--repeats', type=at_least_three, default=3,
                        help='timed repeats (>= 3)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--in-process', action='store_true',
                        help='run every point in this process (fast; peak memory is '
                             'then cumulative, not per point)')
    parser.add_argument('--quick', action='store_true', help=quick_help)
    parser.add_argument('--timeout', type=float, default=timeout,
                        help='seconds per point (default: %(default)s)')
    parser.add_argument('--_point', default=None, help=argparse.SUPPRESS)


def at_least_three(text: str) -> int:
    r"""``argparse`` type of a repeat count: an int >= 3 (a median of fewer
    is not a measurement)."""
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f'must be >= 3, got {value}')
    return value


# ---------------------------------------------------------------------------
# synthetic graphs
# ---------------------------------------------------------------------------

def power_law_graph(num_users: int, num_items: int, num_edges: int, seed: int = 0,
                    alpha: float = 0.8) -> np.ndarray:
    r"""``[2, E]`` unique (user, item) pairs, sorted by (user, item):
    duplicates drawn are replaced by further draws, so :math:`E` equals
    :obj:`num_edges` unless the graph is nearly complete (then fewer).

    Item popularity :math:`\propto r^{-\alpha}` over a random ranking of the
    items; user activity likewise; every user gets at least one interaction
    when :obj:`num_edges` >= :obj:`num_users`. :math:`O(E \log E)` time and
    :math:`O(E)` memory.
    """
    if num_users < 1 or num_items < 2 or num_edges < 1:
        raise ValueError('need num_users >= 1, num_items >= 2, num_edges >= 1')
    rng = np.random.default_rng(seed)

    def zipf_probs(n: int) -> np.ndarray:
        p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
        p = p[rng.permutation(n)]
        return p / p.sum()

    # users: one guaranteed edge each (if possible), the rest by activity
    base = np.arange(num_users) if num_edges >= num_users else rng.choice(
        num_users, num_edges, replace=False)
    extra = num_edges - base.size
    users = np.concatenate([base, rng.choice(num_users, extra, p=zipf_probs(num_users))])
    p_user, p_item = zipf_probs(num_users), zipf_probs(num_items)
    items = rng.choice(num_items, users.size, p=p_item)
    key = np.unique(users.astype(np.int64) * num_items + items)
    # top up the pairs lost as duplicates (a few rounds; exact unless the
    # graph is nearly complete)
    for _ in range(20):
        missing = num_edges - key.size
        if missing <= 0:
            break
        draw = int(missing * 1.1) + 16
        more = (rng.choice(num_users, draw, p=p_user).astype(np.int64) * num_items
                + rng.choice(num_items, draw, p=p_item))
        more = np.setdiff1d(more, key)  # unique, not yet present
        if more.size > missing:
            more = rng.choice(more, missing, replace=False)
        key = np.union1d(key, more)
    return np.stack([key // num_items, key % num_items])


def random_item_graph(num_items: int, k: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""A kNN-shaped item-item graph without the :math:`O(I^2)` search:
    every item gets itself plus :math:`k - 1` random neighbours, weight 1,
    symmetrically normalised (:func:`crane_pyg.nn.sym_norm`). Returns
    ``(edge_index [2, I k], edge_weight [I k])`` in the orientation of
    :class:`~crane_pyg.transforms.ItemKNNGraph`. Same cost to propagate as a
    real kNN graph with the same :math:`k`."""
    from crane_pyg.nn import sym_norm
    from torch_geometric.utils import coalesce
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(num_items).repeat_interleave(k)
    dst = torch.randint(0, num_items, (num_items, k), generator=g)
    dst[:, 0] = torch.arange(num_items)
    edge_index = coalesce(torch.stack([dst.view(-1), src]), num_nodes=num_items)
    weight = sym_norm(edge_index, None, num_items)
    return edge_index, weight


def make_heterodata(num_users: int, num_items: int, num_edges: int,
                    feature_dims: Dict[str, int], seed: int = 0,
                    heldout_fraction: float = 0.1):
    r"""A :class:`~torch_geometric.data.HeteroData` in the schema of
    :func:`crane_pyg.data.load_mmrec` built from :func:`power_law_graph`:
    ``heldout_fraction`` of the interactions split evenly into validation
    and test, the rest training; Gaussian ``float32`` features ``[I, d_m]``
    per modality."""
    from torch_geometric.data import HeteroData
    from crane_pyg.data.schema import ITEM_USER, USER_ITEM
    pairs = power_law_graph(num_users, num_items, num_edges, seed)
    rng = np.random.default_rng(seed + 1)
    u = rng.random(pairs.shape[1])
    half = heldout_fraction / 2
    train = torch.from_numpy(pairs[:, u >= heldout_fraction])
    val = torch.from_numpy(pairs[:, u < half])
    test = torch.from_numpy(pairs[:, (u >= half) & (u < heldout_fraction)])
    data = HeteroData()
    data.name = 'synthetic_power_law'
    data.modalities = sorted(feature_dims)
    data['user'].num_nodes = num_users
    data['item'].num_nodes = num_items
    g = torch.Generator().manual_seed(seed + 2)
    for m in data.modalities:
        data['item'][m] = torch.randn(num_items, feature_dims[m], generator=g)
    data[USER_ITEM].edge_index = train
    data[ITEM_USER].edge_index = train.flip(0)
    data[USER_ITEM].val_edge_index = val
    data[USER_ITEM].test_edge_index = test
    data['user'].has_train = torch.bincount(train[0], minlength=num_users) > 0
    return data
