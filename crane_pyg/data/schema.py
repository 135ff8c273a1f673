"""Names of the node and edge types used throughout crane_pyg."""

USER = 'user'
ITEM = 'item'
#: training interactions, the message-passing graph (row 0 users, row 1 items)
USER_ITEM = ('user', 'interacts', 'item')
#: the reverse of :data:`USER_ITEM`, as :class:`torch_geometric.transforms.ToUndirected` names it
ITEM_USER = ('item', 'rev_interacts', 'user')
#: the item-item semantic kNN graph added by :class:`crane_pyg.transforms.ItemKNNGraph`
ITEM_ITEM = ('item', 'similar', 'item')
