"""``samkit.optim._tensors`` on plain tensors: ``dot``, ``mul_`` by a tensor, the loop path.

Their sharded (DTensor) behaviour is tested on two processes in ``test_fsdp.py``.
"""

from __future__ import annotations

import pytest
import torch

from samkit.optim import _tensors as T


def _lists(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), (1,)]
    a = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return a, b


def test_dot_is_the_inner_product_of_the_concatenations():
    a, b = _lists()
    expected = torch.dot(torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b]))
    got = T.dot(a, b)
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(T.dot(a, a), T.global_norm(a) ** 2, rtol=1e-14, atol=0)


def test_dot_takes_mixed_dtypes_in_the_widest_and_half_precision_in_float32():
    a, b = _lists()
    mixed = T.dot([a[0], a[1].float()], [b[0], b[1].float()])
    assert mixed.dtype == torch.float64
    expected = (a[0] * b[0]).sum() + (a[1].float().double() * b[1].float().double()).sum()
    torch.testing.assert_close(mixed, expected, rtol=1e-7, atol=0)
    big = [torch.full((4,), 300.0, dtype=torch.float16)]  # 300 * 300 overflows float16
    got = T.dot(big, big)
    assert got.dtype == torch.float32 and float(got) == 4 * 300.0**2


def test_dot_refuses_lists_of_different_lengths_and_gives_zero_for_none():
    a, b = _lists()
    with pytest.raises(ValueError, match="different lengths"):
        T.dot(a, b[:-1])
    assert float(T.dot([], [])) == 0.0


@pytest.mark.parametrize("foreach", [True, False])
def test_mul_by_a_zero_dim_tensor_equals_mul_by_its_value(foreach):
    a, _ = _lists()
    factor = torch.tensor(0.37, dtype=torch.float64)
    by_tensor = [t.clone() for t in a]
    T.mul_(by_tensor, factor, foreach)
    for t, u in zip(by_tensor, a):
        assert torch.equal(t, u * 0.37)
    mixed = [a[0].clone(), a[1].float()]  # the factor is cast to each tensor's dtype
    T.mul_(mixed, factor, foreach)
    assert torch.equal(mixed[1], a[1].float() * factor.float())


def test_plain_tensors_are_not_sharded():
    a, _ = _lists()
    assert not T.is_sharded(a)
    assert not T.Buckets(a).sharded


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_are_taken_in_float32(foreach, dtype):
    # One tensor whose norm (80000) is above float16's largest value (65504), and many
    # tensors whose squares a 16-bit sum would round away (bfloat16 stops counting at 256):
    # taken in float32, per tensor and across tensors, both are right to float32 precision.
    big = [torch.full((4,), 40000.0, dtype=dtype), torch.full((3,), 3.0, dtype=dtype)]
    got = T.global_norm(big, foreach)
    expected = torch.linalg.vector_norm(torch.cat([t.double() for t in big]))
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    many = [torch.ones(1, dtype=dtype) for _ in range(1000)]
    got = T.global_norm(many, foreach)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(1000**0.5, rel=1e-6)
    # with a float64 tensor in the list the whole norm is float64
    mixed = T.global_norm([big[0], torch.ones(2, dtype=torch.float64)], foreach)
    assert mixed.dtype == torch.float64
    value = float(big[0][0])  # 40000 in float16, 39936 in bfloat16
    assert float(mixed) == pytest.approx((4 * value**2 + 2) ** 0.5, rel=1e-12)


@pytest.mark.parametrize(
    "sizes,limit", [([3, 4, 5, 100, 2, 2], 8), ([1] * 10, 3), ([50], 8), ([], 4)]
)
def test_slices_cover_the_list_in_order_within_the_limit(sizes, limit):
    from samkit.optim._tensors import slices

    tensors = [torch.zeros(n) for n in sizes]
    runs = slices(tensors, limit)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    for run in runs:
        assert len(run) == 1 or sum(sizes[i] for i in run) <= limit
    # as few runs as the greedy cut allows: a run ends only when the next tensor overflows
    for a, b in zip(runs, runs[1:]):
        assert sum(sizes[i] for i in a) + sizes[b[0]] > limit


def test_where_keeps_targets_when_false_even_against_nan():
    from samkit.optim._tensors import where_

    t = [torch.ones(3), torch.zeros(2)]
    bad = [torch.full((3,), float("nan")), torch.full((2,), float("inf"))]
    where_(t, torch.tensor(False), bad)
    assert torch.equal(t[0], torch.ones(3)) and torch.equal(t[1], torch.zeros(2))
    where_(t, torch.tensor(True), [torch.full((3,), 2.0), torch.full((2,), 3.0)])
    assert torch.equal(t[0], torch.full((3,), 2.0)) and torch.equal(t[1], torch.full((2,), 3.0))
