"""The one batched evaluation (mergelab.evaluation): the same numbers whatever the batch size, one scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mergelab.align.barrier import evaluate, linear_path
from mergelab.ensemble import model_outputs
from mergelab.evaluation import accuracy_pct, correct, in_batches, mean_cross_entropy, predict_logits


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


X = torch.randn(23, 4, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2] * 7 + [0, 1])


def _row_exact(x: torch.Tensor) -> torch.Tensor:
    """A forward whose every row depends on its own input row only, with exact arithmetic: any batching must give
    the same bits, so an equality failure can only be an ordering or concatenation error."""
    return x * 2 + torch.arange(x.shape[1])


def test_batches_are_concatenated_in_order_for_tensors_and_tuples() -> None:
    assert torch.equal(in_batches(_row_exact, X, 5), _row_exact(X))  # 23 rows: 4 full batches and one of 3
    f, g = in_batches(lambda xb: (_row_exact(xb), -xb), X, 7)
    assert torch.equal(f, _row_exact(X)) and torch.equal(g, -X)


def test_batched_logits_and_features_match_one_pass_up_to_matmul_rounding() -> None:
    # bit equality across batch sizes is not a property of float matmul: MKL picks other kernels (and summation
    # orders) for other row counts, e.g. on AVX-512 machines 5 rows and 23 rows differ in the last ulp
    net = _Net().eval()
    whole = net(X).detach()
    torch.testing.assert_close(in_batches(net, X, 5), whole, rtol=1e-6, atol=1e-6)
    out = model_outputs(net, X, batch_size=7)
    torch.testing.assert_close(out.logits, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.features, net.features(X).detach(), rtol=1e-6, atol=1e-6)


def test_predict_logits_evaluates_in_eval_mode_and_restores_training_mode() -> None:
    net = _Net().train()
    logits = predict_logits(net, X, 4)
    assert net.training  # restored
    # BatchNorm ran on running statistics, not batch ones (batch statistics would differ by far more than ulps)
    torch.testing.assert_close(logits, net.eval()(X).detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits, net.train()(X).detach(), atol=1e-3)


def test_accuracy_is_in_percent_and_the_loss_does_not_depend_on_the_batch_size() -> None:
    logits = torch.zeros(4, 3)
    logits[torch.arange(4), torch.tensor([0, 1, 2, 2])] = 1.0
    y = torch.tensor([0, 1, 2, 0])
    assert correct(logits, y).tolist() == [True, True, True, False]
    assert accuracy_pct(logits, y) == 75.0
    net = _Net().eval()
    loss_a, acc_a = evaluate(net, X, Y, batch_size=5)
    loss_b, acc_b = evaluate(net, X, Y, batch_size=1000)
    # equal up to the logits' matmul rounding across batch sizes (see the test above), summed in float64
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert loss_a == pytest.approx(mean_cross_entropy(net(X).detach(), Y), rel=1e-6)
    assert acc_a == acc_b == accuracy_pct(net(X).detach(), Y)


def test_the_path_reports_accuracy_in_percent() -> None:
    net = _Net().eval()
    sd = net.state_dict()
    path = linear_path(net, sd, sd, X, Y, points=3)
    assert path.accuracies_pct == [accuracy_pct(net(X).detach(), Y)] * 3
    assert path.accuracy_barrier == 0.0 and path.loss_barrier == 0.0
