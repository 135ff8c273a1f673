r"""The ``crane-pyg`` command (also ``python -m crane_pyg``).

Subcommands:

* ``train``: train a model (exactly ``examples/train_amazon.py``: the
  options and behaviour of :func:`crane_pyg.train.main`), plus
  ``--logger csv|tensorboard``;
* ``evaluate``: full-ranking metrics of a trained run on a split;
* ``recommend``: top-k items per user, the user's training items excluded;
* ``prepare``: a raw interaction table (+ item text / images) to an MMRec
  folder (:mod:`crane_pyg.data.prepare`);
* ``compare``: several models and seeds on one dataset
  (``benchmarks/compare_models.py`` of a source checkout).

Exit codes: 0 success; 1 the command failed while running (a missing
optional package, an I/O error, anything unexpected); 2 bad usage or bad
input (wrong options, unknown ids, malformed files, a checkpoint that does
not fit the dataset); 130 interrupted. Errors are one line on stderr
(``crane-pyg <command>: error: ...``), without a traceback
(``CRANE_PYG_TRACEBACK=1`` shows it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ['main', 'build_parser', 'COMMANDS']

PROG = 'crane-pyg'
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
COMMANDS = {
    'train': 'train a model on an MMRec folder (options: crane-pyg train --help)',
    'evaluate': 'metrics of a trained run (directory or checkpoint) on a split',
    'recommend': 'top-k items per user from a trained run, excluding their training items',
    'prepare': 'turn an interaction table (+ item text / images) into an MMRec folder',
    'compare': 'train several models and seeds on one dataset and tabulate them',
}
EXIT_CODES = ('exit codes: 0 ok; 1 failed while running (missing optional package, I/O error, '
              'unexpected error); 2 bad usage or bad input; 130 interrupted')


class UsageError(Exception):
    r"""Bad usage or bad input: exit code 2."""


class _Parser(argparse.ArgumentParser):
    r"""One-line usage errors (``prog: error: message``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f'{self.prog}: error: {message} (see {self.prog} --help)\n')


def _one_line(exc: BaseException) -> str:
    text = ' '.join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def _train(argv: Sequence[str]) -> int:
    from crane_pyg.train import build_parser as train_parser
    from crane_pyg.train import main as train_main
    from crane_pyg.train.loggers import LOGGERS

    prog = f'{PROG} train'
    parser = train_parser(prog)
    parser.error = _Parser.error.__get__(parser)  # one-line usage errors
    parser.add_argument('--logger', choices=LOGGERS,
                        help="per-epoch loss parts and validation metrics: 'csv' "
                             "(metrics.csv, the default) or 'tensorboard' (tensorboard/ in the "
                             "output directory; pip install 'crane_pyg[tensorboard]'); same as "
                             '--set train.logger=...')
    parser.epilog = (parser.epilog or '') + '. ' + EXIT_CODES[0].upper() + EXIT_CODES[1:]
    args = parser.parse_args(argv)  # --help, usage errors
    argv = list(argv)
    if args.logger is not None:  # handed on as the config key it stands for
        argv = _drop_option(argv, '--logger') + ['--set', f'train.logger={args.logger}']
    return train_main(argv, prog=prog)


def _drop_option(argv: list[str], option: str) -> list[str]:
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + '='):
            out.append(word)
    return out


# ---------------------------------------------------------------------------
# evaluate / recommend
# ---------------------------------------------------------------------------
def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from crane_pyg.train.restore import CHECKPOINTS
    parser.add_argument('run', help='a run directory of crane-pyg train (config.yaml + best.pt) '
                        'or a checkpoint file')
    parser.add_argument('--checkpoint', choices=list(CHECKPOINTS), default='best',
                        help='which checkpoint of a run directory (default: best, the best '
                        'validation epoch)')
    parser.add_argument('--data-root', help="where the dataset folder is now (default: the "
                        "run's dataset.root)")
    parser.add_argument('--device', default='cpu', help="cpu, cuda or auto (default: cpu)")
    parser.add_argument('--threads', type=int, help='CPU threads for torch')
    parser.add_argument('--batch-size', type=int, default=1024,
                        help='users scored at once (default: 1024)')


