r"""Uniform negative sampling for BPR training."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .schema import ITEM, USER, USER_ITEM

__all__ = ['BPRSampler']

Triple = Tuple[Tensor, Tensor, Tensor]


class BPRSampler:
    r"""Draws the (user, positive item, negative item) triples of one BPR
    training epoch.

    Every epoch holds one triple per training interaction :math:`(u, i)`, in a
    shuffled order, with a negative item :math:`j` drawn uniformly from the
    items :math:`u` has not trained on,

    .. math::
        j \sim \mathcal{U}\big(\mathcal{I} \setminus \mathcal{N}(u)\big),
        \qquad P(j \mid u) = \frac{1}{|\mathcal{I}| - |\mathcal{N}(u)|},

    sampled exactly rather than by rejection: with the user's training items
    sorted, :math:`s_0 < s_1 < \dots`, the :math:`r`-th free item is
    :math:`r + |\{t : s_t - t \le r\}|` (the gaps :math:`s_t - t` are
    non-decreasing), one :func:`torch.searchsorted` over all users at once;
    :math:`r \sim \mathcal{U}\{0, \dots, |\mathcal{I}| - |\mathcal{N}(u)| - 1\}`.
    Cost :math:`O(E \log E)` per epoch, no resampling rounds.

    An epoch is a pure function of :obj:`(seed, epoch)`: a resumed run draws the
    same epochs again.  Random numbers are drawn on the CPU (a
    :class:`torch.Generator` seeded from both), so the triples do not depend on
    the output device either.

    For data-parallel training, rank :obj:`rank` of :obj:`world_size` processes
    receives the shard ``perm[rank::world_size]`` of the full epoch (each rank
    computes the full epoch, cheap next to a training step, and keeps its
    part): the shards are disjoint and together give exactly the
    single-process epoch.

    Args:
        edge_index (torch.Tensor): training interactions ``[2, E]``, row 0 user
            ids, row 1 item ids (e.g. ``data['user', 'interacts',
            'item'].edge_index``).  A repeated pair yields one triple per
            occurrence.
        num_users (int): the number of users :math:`U`.
        num_items (int): the number of items :math:`|\mathcal{I}|`.
        seed (int, optional): the base seed. (default: :obj:`0`)
        device (torch.device or str, optional): where the returned tensors
            live. (default: the device of :obj:`edge_index`)
        rank (int, optional): this process's shard. (default: :obj:`0`)
        world_size (int, optional): the number of shards. (default: :obj:`1`)

    Example:
        >>> sampler = BPRSampler.from_data(data, seed=0)
        >>> for users, pos, neg in sampler.batches(epoch, batch_size=2048):
        ...     loss, parts = model.loss(users, pos, neg)
    """
    def __init__(
        self,
        edge_index: Tensor,
        num_users: int,
        num_items: int,
        *,
        seed: int = 0,
        device: Optional[Union[torch.device, str]] = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 \
                or edge_index.size(0) != 2:
            shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index)
            raise ValueError(f"'edge_index' must be a tensor of shape [2, E] (got {shape})")
        if edge_index.dtype in (torch.bool,) or edge_index.is_floating_point() \
                or edge_index.is_complex():
            raise ValueError(f"'edge_index' must hold integer ids (got {edge_index.dtype})")
        if edge_index.size(1) == 0:
            raise ValueError("'edge_index' holds no training interactions")
        if num_users < 1 or num_items < 1:
            raise ValueError(f"'num_users' and 'num_items' must be positive "
                             f"(got {num_users}, {num_items})")
        if seed < 0:
            raise ValueError(f"'seed' must be non-negative (got {seed})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size (got rank={rank}, "
                             f"world_size={world_size})")
        if edge_index.size(1) < world_size:
            raise ValueError(f'{edge_index.size(1)} training interactions cannot be split '
                             f'into {world_size} non-empty shards')

        self.num_users, self.num_items = int(num_users), int(num_items)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.device = torch.device(device) if device is not None else edge_index.device

        users, items = edge_index.detach().to('cpu', torch.long)
        for name, ids, bound in (('user', users, num_users), ('item', items, num_items)):
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= bound:
                raise ValueError(f"'edge_index' row {0 if name == 'user' else 1} holds {name} "
                                 f"id {lo if lo < 0 else hi}, outside [0, {bound - 1}]")
        self._users, self._items = users.contiguous(), items.contiguous()

        # Sorted unique (user, item) pairs, their per-user offsets and gaps.
        keys = torch.unique(users * num_items + items)  # sorted
        pair_users, pair_items = keys // num_items, keys % num_items
        degree = torch.bincount(pair_users, minlength=num_users)
        full = torch.nonzero(degree >= num_items).flatten()
        if full.numel() > 0:
            raise ValueError(f'user {int(full[0])} has trained on all {num_items} items, so '
                             f'no negative item exists for it ({full.numel()} such users)')
        ptr = torch.cumsum(degree, 0) - degree
        gaps = pair_items - (torch.arange(keys.numel()) - ptr[pair_users])
        self._ptr = ptr
        self._num_free = num_items - degree
        self._gap_keys = pair_users * (num_items + 1) + gaps  # sorted

    @classmethod
    def from_data(cls, data, **kwargs) -> 'BPRSampler':
        r"""Builds the sampler from the training edges of a
        :class:`~torch_geometric.data.HeteroData` made by
        :func:`~crane_pyg.data.load_mmrec`."""
        return cls(data[USER_ITEM].edge_index, data[USER].num_nodes, data[ITEM].num_nodes,
                   **kwargs)

    @property
    def num_edges(self) -> int:
        r"""The number of training interactions :math:`E` (the full epoch)."""
        return self._users.numel()

    def __len__(self) -> int:
        r"""The number of triples in this rank's shard of an epoch."""
        return len(range(self.rank, self.num_edges, self.world_size))

    def generator(self, epoch: int) -> torch.Generator:
        r"""The CPU generator of :obj:`epoch`, seeded from :obj:`(seed, epoch)`."""
        if epoch < 0:
            raise ValueError(f"'epoch' must be non-negative (got {epoch})")
        state = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def sample_negatives(self, users: Tensor, generator: torch.Generator) -> Tensor:
        r"""Draws one negative item per entry of :obj:`users` (CPU, long),
        uniformly among the items that user has not trained on."""
        num_free = self._num_free[users]
        r = (torch.rand(users.numel(), dtype=torch.float64, generator=generator)
             * num_free).long()
        return self.free_item(users, torch.minimum(r, num_free - 1))

    def free_item(self, users: Tensor, r: Tensor) -> Tensor:
        r"""The :obj:`r`-th (0-based, ascending) item that each user of
        :obj:`users` has not trained on (CPU long tensors of equal shape,
        :math:`0 \le r < |\mathcal{I}| - |\mathcal{N}(u)|`)."""
        query = users * (self.num_items + 1) + r
        below = torch.searchsorted(self._gap_keys, query, right=True) - self._ptr[users]
        return r + below

    def sample(self, epoch: int) -> Triple:
        r"""Returns ``(users, pos_items, neg_items)``, three :obj:`torch.long`
        tensors of this rank's shard of epoch :obj:`epoch`."""
        generator = self.generator(epoch)
        perm = torch.randperm(self.num_edges, generator=generator)
        users, pos = self._users[perm], self._items[perm]
        neg = self.sample_negatives(users, generator)
        if self.world_size > 1:
            users, pos, neg = (t[self.rank::self.world_size] for t in (users, pos, neg))
        return users.to(self.device), pos.to(self.device), neg.to(self.device)

    def num_batches(self, batch_size: int) -> int:
        r"""The number of batches per epoch, equal on every rank:
        :math:`\lceil \lceil E / \text{world\_size} \rceil / \text{batch\_size} \rceil`."""
        if batch_size < 1:
            raise ValueError(f"'batch_size' must be positive (got {batch_size})")
        return math.ceil(math.ceil(self.num_edges / self.world_size) / batch_size)

    def batches(self, epoch: int, batch_size: int) -> Iterator[Triple]:
        r"""Yields the epoch's shard in :meth:`num_batches` contiguous batches
        of near-equal size (at most :obj:`batch_size`, sizes differing by at
        most one), so that every rank yields the same number of non-empty
        batches."""
        num_batches = self.num_batches(batch_size)
        users, pos, neg = self.sample(epoch)
        if users.numel() < num_batches:
            raise ValueError(
                f'rank {self.rank} holds {users.numel()} triples, too few for the '
                f'{num_batches} batches of the largest shard; use batch_size >= 2')
        yield from zip(users.tensor_split(num_batches), pos.tensor_split(num_batches),
                       neg.tensor_split(num_batches))

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(num_users={self.num_users}, '
                f'num_items={self.num_items}, num_edges={self.num_edges}, seed={self.seed}, '
                f'rank={self.rank}, world_size={self.world_size})')
