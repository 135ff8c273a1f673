"""Data-parallel training: 2 gloo processes on CPU equal one process with the
same global batch; sharded evaluation counts every user exactly once."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch_geometric.data import HeteroData

from crane_pyg.data.schema import ITEM_USER, USER_ITEM
from crane_pyg.metrics import FullRankingEvaluator
from crane_pyg.models import LightGCN
from crane_pyg.train import LAST, TrainConfig, Trainer, load_checkpoint, main
from crane_pyg.train.distributed import evaluate_sharded, shard_evaluator

WORLD_SIZE = 2
NUM_USERS, NUM_ITEMS, PER_USER = 40, 30, 6   # 240 training triples
BATCH = 60                                  # E is a multiple of the global batch


def tiny_data() -> HeteroData:
    """40 users x 30 items; 6 training, 1 valid and 1 test item per user."""
    g = torch.Generator().manual_seed(0)
    items = torch.stack([torch.randperm(NUM_ITEMS, generator=g)[:PER_USER + 2]
                         for _ in range(NUM_USERS)])               # [U, 8] distinct
    users = torch.arange(NUM_USERS).repeat_interleave(PER_USER)
    train = torch.stack([users, items[:, :PER_USER].reshape(-1)])
    order = (train[0] * NUM_ITEMS + train[1]).argsort()
    data = HeteroData()
    data.name = 'tiny'
    data.modalities = []
    data['user'].num_nodes = NUM_USERS
    data['item'].num_nodes = NUM_ITEMS
    data[USER_ITEM].edge_index = train[:, order]
    data[ITEM_USER].edge_index = train[:, order].flip(0)
    all_users = torch.arange(NUM_USERS)
    data[USER_ITEM].val_edge_index = torch.stack([all_users, items[:, PER_USER]])
    # users 0..2 have no test item: the test split evaluates 37 users, an odd number
    data[USER_ITEM].test_edge_index = torch.stack([all_users[3:], items[3:, PER_USER + 1]])
    data['user'].has_train = torch.ones(NUM_USERS, dtype=torch.bool)
    return data


def make_model() -> LightGCN:
    torch.manual_seed(7)
    # the squared L2 form is a sum over triples, so two ranks equal one process
    # exactly (MMRec's unsquared norm is not; see crane_pyg.train.distributed)
    return LightGCN.from_data(tiny_data(), embedding_dim=8, num_layers=2, reg_weight=1e-2,
                              reg_form='squared', backend='auto')


def tiny_config() -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=BATCH, lr=0.05, eval_batch_size=16, seed=5,
                       device='cpu', ks=(5, 10), stop_metric='recall@10', patience=10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from crane_pyg.train.distributed import destroy_distributed, init_distributed
    ctx = init_distributed('cpu')
    try:
        data = tiny_data()
        # 1. sharded evaluation of a fixed model
        model = make_model().eval()
        with torch.no_grad():
            user_emb, item_emb = model.embeddings()
        score = lambda u: user_emb[u] @ item_emb.t()  # noqa: E731
        evaluator = FullRankingEvaluator(data, 'test', ks=(5, 10), batch_size=8)
        shard = shard_evaluator(evaluator, ctx.rank, ctx.world_size)
        sharded = evaluate_sharded(evaluator, score, ctx)
        # 2. training
        trainer = Trainer(make_model(), data, tiny_config(), Path(out) / 'run', quiet=True,
                          restore_best=False, plot=False, distributed=ctx)
        results = trainer.fit()
        torch.save({'shard_users': shard.users, 'sharded_eval': sharded, 'results': results,
                    'state': trainer.model.state_dict(), 'history': trainer.history},
                   Path(out) / f'rank{rank}.pt')
    finally:
        destroy_distributed()


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(out / f'rank{r}.pt', weights_only=False) for r in range(WORLD_SIZE)]
    return out, ranks


@pytest.fixture(scope='module')
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('single')
    trainer = Trainer(make_model(), tiny_data(), tiny_config(), out, quiet=True,
                      restore_best=False, plot=False)
    results = trainer.fit()
    return out, trainer, results


def test_two_ranks_equal_one_process(ddp_run, single_run):
    out, ranks = ddp_run
    _, trainer, results = single_run
    reference = trainer.model.state_dict()
    for rank in ranks:  # both replicas hold the single-process parameters
        assert set(rank['state']) == set(reference)
        for name, value in reference.items():
            torch.testing.assert_close(rank['state'][name], value, atol=1e-5, rtol=0)
    # the parameters moved: the comparison is not trivially between initialisations
    start = make_model().state_dict()
    assert (reference['user_embedding.weight'] - start['user_embedding.weight']).abs().max() > 1e-2
    # the epoch losses are the means over all ranks' triples, as in one process
    for ddp, one in zip(ranks[0]['history'], trainer.history):
        assert ddp['loss'] == pytest.approx(one['loss'], abs=1e-5)
        assert ddp['valid'] == pytest.approx(one['valid'], abs=1e-6)
    assert ranks[0]['results']['test'] == pytest.approx(results['test'], abs=1e-6)
    assert ranks[0]['results']['world_size'] == 2 and results['world_size'] == 1
    # early stopping state identical on every rank
    assert ranks[0]['results']['best_epoch'] == ranks[1]['results']['best_epoch'] \
        == results['best_epoch']


def test_only_rank_zero_writes(ddp_run):
    out, ranks = ddp_run
    run = out / 'run'
    assert sorted(p.name for p in run.iterdir()) == ['best.pt', 'history.jsonl', 'last.pt',
                                                     'metrics.csv', 'results.json']
    saved = json.loads((run / 'results.json').read_text())
    assert saved['test'] == pytest.approx(ranks[0]['results']['test'])
    assert len((run / 'history.jsonl').read_text().splitlines()) == 2
    checkpoint = load_checkpoint(run / LAST)
    # unwrapped keys (no DDP 'module.' prefix): loadable into a plain model
    make_model().load_state_dict(checkpoint['model'])
    torch.testing.assert_close(checkpoint['model']['item_embedding.weight'],
                               ranks[1]['state']['item_embedding.weight'])


def test_sharded_evaluation_counts_every_user_once(ddp_run):
    _, ranks = ddp_run
    model = make_model().eval()
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    evaluator = FullRankingEvaluator(tiny_data(), 'test', ks=(5, 10), batch_size=8)
    expected = evaluator.evaluate(lambda u: user_emb[u] @ item_emb.t())
    shards = [r['shard_users'] for r in ranks]
    assert evaluator.num_users == 37
    assert [s.numel() for s in shards] == [19, 18]
    union = torch.cat(shards).sort().values
    assert torch.equal(union, evaluator.users)          # disjoint and complete
    for rank in ranks:
        assert rank['sharded_eval'] == pytest.approx(expected, abs=1e-12)
    # a non-trivial value: the averages are over 37 users, not per shard
    assert 0 < expected['recall@10'] < 1


def test_distributed_flag_without_torchrun_is_a_clear_error(monkeypatch, tmp_path, capsys):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    assert main(['--distributed', '--epochs', '1', '--output', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'torchrun --nproc_per_node' in err and 'Traceback' not in err


def test_global_batch_must_split_evenly():
    from crane_pyg.train.distributed import DistributedContext
    ctx = DistributedContext(rank=0, world_size=2, local_rank=0, device=torch.device('cpu'),
                             backend='gloo')
    config = TrainConfig(batch_size=61, device='cpu')
    with pytest.raises(ValueError, match='multiple of the 2 processes'):
        Trainer(make_model(), tiny_data(), config, quiet=True, distributed=ctx)
