"""The int8 GEMM op (dynamic and static activations) against its reference, on every instruction set.

Tolerances: integer accumulators are compared exactly (unit scales make the float output equal
to the accumulator); float outputs within atol = rtol = 1e-5, the float32 rounding of the
dequantization step (a fused multiply-add may round once where the reference rounds twice).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lightning_weightlight.kernels import ops, packing, reference

# "amx" runs the AVX-512 code on a CPU without AMX tiles (set_isa caps at the best supported set).
ISAS = ["amx", "avx512", "avx2", "scalar"]
# (M, K, N): odd sizes, K not a multiple of 4 or 64, M = 1, more rows than one tile, empty sizes,
# several row panels and K slabs of the cache-blocked AVX-512 kernel (M = 200, K = 2100), and for
# the AMX tiles: one 64-input step with a partial row tile (17, 64, 33), a K tail after the tile
# steps with a second row tile of 8 rows (40, 1031, 50), and whole 32 x 32 tiles (128, 384, 384).
SHAPES = [
    (1, 1, 1),
    (1, 7, 5),
    (3, 64, 17),
    (1, 384, 384),
    (9, 131, 40),
    (37, 33, 70),
    (0, 5, 3),
    (4, 0, 3),
    (200, 2100, 70),
    (17, 64, 33),
    (40, 1031, 50),
    (128, 384, 384),
]
FLOAT_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(params=ISAS)
def isa(request):
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa("auto")


def make_layer(n, k, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator)
    q_w, w_scale = reference.quantize_weight_per_channel(weight)
    bias = torch.randn(n, generator=generator)
    return q_w, w_scale, bias


def test_extension_loaded():
    assert ops.has_cpp(), "the compiled extension did not load; the tests would only check the reference"


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_linear_dynamic_matches_reference(isa, shape):
    m, k, n = shape
    q_w, w_scale, bias = make_layer(n, k, seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 3.0
    packed = packing.pack_int8_weight(q_w)
    out = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias)
    expected = reference.dynamic_int8_linear(x, q_w, w_scale, bias)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, expected, **FLOAT_TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_linear_static_matches_reference(isa, shape):
    m, k, n = shape
    q_w, w_scale, bias = make_layer(n, k, seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 3.0
    x_scale, x_zero_point = torch.tensor(0.03), torch.tensor(121, dtype=torch.int32)
    packed = packing.pack_int8_weight(q_w)
    out = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias, x_scale, x_zero_point)
    expected = reference.static_int8_linear(x, q_w, w_scale, x_scale, x_zero_point, bias)
    torch.testing.assert_close(out, expected, **FLOAT_TOL)


@pytest.mark.parametrize(
    "scale_dtype, zero_point_dtype",
    [(torch.float64, torch.int64), (torch.float16, torch.float32), (torch.float32, torch.uint8)],
)
def test_int8_linear_static_scalars_of_any_dtype(scale_dtype, zero_point_dtype):
    # float32 scales and int32 zero points are read directly; other dtypes are converted first.
    q_w, w_scale, bias = make_layer(9, 20, seed=11)
    packed = packing.pack_int8_weight(q_w)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    static = (torch.tensor(0.03125), torch.tensor(121, dtype=torch.int32))
    expected = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias, *static)
    x_scale = torch.tensor([0.03125], dtype=scale_dtype)
    x_zero_point = torch.tensor(121, dtype=zero_point_dtype)
    out = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias, x_scale, x_zero_point)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("zero_point", [0, 128, 255])
def test_int8_linear_integer_accumulators_exact(isa, zero_point):
    # With unit scales and integer inputs, the output is the int32 accumulator itself.
    generator = torch.Generator().manual_seed(zero_point)
    m, k, n = 5, 259, 33
    q_x = torch.randint(0, 256, (m, k), generator=generator, dtype=torch.uint8)
    q_w = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    packed = packing.pack_int8_weight(q_w)
    x = q_x.float() - zero_point
    out = ops.int8_linear(
        x, packed.packed, packed.sums, torch.ones(n), None, torch.tensor(1.0), torch.tensor(zero_point)
    )
    expected = reference.int8_linear_accumulators(q_x, torch.full((m,), zero_point), q_w)
    assert torch.equal(out, expected.float())


def test_int8_linear_extreme_values_exact(isa):
    # Every product at its extreme: 255 * -128 and 255 * 127 over a long row.
    k = 1031
    q_w = torch.cat([torch.full((1, k), -128), torch.full((1, k), 127)]).to(torch.int8)
    packed = packing.pack_int8_weight(q_w)
    x = torch.full((2, k), 255.0)
    x[1] = 0.0
    out = ops.int8_linear(
        x, packed.packed, packed.sums, torch.ones(2), None, torch.tensor(1.0), torch.tensor(0)
    )
    # The int32 accumulators are exact; the float32 output rounds them once.
    expected = torch.tensor([[255 * -128 * k, 255 * 127 * k], [0, 0]], dtype=torch.int32).float()
    assert torch.equal(out, expected)


def test_int8_linear_all_zero_weight(isa):
    q_w = torch.zeros(19, 45, dtype=torch.int8)
    packed = packing.pack_int8_weight(q_w)
    bias = torch.arange(19.0)
    out = ops.int8_linear(torch.randn(6, 45), packed.packed, packed.sums, torch.ones(19), bias)
    assert torch.equal(out, bias.expand(6, 19))


@pytest.mark.parametrize("rows", [1, 3, 6, 12, 40])
def test_dynamic_int8_modules_propagate_nan(isa, rows):
    # A row that contains NaN or an infinity gives NaN outputs. The other rows are unchanged.
    from torch import nn

    from lightning_weightlight.kernels import Int8Linear, SparseInt8Linear

    torch.manual_seed(rows)
    linear = nn.Linear(70, 24)
    x = torch.randn(rows, 70)
    bad = x.clone()
    bad[0, 5] = float("nan")
    bad[-1, 69] = float("-inf" if rows > 1 else "nan")
    for module in (Int8Linear.from_float(linear), SparseInt8Linear.from_float(linear)):
        clean, got = module(x), module(bad)
        assert bool(got[0].isnan().all())
        assert bool(got[-1].isnan().all())
        assert torch.equal(got[1:-1], clean[1:-1])


def test_int8_linear_leading_dims_and_layouts():
    q_w, w_scale, bias = make_layer(24, 40, seed=3)
    packed = packing.pack_int8_weight(q_w)
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(4))
    out = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias)
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(
        out, reference.int8_linear(x, packed.packed, packed.sums, w_scale, bias), **FLOAT_TOL
    )

    transposed = torch.randn(40, 7).t()
    assert not transposed.is_contiguous()
    expected = reference.dynamic_int8_linear(transposed.contiguous(), q_w, w_scale, bias)
    out = ops.int8_linear(transposed, packed.packed, packed.sums, w_scale, bias)
    torch.testing.assert_close(out, expected, **FLOAT_TOL)

    strided = torch.randn(7, 80)[:, ::2]
    out = ops.int8_linear(strided, packed.packed, packed.sums, w_scale, bias)
    expected = reference.dynamic_int8_linear(strided.contiguous(), q_w, w_scale, bias)
    torch.testing.assert_close(out, expected, **FLOAT_TOL)

    vector = torch.randn(40)
    out = ops.int8_linear(vector, packed.packed, packed.sums, w_scale, bias)
    assert out.shape == (24,)


def test_int8_linear_thread_count_independent():
    q_w, w_scale, bias = make_layer(200, 300, seed=5)
    packed = packing.pack_int8_weight(q_w)
    x = torch.randn(67, 300, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias)
        torch.set_num_threads(2)
        double = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)


def test_int8_ops_from_several_python_threads():
    # Small calls quantize into a buffer of the calling thread: calls from four threads at once,
    # mixed with calls too large for the buffer, give the bits of the same calls in turn.
    q_w, w_scale, bias = make_layer(40, 384, seed=16)
    packed = packing.pack_int8_weight(q_w)
    sparse, sums = packing.pack_sparse_int8_weight(q_w)
    inputs = [torch.randn(m, 384, generator=torch.Generator().manual_seed(m)) for m in (1, 2, 7, 200)]

    def run(x):
        return (
            ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias),
            ops.sparse_int8_linear(x, *sparse, sums, w_scale, bias),
        )

    expected = [run(x) for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: run(inputs[i % 4]), range(200)))
    for i, (dense, sparse_out) in enumerate(results):
        assert torch.equal(dense, expected[i % 4][0])
        assert torch.equal(sparse_out, expected[i % 4][1])


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="this CPU has no AVX2")
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("shape", [(1, 70, 37), (2, 70, 37), (5, 1031, 33), (9, 64, 40), (128, 384, 50)])
def test_int8_linear_avx2_equals_scalar(shape, static):
    # The AVX2 epilogue multiplies and then adds, as the scalar one does, so the outputs are equal.
    m, k, n = shape
    q_w, w_scale, bias = make_layer(n, k, seed=k)
    packed = packing.pack_int8_weight(q_w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3.0
    quantization = (torch.tensor(0.05), torch.tensor(120, dtype=torch.int32)) if static else (None, None)
    outputs = []
    try:
        for isa in ("scalar", "avx2"):
            ops.set_isa(isa)
            outputs.append(ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias, *quantization))
    finally:
        ops.set_isa("auto")
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.skipif("amx_int8" not in cpu_flags(), reason="this CPU has no AMX int8 tiles")
def test_amx_path_matches_avx512_path():
    assert ops.set_isa("auto") == "amx"
    q_w, w_scale, bias = make_layer(200, 1031, seed=3)
    packed = packing.pack_int8_weight(q_w)
    x = torch.randn(97, 1031, generator=torch.Generator().manual_seed(4)) * 2.0
    try:
        with_tiles = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias)
        assert ops.set_isa("avx512") == "avx512"
        without_tiles = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias)
    finally:
        ops.set_isa("auto")
    # The integer sums are exact on both paths, so the float outputs are identical.
    assert torch.equal(with_tiles, without_tiles)


def test_int8_linear_rejects_bad_arguments():
    q_w, w_scale, bias = make_layer(8, 12, seed=7)
    packed = packing.pack_int8_weight(q_w)
    with pytest.raises(RuntimeError, match="last dimension is K = 20"):
        ops.int8_linear(torch.randn(2, 20), packed.packed, packed.sums, w_scale, bias)
    with pytest.raises(
        RuntimeError, match=r"expected a float32 input, but got Double; convert it with \.float\(\)"
    ):
        ops.int8_linear(torch.randn(2, 12).double(), packed.packed, packed.sums, w_scale, bias)
    # The operator itself rejects names that the Python set_isa rejects first.
    for name in ("", "bogus"):
        with pytest.raises(RuntimeError, match=f"set_isa: expected one of .*, but got '{name}'"):
            torch.ops.weightlight.set_isa(name)
    with pytest.raises(RuntimeError, match="bias"):
        ops.int8_linear(torch.randn(2, 12), packed.packed, packed.sums, w_scale, torch.zeros(3))
    with pytest.raises(RuntimeError, match="both"):
        ops.int8_linear(torch.randn(2, 12), packed.packed, packed.sums, w_scale, bias, torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="x_zero_point"):
        ops.int8_linear(
            torch.randn(2, 12),
            packed.packed,
            packed.sums,
            w_scale,
            bias,
            torch.tensor(0.1),
            torch.tensor(300),
        )


def test_pack_int8_weight_round_trip():
    q_w = torch.randint(-128, 128, (21, 13), dtype=torch.int8)
    packed = packing.pack_int8_weight(q_w)
    assert packed.packed.shape == (2, 4, 16, 4)
    assert torch.equal(packing.unpack_int8_weight(packed.packed, 21, 13), q_w)
    assert torch.equal(packed.sums, q_w.sum(dim=1, dtype=torch.int32))


def test_int8_linear_opcheck():
    q_w, w_scale, bias = make_layer(10, 19, seed=8)
    packed = packing.pack_int8_weight(q_w)
    op = torch.ops.weightlight.int8_linear.default
    samples = [
        (torch.randn(3, 19), packed.packed, packed.sums, w_scale, bias),
        (torch.randn(2, 4, 19), packed.packed, packed.sums, w_scale, None),
        (torch.randn(1, 19), packed.packed, packed.sums, w_scale, bias, torch.tensor(0.05), torch.tensor(7)),
    ]
    for args in samples:
        torch.library.opcheck(op, args)
