"""Exceptions raised by the data layer."""
from __future__ import annotations

import os
from typing import Optional, Union


class DataFormatError(ValueError):
    r"""A dataset file does not follow the MMRec format.

    The message always names the offending file and, where there is one, the
    1-based line number of the ``.inter`` file (the header is line 1) or the
    feature row, followed by what is wrong.  The same facts are available as
    attributes for programmatic use.

    Args:
        message (str): what is wrong.
        path (str or os.PathLike, optional): the offending file or folder.
        line (int, optional): 1-based line number in :obj:`path`.
        row (int, optional): 0-based row of a feature matrix.

    Attributes:
        path (str or None), line (int or None), row (int or None): as given.
    """
    def __init__(
        self,
        message: str,
        *,
        path: Optional[Union[str, os.PathLike]] = None,
        line: Optional[int] = None,
        row: Optional[int] = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.row = row
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f'line {line}')
        if row is not None:
            where.append(f'row {row}')
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
