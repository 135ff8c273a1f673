r"""An MMRec folder as a PyG :class:`~torch_geometric.data.InMemoryDataset`.

:class:`MMRecDataset` parses the folder once with
:func:`~crane_pyg.data.load_mmrec` and caches the resulting
:class:`~torch_geometric.data.HeteroData` (after an optional
``pre_transform``) in ``processed/``; later loads read that one file
instead of parsing the ``.inter`` text and checking it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Union

from torch_geometric.data import HeteroData, InMemoryDataset

from .errors import DataFormatError
from .mmrec import FEATURE_SUFFIX, load_mmrec

__all__ = ['MMRecDataset']

#: bumped when the processed file's layout changes (old caches are then ignored)
PROCESSED_VERSION = 1


class MMRecDataset(InMemoryDataset):
    r"""The MMRec-format dataset in folder ``root/name/`` (``<name>.inter``
    plus ``<modality>_feat.npy`` files), one
    :class:`~torch_geometric.data.HeteroData` graph with the schema of
    :func:`~crane_pyg.data.load_mmrec`.

    The first instantiation parses and validates the folder and saves the
    graph to ``processed_dir`` (written to a temporary file and renamed, so
    an interrupted run leaves no truncated cache); later ones load that file.
    The cache file name carries a fingerprint of the raw files (names, sizes,
    modification times) and of ``pre_transform``, so editing the data or
    changing the ``pre_transform`` processes the folder again instead of
    serving a stale graph.

    .. code-block:: python

        from crane_pyg.datasets import MMRecDataset
        from crane_pyg.transforms import ItemKNNGraph

        dataset = MMRecDataset('data', 'games', pre_transform=ItemKNNGraph(k=10))
        data = dataset[0]   # HeteroData

    Args:
        root (str or os.PathLike): the folder holding the dataset folder.
        name (str): the dataset name (sub-folder of :obj:`root`).
        transform (callable, optional): applied to the graph on every access.
        pre_transform (callable, optional): applied once before caching.
        force_reload (bool): process the folder again even if cached.
            (default: :obj:`False`)
        processed_root (str or os.PathLike, optional): where the cache goes,
            as ``processed_root/name/``; default ``root/name/processed/``
            (give one when the data folder is read-only).
        log (bool): print ``Processing...`` while processing. (default: :obj:`True`)

    Raises:
        DataFormatError: the folder or its ``.inter`` file is missing, or the
            files break the format (see :func:`~crane_pyg.data.load_mmrec`).
        PermissionError: the cache folder cannot be written.
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        name: str,
        transform: Optional[Callable] = None,
        pre_transform: Optional[Callable] = None,
        force_reload: bool = False,
        processed_root: Optional[Union[str, os.PathLike]] = None,
        log: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name or os.sep in name or name in ('.', '..'):
            raise ValueError(f"MMRecDataset: 'name' must be a folder name, got {name!r}")
        self.name = name
        self._processed_root = None if processed_root is None else str(processed_root)
        folder = Path(root) / name
        inter = folder / f'{name}.inter'
        if not inter.is_file():
            raise DataFormatError(f'interaction file {inter.name!r} not found (an MMRec '
                                  f'folder holds <name>.inter; `crane-pyg prepare` makes one '
                                  f'from a CSV / TSV / Parquet table)', path=folder)
        self._pre_transform_repr = repr(pre_transform)
        with warnings.catch_warnings():
            # PyG warns when pre_transform differs from the cached one; here
            # the fingerprint in the file name already selects the right cache
            warnings.filterwarnings('ignore', message='The `pre_transform` argument differs')
            super().__init__(str(root), transform, pre_transform, None, log=log,
                             force_reload=force_reload)
        self.load(self.processed_paths[0], data_cls=HeteroData)

    @property
    def raw_dir(self) -> str:
        return osp.join(self.root, self.name)

    @property
    def processed_dir(self) -> str:
        if self._processed_root is not None:
            return osp.join(self._processed_root, self.name)
        return osp.join(self.root, self.name, 'processed')

    @property
    def raw_file_names(self) -> List[str]:
        features = sorted(p.name for p in Path(self.raw_dir).glob('*' + FEATURE_SUFFIX)
                          if p.is_file())
        return [f'{self.name}.inter'] + features

    @property
    def processed_file_names(self) -> List[str]:
        return [f'data_v{PROCESSED_VERSION}_{self.fingerprint()}.pt']

    def fingerprint(self) -> str:
        r"""A short hash of the raw files (name, size, modification time) and
        the ``pre_transform``; part of the cache file name."""
        stats = []
        for name in self.raw_file_names:
            st = os.stat(osp.join(self.raw_dir, name))
            stats.append([name, st.st_size, st.st_mtime_ns])
        blob = json.dumps({'files': stats, 'pre_transform': self._pre_transform_repr})
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def download(self) -> None:  # pragma: no cover - __init__ checks the folder first
        raise DataFormatError('dataset folder is incomplete', path=self.raw_dir)

    def process(self) -> None:
        folder = Path(self.processed_dir)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f'{folder}: cannot write the processed cache; pass '
                                  f'processed_root= a writable folder')
        data = load_mmrec(self.raw_dir)
        if self.pre_transform is not None:
            data = self.pre_transform(data)
        target = Path(self.processed_paths[0])
        for stale in folder.glob('data_v*.pt'):  # caches of older versions of the files
            stale.unlink()
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{target.name}.', suffix='.tmp')
        os.close(fd)
        try:
            self.save([data], tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name!r}, root={self.root!r})'
