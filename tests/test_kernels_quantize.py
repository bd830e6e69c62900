"""The per-row dynamic quantization op against its reference, on every instruction set."""

from __future__ import annotations

import pytest
import torch

from lightning_weightlight.kernels import ops, reference

ISAS = ["amx", "avx512", "avx2", "scalar"]
SHAPES = [(1, 1), (1, 384), (3, 17), (8, 63), (5, 0), (0, 7), (33, 1031), (128, 384)]


@pytest.fixture(params=ISAS)
def isa(request):
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa("auto")


def test_extension_loaded():
    assert ops.has_cpp(), "the compiled extension did not load; the tests would only check the reference"


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_per_row_matches_reference(isa, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator) * 4.0
    q, scale, zero_point = ops.quantize_per_row(x)
    q_ref, scale_ref, zp_ref = reference.quantize_per_row(x)
    assert q.dtype == torch.uint8
    assert scale.dtype == torch.float32
    assert zero_point.dtype == torch.int32
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(zero_point, zp_ref)


@pytest.mark.parametrize(
    "row",
    [
        [0.0, 0.0, 0.0],  # empty range: scale 1, zero point 0
        [1.0, 2.0, 3.0],  # positive only: the range is widened to include 0
        [-5.0, -1.0, -0.5],  # negative only: zero point 255
        [-1.0, 0.0, 3.0],
        [0.5, 1.5, 2.5, -0.5],  # ties round to even
        [1e-30, -1e-30, 0.0],
        [3.4e38, -3.4e38, 1.0],  # the range overflows float32: scale NaN
    ],
)
def test_quantize_per_row_edge_rows(isa, row):
    x = torch.tensor([row], dtype=torch.float32)
    for got, expected in zip(ops.quantize_per_row(x), reference.quantize_per_row(x)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("k", [3, 8, 37, 64, 100])
def test_quantize_per_row_non_finite_rows(isa, k):
    # min and max instructions drop NaN, and an infinity or a range beyond float32 makes the scale
    # infinite. The kernels must mark all these rows as the reference does (scale NaN, zero point
    # INT32_MIN, q = 0), wherever the value sits, so that their outputs are NaN.
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(k))
    x[0, 0] = float("nan")
    x[2, k - 1] = float("nan")
    x[3, k // 2] = float("inf")
    x[4, k // 2] = float("-inf")
    x[5, 0], x[5, k - 1] = 3e38, -3e38
    got = ops.quantize_per_row(x)
    expected = reference.quantize_per_row(x)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[2], expected[2])
    assert got[1].isnan().tolist() == [True, False, True, True, True, True, False]
    assert got[2][[0, 2, 3, 4]].tolist() == [-(2**31)] * 4
    assert int(got[0][[0, 2, 3, 4]].count_nonzero()) == 0


def test_quantize_per_row_values_by_hand():
    q, scale, zero_point = reference.quantize_per_row(torch.tensor([[-1.0, 0.0, 3.0]]))
    assert scale.item() == pytest.approx(4.0 / 255.0)
    assert zero_point.item() == 64  # round(1 / (4 / 255)) = round(63.75)
    assert q.tolist() == [[0, 64, 255]]


def test_quantize_per_row_dequantizes_within_half_step():
    x = torch.randn(16, 300, generator=torch.Generator().manual_seed(3))
    q, scale, zero_point = ops.quantize_per_row(x)
    restored = reference.dequantize_affine(q, scale[:, None], zero_point[:, None].float())
    assert torch.all((restored - x).abs() <= scale[:, None] / 2 + 1e-6)


def test_quantize_per_row_noncontiguous_input():
    x = torch.randn(40, 24, generator=torch.Generator().manual_seed(4)).t()
    assert not x.is_contiguous()
    for got, expected in zip(ops.quantize_per_row(x), reference.quantize_per_row(x.contiguous())):
        assert torch.equal(got, expected)


def test_quantize_per_row_thread_count_independent():
    x = torch.randn(257, 129, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.quantize_per_row(x)
        torch.set_num_threads(2)
        double = ops.quantize_per_row(x)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double):
        assert torch.equal(a, b)


def test_quantize_per_row_rejects_bad_input():
    with pytest.raises(RuntimeError, match="2-D"):
        ops.quantize_per_row(torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32"):
        ops.quantize_per_row(torch.zeros(2, 3, dtype=torch.float64))


def test_quantize_per_row_opcheck():
    samples = [torch.randn(4, 9), torch.randn(1, 64), torch.randn(3, 0)]
    for x in samples:
        torch.library.opcheck(torch.ops.weightlight.quantize_per_row.default, (x,))


def test_quantize_per_row_in_compiled_graph():
    def fn(x):
        q, scale, zero_point = ops.quantize_per_row(x)
        return q, scale, zero_point

    x = torch.randn(6, 20)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x), reference.quantize_per_row(x)):
        assert torch.equal(got, expected)


def test_set_isa_rejects_unknown_name():
    with pytest.raises(ValueError, match="set_isa"):
        ops.set_isa("sse9")


def test_quantize_per_row_quotients_near_half_integers(isa):
    # Values at and one or two float32 steps around (n + 0.5) * scale put x / scale next to a
    # rounding boundary, where a quotient from the reciprocal could round the other way.
    generator = torch.Generator().manual_seed(7)
    rows, k = 16, 301
    magnitude = 10 ** (torch.rand(rows, 1, generator=generator) * 12 - 6)
    x = (torch.rand(rows, k, generator=generator) * 2 - 1) * magnitude
    x[:, 0], x[:, 1] = -magnitude[:, 0], magnitude[:, 0]
    _, scale, _ = reference.quantize_per_row(x)
    halves = (torch.randint(-120, 120, (rows, k), generator=generator).float() + 0.5) * scale[:, None]
    steps = torch.randint(-2, 3, (rows, k), generator=generator)
    for _ in range(2):
        up, down = steps > 0, steps < 0
        halves = torch.where(up, torch.nextafter(halves, torch.tensor(float("inf"))), halves)
        halves = torch.where(down, torch.nextafter(halves, torch.tensor(float("-inf"))), halves)
        steps = steps - up.int() + down.int()
    x[:, 2:] = halves[:, 2:]
    for got, expected in zip(ops.quantize_per_row(x), reference.quantize_per_row(x)):
        assert torch.equal(got, expected)