def _load_run(args: argparse.Namespace):
    import torch

    from crane_pyg.train.restore import load_trained
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be >= 1, got {args.batch_size}')
    return load_trained(args.run, checkpoint=args.checkpoint, data_root=args.data_root,
                        device=args.device)


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=f'{PROG} evaluate', description=COMMANDS['evaluate'] + '. Full '
                     'ranking over all items with the training items masked (MMRec protocol).',
                     epilog=EXIT_CODES)
    _add_run_arguments(parser)
    parser.add_argument('--split', choices=('valid', 'test', 'both'), default='both',
                        help='default: both')
    parser.add_argument('--mask-valid-in-test', action='store_true',
                        help='for the test split, also mask validation items')
    parser.add_argument('--json', metavar='FILE', help='also write the metrics as JSON')
    return parser


def _evaluate(argv: Sequence[str]) -> int:
    args = _evaluate_parser().parse_args(argv)
    import torch

    from crane_pyg.metrics import FullRankingEvaluator
    from crane_pyg.train import format_metrics_table
    from crane_pyg.train.utils import atomic_write_json

    trained = _load_run(args)
    model, train = trained.model, trained.config.train
    splits = ('valid', 'test') if args.split == 'both' else (args.split,)
    with torch.no_grad():
        embeddings = model.embeddings()
        metrics = {}
        for split in splits:
            evaluator = FullRankingEvaluator(
                trained.data, split=split, ks=train.ks, batch_size=args.batch_size,
                device=embeddings[0].device,
                mask_valid_in_test=args.mask_valid_in_test and split == 'test')
            metrics[split] = evaluator.evaluate(
                lambda users: model.score_all_items(users, embeddings))
    print(f'{trained.config.model_name} on {trained.config.dataset.name}: {trained.checkpoint} '
          f'(epoch {trained.epoch})')
    table = format_metrics_table(metrics.get('valid', {}), metrics.get('test', {}),
                                 train.ks).splitlines()
    print('\n'.join([table[0]] + [line for line in table[1:] if line.split()[0] in splits]))
    if args.json:
        atomic_write_json(args.json, {'run': str(args.run), 'checkpoint': str(trained.checkpoint),
                                      'epoch': trained.epoch, **metrics})
    return EXIT_OK


def _recommend_parser() -> argparse.ArgumentParser:
    from crane_pyg.recommend import FORMATS, INDEXES
    parser = _Parser(
        prog=f'{PROG} recommend',
        description=COMMANDS['recommend'] + '. Users and items are written with their original '
        'ids when the dataset folder has user_map.csv / item_map.csv (crane-pyg prepare '
        'writes them).', epilog=EXIT_CODES)
    _add_run_arguments(parser)
    parser.add_argument('-k', '--k', type=int, default=10, help='items per user (default: 10)')
    who = parser.add_mutually_exclusive_group()
    who.add_argument('--users', help='comma-separated user ids (default: every user)')
    who.add_argument('--users-file', help='a file with one user id per line')
    parser.add_argument('--exclude-heldout', action='store_true',
                        help="also exclude the user's validation and test items (training "
                        'items are always excluded)')
    parser.add_argument('--format', choices=FORMATS, default='csv',
                        help='csv (user,rank,item,score) or jsonl (one object per user); '
                        'default: csv')
    parser.add_argument('--output', help='write to this file (atomically) instead of stdout')
    parser.add_argument('--index', choices=INDEXES, default='torch',
                        help="torch: the model's scores; faiss: an exact inner-product faiss "
                        "index, no [users, items] score matrix (pip install 'crane_pyg[faiss]')")
    parser.add_argument('--internal-ids', action='store_true',
                        help='write the 0-based ids of the .inter file even when maps exist')
    return parser


