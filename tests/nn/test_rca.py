import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from crane_pyg.nn import RecursiveCrossModalAttention


def naive_rca(rca, x):
    """Node-by-node, modality-by-modality implementation of the documented equations."""
    num_nodes, num_mod, dim = x.shape
    out = []
    for n in range(num_nodes):
        xs = [x[n, m] for m in range(num_mod)]
        for r in range(rca.num_recursions):
            blk = rca.blocks[0 if rca.share_across_recursions else r]
            joint = blk.lin_j.weight @ torch.cat(xs) + blk.lin_j.bias
            tokens = [joint[t * dim:(t + 1) * dim] for t in range(rca.num_joint_tokens)]
            new = []
            for m in range(num_mod):
                q = blk.lin_q.weight @ xs[m]
                corr = torch.stack([torch.tanh(q @ (blk.lin_k.weight @ tok) / math.sqrt(dim))
                                    for tok in tokens])
                att = torch.softmax(corr, dim=0)
                ctx = sum(att[t] * (blk.lin_v.weight @ tokens[t]) for t in range(len(tokens)))
                new.append(xs[m] + F.gelu(blk.lin_o.weight @ ctx + blk.lin_o.bias))
            xs = new
        out.append(rca.lin_z.weight @ torch.cat(xs) + rca.lin_z.bias)
    return torch.stack(out)


@pytest.mark.parametrize('num_modalities', [1, 2, 3])
@pytest.mark.parametrize('num_recursions', [0, 1, 3])
def test_shapes(num_modalities, num_recursions):
    rca = RecursiveCrossModalAttention(num_modalities, 16, num_recursions=num_recursions)
    x = torch.randn(10, num_modalities, 16)
    z, refined = rca(x, return_tokens=True)
    assert z.shape == (10, 16) and refined.shape == (10, num_modalities, 16)
    assert rca(x).shape == (10, 16)
    assert len(rca.blocks) == (1 if num_recursions else 0)
    mean = RecursiveCrossModalAttention(num_modalities, 16, output='mean')
    assert mean(x).shape == (10, 16)
    concat = RecursiveCrossModalAttention(num_modalities, 16, output='concat')
    assert concat(x).shape == (10, num_modalities * 16)
    wide = RecursiveCrossModalAttention(num_modalities, 16, num_joint_tokens=5, out_dim=7)
    assert wide(x).shape == (10, 7)


@pytest.mark.parametrize('num_modalities', [1, 2, 3])
def test_zero_recursions_is_exactly_concatenation(num_modalities):
    rca = RecursiveCrossModalAttention(num_modalities, 8, num_recursions=0)
    x = torch.randn(20, num_modalities, 8)
    expected = F.linear(x.reshape(20, num_modalities * 8), rca.lin_z.weight, rca.lin_z.bias)
    torch.testing.assert_close(rca(x), expected, rtol=0, atol=0)
    z, refined = rca(x, return_tokens=True)
    assert torch.equal(refined, x)
    assert sum(p.numel() for p in rca.parameters()) == rca.lin_z.weight.numel() + 8


@pytest.mark.parametrize('num_modalities,num_joint_tokens', [(1, None), (2, None), (3, 4)])
@pytest.mark.parametrize('share', [True, False])
def test_matches_naive_per_node_equations(num_modalities, num_joint_tokens, share):
    rca = RecursiveCrossModalAttention(num_modalities, 6, num_recursions=2,
                                       num_joint_tokens=num_joint_tokens,
                                       share_across_recursions=share).double()
    x = torch.randn(4, num_modalities, 6, dtype=torch.double)
    torch.testing.assert_close(rca(x), naive_rca(rca, x))


def test_refinement_changes_the_modalities():
    rca = RecursiveCrossModalAttention(2, 8, num_recursions=1)
    x = torch.randn(5, 2, 8)
    _, refined = rca(x, return_tokens=True)
    assert not torch.allclose(refined, x)


@pytest.mark.parametrize('share', [True, False])
@pytest.mark.parametrize('layer_norm', [False, True])
def test_gradients_reach_every_parameter(share, layer_norm):
    rca = RecursiveCrossModalAttention(3, 8, num_recursions=2, share_across_recursions=share,
                                       layer_norm=layer_norm, dropout=0.1)
    assert len(rca.blocks) == (1 if share else 2)
    x = torch.randn(7, 3, 8, requires_grad=True)
    rca(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in rca.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_permutation_equivariance_over_nodes():
    rca = RecursiveCrossModalAttention(2, 8, num_recursions=2, dropout=0.5).eval()
    x = torch.randn(30, 2, 8)
    perm = torch.randperm(30)
    torch.testing.assert_close(rca(x[perm]), rca(x)[perm])


def test_dropout_only_in_training():
    rca = RecursiveCrossModalAttention(2, 8, num_recursions=1, dropout=0.5)
    x = torch.randn(30, 2, 8)
    rca.eval()
    torch.testing.assert_close(rca(x), rca(x))
    rca.train()
    assert not torch.allclose(rca(x), rca(x))


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_no_quadratic_intermediate():
    num_nodes, num_mod, dim = 50_000, 2, 32
    rca = RecursiveCrossModalAttention(num_mod, dim, num_recursions=2)
    x = torch.randn(num_nodes, num_mod, dim, requires_grad=True)
    recorder = _MaxNumel()
    with recorder:
        rca(x).sum().backward()
    assert any('backward' in op for op in recorder.ops)  # backward ops were seen, too
    # the largest tensor is O(N M d) (here 3.2M elements); N x N would be 2.5e9
    linear_size = num_nodes * num_mod * dim
    assert recorder.max_numel <= 2 * linear_size, recorder.max_numel


def test_bad_input_and_options():
    rca = RecursiveCrossModalAttention(2, 8)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 2, 8\].*got \[4, 3, 8\]"):
        rca(torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match=r"got \[4, 16\]"):
        rca(torch.randn(4, 16))
    with pytest.raises(ValueError, match='output'):
        RecursiveCrossModalAttention(2, 8, output='sum')
    with pytest.raises(ValueError, match='num_recursions'):
        RecursiveCrossModalAttention(2, 8, num_recursions=-1)
    with pytest.raises(ValueError, match='num_modalities'):
        RecursiveCrossModalAttention(0, 8)
    assert repr(rca) == ('RecursiveCrossModalAttention(num_modalities=2, dim=8, '
                         'num_recursions=2, num_joint_tokens=2, '
                         "share_across_recursions=True, output='concat_proj')")


def test_reset_parameters_reinitialises():
    rca = RecursiveCrossModalAttention(2, 8, num_recursions=1)
    before = [p.detach().clone() for p in rca.parameters()]
    rca.reset_parameters()
    after = list(rca.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after) if b.numel() > 1)
