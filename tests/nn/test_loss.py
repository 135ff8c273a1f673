import math

import pytest
import torch

from crane_pyg.nn import BPRLoss, EmbeddingL2, InfoNCE


def test_bpr_hand_values():
    pos = torch.tensor([2.0, 0.0, 1.0])
    neg = torch.tensor([0.0, 0.0, 3.0])
    terms = [math.log(1 + math.exp(-2.0)), math.log(2.0), math.log(1 + math.exp(2.0))]
    torch.testing.assert_close(BPRLoss()(pos, neg), torch.tensor(sum(terms) / 3))
    torch.testing.assert_close(BPRLoss('sum')(pos, neg), torch.tensor(sum(terms)))


def test_bpr_is_stable_for_large_gaps():
    loss = BPRLoss('sum')(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0]))
    torch.testing.assert_close(loss, torch.tensor(200.0))
    pos = torch.tensor([-200.0], requires_grad=True)
    BPRLoss()(pos, torch.tensor([200.0])).backward()
    torch.testing.assert_close(pos.grad, torch.tensor([-1.0]))


def test_bpr_errors_and_repr():
    with pytest.raises(ValueError, match='same shape'):
        BPRLoss()(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match='reduction'):
        BPRLoss('none')
    assert repr(BPRLoss()) == "BPRLoss(reduction='mean')"


def test_infonce_hand_computed_2x2():
    a = torch.tensor([[1.0, 0.0], [0.0, 3.0]])   # rows normalise to e1, e2
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])   # rows normalise to e1, (e1 + e2)/sqrt2
    tau = 0.5
    r = 1 / math.sqrt(2) / tau
    # logits = [[2, r], [0, r]]
    a_to_b = (-math.log(math.exp(2) / (math.exp(2) + math.exp(r)))
              - math.log(math.exp(r) / (1 + math.exp(r)))) / 2
    # transposed logits = [[2, 0], [r, r]]
    b_to_a = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    torch.testing.assert_close(InfoNCE(tau, symmetric=False)(a, b), torch.tensor(a_to_b))
    torch.testing.assert_close(InfoNCE(tau)(a, b), torch.tensor((a_to_b + b_to_a) / 2))


def naive_infonce(a, b, tau):
    total = 0.0
    n = a.size(0)
    for i in range(n):
        sims = [float(torch.dot(a[i], b[j]) / (a[i].norm() * b[j].norm())) / tau
                for j in range(n)]
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims))
    return total / n


@pytest.mark.parametrize('tau', [0.1, 0.2, 1.0])
def test_infonce_matches_naive_loop(tau):
    a, b = torch.randn(7, 5, dtype=torch.double), torch.randn(7, 5, dtype=torch.double)
    got = InfoNCE(tau, symmetric=False)(a, b)
    torch.testing.assert_close(got.item(), naive_infonce(a, b, tau))
    got = InfoNCE(tau)(a, b)
    expected = 0.5 * (naive_infonce(a, b, tau) + naive_infonce(b, a, tau))
    torch.testing.assert_close(got.item(), expected)


def test_infonce_properties():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    loss = InfoNCE()(a, b)
    # cosine: invariant to positive row scaling of either view
    scale = torch.rand(6, 1) + 0.5
    torch.testing.assert_close(InfoNCE()(a * scale, b), loss)
    torch.testing.assert_close(InfoNCE()(a, 3 * b), loss)
    # identical, well separated views -> near zero loss; symmetric in its arguments
    eye = torch.eye(4)
    assert InfoNCE(0.05)(eye, eye) < 1e-6
    torch.testing.assert_close(InfoNCE()(b, a), loss)
    # gradients flow to both views, zero rows do not produce NaN
    a0 = torch.zeros(3, 4, requires_grad=True)
    b0 = torch.randn(3, 4, requires_grad=True)
    InfoNCE()(a0, b0).backward()
    assert torch.isfinite(a0.grad).all() and torch.isfinite(b0.grad).all()


def test_infonce_errors_and_repr():
    with pytest.raises(ValueError, match='temperature'):
        InfoNCE(0.0)
    with pytest.raises(ValueError, match=r'\[B, d\]'):
        InfoNCE()(torch.randn(3, 4), torch.randn(4, 4))
    assert repr(InfoNCE()) == 'InfoNCE(temperature=0.2, symmetric=True)'


def test_embedding_l2():
    u = torch.tensor([[1.0, 2.0], [0.0, 1.0]])   # squared norm 6
    i = torch.tensor([[3.0, 0.0], [0.0, 0.0]])   # squared norm 9
    torch.testing.assert_close(EmbeddingL2()(u, i), torch.tensor(0.5 * 15 / 2))
    torch.testing.assert_close(EmbeddingL2()(u), torch.tensor(0.5 * 6 / 2))
    with pytest.raises(ValueError, match='at least one'):
        EmbeddingL2()()
    # MMRec's EmbLoss: the unsquared Frobenius norms, divided by the batch size
    torch.testing.assert_close(EmbeddingL2('mmrec')(u, i), torch.tensor((6 ** 0.5 + 3.0) / 2))
    assert repr(EmbeddingL2('mmrec')) == "EmbeddingL2(form='mmrec')"
    with pytest.raises(ValueError, match='form'):
        EmbeddingL2('l1')


def test_embedding_l2_mmrec_gradient_is_finite_at_zero():
    u = torch.zeros(3, 2, requires_grad=True)
    EmbeddingL2('mmrec')(u).backward()
    assert torch.isfinite(u.grad).all()