def _recommend(argv: Sequence[str]) -> int:
    args = _recommend_parser().parse_args(argv)
    import torch

    from crane_pyg.recommend import (parse_user_ids, read_id_map, read_user_file,
                                     recommend_batches, write_recommendations)
    from crane_pyg.train.utils import atomic_write

    if args.k < 1:
        raise UsageError(f'-k must be >= 1, got {args.k}')
    trained = _load_run(args)
    model = trained.model
    if args.k > model.num_items:
        raise UsageError(f'-k {args.k} is larger than the catalogue of dataset '
                         f'{trained.config.dataset.name!r} ({model.num_items} items)')
    user_map = read_id_map(trained.folder, 'user')
    item_map = read_id_map(trained.folder, 'item')
    if args.users is not None:
        tokens = [(t.strip(), '--users') for t in args.users.split(',') if t.strip()]
        if not tokens:
            raise UsageError('--users is empty')
        users = parse_user_ids(tokens, model.num_users, user_map)
    elif args.users_file is not None:
        users = parse_user_ids(read_user_file(Path(args.users_file)), model.num_users, user_map)
        if users.numel() == 0:
            raise UsageError(f'{args.users_file}: no user id in the file')
    else:
        users = torch.arange(model.num_users)
    batches = recommend_batches(model, trained.data, users, args.k,
                                exclude_heldout=args.exclude_heldout,
                                batch_size=args.batch_size, index=args.index)
    names = {} if args.internal_ids else {'user_ids': user_map, 'item_ids': item_map}
    if args.output is None:
        write_recommendations(batches, sys.stdout, args.format, **names)
    else:
        with atomic_write(args.output, 'w') as f:
            count = write_recommendations(batches, f, args.format, **names)
        print(f'{count} users -> {args.output}', file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------
def _prepare_parser() -> argparse.ArgumentParser:
    from crane_pyg.data.prepare import PrepareConfig
    d = PrepareConfig()
    parser = _Parser(
        prog=f'{PROG} prepare',
        description=COMMANDS['prepare'] + ': k-core filter, contiguous ids (user_map.csv, '
        'item_map.csv), per-user split (chronological with timestamps, else random), '
        '<modality>_feat.npy from item text (sentence-transformers) and images (a pre-trained '
        'CNN), a README with the statistics; the result passes the loader\'s checks. Text and '
        "image features need pip install 'crane_pyg[features]'.", epilog=EXIT_CODES)
    parser.add_argument('interactions', help='interaction table: .csv, .tsv (or .txt) or '
                        '.parquet, one row per (user, item) interaction')
    parser.add_argument('--output', required=True, help='data root: the dataset goes to '
                        'OUTPUT/NAME/ (train with --data-root OUTPUT --dataset NAME)')
    parser.add_argument('--name', required=True, help='dataset name')
    parser.add_argument('--overwrite', action='store_true', help='replace OUTPUT/NAME')
    table = parser.add_argument_group('interaction table')
    table.add_argument('--user-col', default=d.user_col, help=f'default: {d.user_col}')
    table.add_argument('--item-col', default=d.item_col, help=f'default: {d.item_col}')
    table.add_argument('--time-col', help="timestamp column, numbers or dates (default: "
                       "'timestamp' when present)")
    table.add_argument('--rating-col', help="rating column (default: 'rating' when present)")
    table.add_argument('--sep', help='field separator (default: by suffix, , or tab)')
    table.add_argument('--min-rating', type=float, help='drop interactions rated below this')
    split = parser.add_argument_group('filter and split')
    split.add_argument('--k-core', type=int, default=d.k_core,
                       help=f'minimum interactions per user and item (default: {d.k_core})')
    split.add_argument('--split', choices=('auto', 'time', 'random'), default=d.split,
                       help='auto: chronological when there are timestamps, else random '
                       f'(default: {d.split})')
    split.add_argument('--valid-ratio', type=float, default=d.valid_ratio,
                       help=f'default: {d.valid_ratio}')
    split.add_argument('--test-ratio', type=float, default=d.test_ratio,
                       help=f'default: {d.test_ratio}')
    split.add_argument('--seed', type=int, default=d.seed,
                       help=f'seed of the random split (default: {d.seed})')
    feats = parser.add_argument_group('item features')
    feats.add_argument('--items', help='item table (.csv/.tsv/.parquet) with text columns '
                       'and/or a column of image paths')
    feats.add_argument('--item-key', help='key column of the item table (default: --item-col)')
    feats.add_argument('--text-col', action='append', dest='text_cols',
                       help="text column of the item table (repeatable; default: 'text' when "
                       'present)')
    feats.add_argument('--image-col', help='column of image paths (relative to the item table)')
    feats.add_argument('--images', help='folder of images named <item id>.jpg / .png / ...')
    feats.add_argument('--text-model', default=d.text_model,
                       help=f'{d.text_model} (bundled offline) or a local sentence-transformers '
                       f'folder (default: {d.text_model})')
    feats.add_argument('--image-model', default=d.image_model,
                       help=f'default: {d.image_model} (the CNN with offline weights)')
    feats.add_argument('--text-batch-size', type=int, default=d.text_batch_size,
                       help=f'default: {d.text_batch_size}')
    feats.add_argument('--image-batch-size', type=int, default=d.image_batch_size,
                       help=f'default: {d.image_batch_size}')
    feats.add_argument('--device', default=d.device, help=f'encoder device (default: {d.device})')
    parser.add_argument('--threads', type=int, help='CPU threads for torch')
    parser.add_argument('--quiet', action='store_true', help='no progress output')
    return parser


def _prepare(argv: Sequence[str]) -> int:
    args = _prepare_parser().parse_args(argv)
    from crane_pyg.data.prepare import PrepareConfig, prepare_mmrec

    names = {f.name for f in dataclasses.fields(PrepareConfig)}
    try:
        config = PrepareConfig(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as exc:
        raise UsageError(_one_line(exc)) from None
    if args.threads is not None:
        import torch
        torch.set_num_threads(max(1, args.threads))
    log = (lambda line: None) if args.quiet else None
    stats = prepare_mmrec(args.interactions, args.output, args.name, config,
                          overwrite=args.overwrite, progress=not args.quiet, log=log)
    features = ', '.join(f'{m} {info["shape"]}' for m, info in stats['features'].items())
    print(f"{stats['folder']}: {stats['users']} users, {stats['items']} items, "
          f"{stats['interactions']} interactions (train {stats['train']}, valid "
          f"{stats['valid']}, test {stats['test']}); features: {features or 'none'}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------
COMPARE_SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'compare_models.py'


def _compare(argv: Sequence[str]) -> int:
    if not COMPARE_SCRIPT.is_file():
        print(f'{PROG} compare: error: benchmarks/compare_models.py belongs to the source '
              f'repository, not to the installed package; run it from a checkout: python '
              f'benchmarks/compare_models.py --help', file=sys.stderr)
        return EXIT_FAILED
    spec = importlib.util.spec_from_file_location('crane_pyg_compare_models', COMPARE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = sys.argv[0]
    sys.argv[0] = f'{PROG} compare'  # the script's --help and messages name the command
    try:
        return module.main(list(argv))
    finally:
        sys.argv[0] = saved


# ---------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------
HANDLERS: dict[str, Callable[[Sequence[str]], int]] = {
    'train': _train, 'evaluate': _evaluate, 'recommend': _recommend, 'prepare': _prepare,
    'compare': _compare}


def build_parser() -> argparse.ArgumentParser:
    r"""The top-level parser (``crane-pyg --help``)."""
    parser = _Parser(prog=PROG, description='CRANE and baselines on PyTorch Geometric: from '
                     'your own data to served recommendations.',
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog='commands:\n' + '\n'.join(f'  {name:<10} {text}' for name, text
                                                      in COMMANDS.items())
                     + f'\n\n{PROG} COMMAND --help shows the options of a command.\n'
                     + EXIT_CODES)
    parser.add_argument('command', choices=list(COMMANDS), metavar='COMMAND',
                        help=', '.join(COMMANDS))
    parser.add_argument('--version', action='version', version=f'%(prog)s {_version()}')
    return parser


def _version() -> str:
    import crane_pyg
    return crane_pyg.__version__


def main(argv: Sequence[str] | None = None) -> int:
    r"""Runs ``crane-pyg``; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f'{PROG}: error: a command is required: {", ".join(COMMANDS)} (see {PROG} '
              f'--help)', file=sys.stderr)
        return EXIT_USAGE
    if argv[0] not in HANDLERS:
        try:
            build_parser().parse_args(argv[:1])  # --help, --version, an unknown command
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        return EXIT_USAGE  # pragma: no cover - parse_args exits
    command, rest = argv[0], argv[1:]
    prog = f'{PROG} {command}'
    try:
        return HANDLERS[command](rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `crane-pyg recommend RUN | head`: the reader has enough
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - every error becomes one line
        if os.environ.get('CRANE_PYG_TRACEBACK'):
            raise
        code, text = _classify(exc)
        print(f'{prog}: error: {text}', file=sys.stderr)
        return code


def _classify(exc: BaseException) -> tuple[int, str]:
    r"""Exit code and message of an exception: 2 for bad usage or input, 1
    for a failure while running."""
    from crane_pyg.data import DataFormatError
    from crane_pyg.data.features import FeatureExtractorUnavailable
    from crane_pyg.recommend import UnknownIdError
    from crane_pyg.train import CheckpointError, ConfigError, DatasetNotFoundError

    if isinstance(exc, DatasetNotFoundError):  # its message is a multi-line guide
        return EXIT_USAGE, str(exc).strip().splitlines()[0]
    if isinstance(exc, FeatureExtractorUnavailable):
        return EXIT_FAILED, _one_line(exc)
    if isinstance(exc, (UsageError, DataFormatError, ConfigError, CheckpointError,
                        UnknownIdError, FileExistsError)):
        return EXIT_USAGE, _one_line(exc)
    if isinstance(exc, ValueError) and type(exc) is ValueError:
        return EXIT_USAGE, _one_line(exc)
    return EXIT_FAILED, f'{type(exc).__name__}: {_one_line(exc)}'
