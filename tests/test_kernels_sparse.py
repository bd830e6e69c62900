"""The sparse fp32 and sparse int8 GEMM ops against their references, on every instruction set.

Tolerances: sparse fp32 against a float64 reference within rtol = 1e-5 and atol = 1e-5 (float32
accumulation over at most a few hundred products of unit-scale values); sparse int8 integer
accumulators exactly, float outputs within atol = rtol = 1e-5 as for the int8 GEMM.
"""

from __future__ import annotations

import pytest
import torch

from lightning_weightlight.kernels import ops, packing, reference

# "avx512-gathers" and "avx512-loads" run the AVX-512 kernels for one token both ways (set_gathers);
# a CPU without AVX-512 runs its best set under both names.
ISAS = ["avx512-gathers", "avx512-loads", "avx2", "scalar"]
BLOCKS = list(packing.BLOCK_SHAPES)
# (M, K, N): odd sizes, K not a multiple of 4 or 64, and every kernel's batch range: M = 1
# (gathers and loads by index), 2 to 4 and 5 to 8 (two nonzeros or groups per vector; AVX2 splits
# the range at 4), 9 to 16, and more (32-token chunks, several of them at M = 70).
SHAPES = [
    (1, 7, 5),
    (1, 384, 96),
    (1, 131, 40),
    (2, 33, 17),
    (4, 7, 5),
    (5, 70, 33),
    (9, 131, 40),
    (37, 70, 33),
    (0, 5, 3),
    (8, 65, 23),
    (70, 131, 40),
]
FLOAT_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(params=ISAS)
def isa(request):
    name, _, reads = request.param.partition("-")
    ops.set_isa(name)
    ops.set_gathers("on" if reads == "gathers" else "off")
    yield request.param
    ops.set_isa("auto")
    ops.set_gathers("auto")


def test_set_gathers_default_by_vendor():
    with open("/proc/cpuinfo") as cpuinfo:
        intel = "GenuineIntel" in cpuinfo.read()
    try:
        assert ops.set_gathers("off") == "off"
        assert ops.set_gathers("on") == "on"
        assert ops.set_gathers("auto") == ("on" if intel else "off")
    finally:
        ops.set_gathers("auto")
    with pytest.raises(ValueError, match=r"set_gathers: expected one of .*, but got 'fast'"):
        ops.set_gathers("fast")


def pruned_weight(n, k, sparsity, block, seed):
    """Zero whole blocks of a random weight with probability ``sparsity``; also empty row 0."""
    generator = torch.Generator().manual_seed(seed)
    r, c = packing.BLOCK_SHAPES[block]
    weight = torch.randn(n, k, generator=generator)
    keep = torch.rand(-(-n // r), -(-k // c), generator=generator) >= sparsity
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:n, :k]
    weight = weight * mask
    weight[0] = 0.0
    return weight


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_linear_matches_reference(isa, block, shape):
    m, k, n = shape
    weight = pruned_weight(n, k, 0.7, block, seed=m + k + n)
    sparse = packing.pack_sparse_weight(weight, packing.BLOCK_SHAPES[block])
    bias = torch.randn(n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    out = ops.sparse_linear(x, *sparse, bias, n)
    assert out.shape == (m, n)
    torch.testing.assert_close(out, reference.sparse_linear(x, *sparse, bias, n), **FLOAT_TOL)
    torch.testing.assert_close(out, (x.double() @ weight.double().t() + bias).float(), **FLOAT_TOL)


@pytest.mark.parametrize("block", ["unstructured", "8x1"])
def test_sparse_linear_error_relative_to_abs_sum(isa, block):
    # docs/kernels.md: at K = 4096 the error stays below 4e-7 of x.abs() @ weight.abs().T.
    generator = torch.Generator().manual_seed(25)
    weight = torch.randn(64, 4096, generator=generator) * (torch.rand(64, 4096, generator=generator) < 0.5)
    x = torch.randn(16, 4096, generator=generator)
    sparse = packing.pack_sparse_weight(weight, packing.BLOCK_SHAPES[block])
    out = ops.sparse_linear(x, *sparse, None, 64).double()
    exact = x.double() @ weight.double().t()
    scale = x.double().abs() @ weight.double().abs().t()
    assert float(((out - exact).abs() / scale).max()) < 4e-7


@pytest.mark.parametrize("block", BLOCKS)
def test_pack_sparse_weight_round_trip(block):
    weight = pruned_weight(35, 50, 0.6, block, seed=2)
    sparse = packing.pack_sparse_weight(weight, packing.BLOCK_SHAPES[block])
    assert torch.equal(packing.unpack_sparse_weight(sparse, 35, 50), weight)
    r, c = packing.BLOCK_SHAPES[block]
    assert sparse.values.shape[1:] == (c, r)
    assert sparse.row_ptr.shape == (-(-35 // r) + 1,)


def test_pack_sparse_weight_wide_indices_round_trip():
    # Column indices above 32767 are stored in int16 with the same bits.
    weight = torch.zeros(2, 40000)
    weight[0, 39999] = 1.5
    weight[1, 5] = -2.0
    sparse = packing.pack_sparse_weight(weight)
    assert torch.equal(packing.unpack_sparse_weight(sparse, 2, 40000), weight)
    x = torch.randn(3, 40000)
    out = ops.sparse_linear(x, *sparse, None, 2)
    torch.testing.assert_close(out, torch.stack([1.5 * x[:, 39999], -2.0 * x[:, 5]], dim=1))


def test_sparse_linear_all_zero_weight(isa):
    weight = torch.zeros(13, 21)
    sparse = packing.pack_sparse_weight(weight)
    assert sparse.values.numel() == 0
    bias = torch.randn(13)
    out = ops.sparse_linear(torch.randn(5, 21), *sparse, bias, 13)
    assert torch.equal(out, bias.expand(5, 13))


def test_sparse_linear_layouts():
    weight = pruned_weight(24, 40, 0.8, "unstructured", seed=3)
    sparse = packing.pack_sparse_weight(weight)
    transposed = torch.randn(40, 6).t()
    expected = reference.sparse_linear(transposed.contiguous(), *sparse, None, 24)
    torch.testing.assert_close(ops.sparse_linear(transposed, *sparse, None, 24), expected, **FLOAT_TOL)
    batched = torch.randn(2, 3, 40)
    out = ops.sparse_linear(batched, *sparse, None, 24)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, reference.sparse_linear(batched, *sparse, None, 24), **FLOAT_TOL)


def row_lengths_weight(n, k, seed, unit=1):
    """Row r keeps r % (k // unit + 1) random units of `unit` inputs: every row length from empty."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.zeros(n, k)
    for row in range(n):
        units = torch.randperm(k // unit, generator=generator)[: row % (k // unit + 1)]
        columns = (units[:, None] * unit + torch.arange(unit)).flatten()
        weight[row, columns] = torch.randn(columns.numel(), generator=generator)
    return weight


@pytest.mark.parametrize("block", ["unstructured", "1x4"])
def test_sparse_one_token_row_lengths(isa, block):
    # Rows of 0 to 40 nonzeros (or 1x4 blocks) cover the one-token kernels' masked last step, and
    # 45 rows end in a part of a batch of 8 rows.
    unit = packing.BLOCK_SHAPES[block][1]
    weight = row_lengths_weight(45, 40 * unit, seed=20, unit=unit)
    sparse = packing.pack_sparse_weight(weight, packing.BLOCK_SHAPES[block])
    bias = torch.randn(45)
    x = torch.randn(1, 40 * unit, generator=torch.Generator().manual_seed(21))
    out = ops.sparse_linear(x, *sparse, bias, 45)
    torch.testing.assert_close(out, (x.double() @ weight.double().t() + bias).float(), **FLOAT_TOL)
    assert torch.equal(out[0, 0], bias[0])


def test_one_token_padding_keeps_infinity(isa):
    # Row r has r + 1 weights of 1 and its last input is +inf: the lanes past the row must not turn
    # the result into NaN (0 * inf) whatever the row length.
    n, k = 20, 24
    weight = (torch.arange(k)[None, :] <= torch.arange(n)[:, None]).float()
    sparse = packing.pack_sparse_weight(weight)
    for row in range(n):
        x = torch.ones(1, k)
        x[0, row] = float("inf")
        out = ops.sparse_linear(x, *sparse, None, n)
        assert torch.isposinf(out[0, row:]).all(), (row, out)
        assert torch.equal(out[0, :row], torch.arange(1, row + 1, dtype=torch.float32))


@pytest.mark.parametrize("block", ["unstructured", "4x1"])
def test_sparse_linear_thread_count_independent(isa, block):
    weight = pruned_weight(300, 200, 0.8, block, seed=4)
    sparse = packing.pack_sparse_weight(weight, packing.BLOCK_SHAPES[block])
    for m in (1, 3, 8, 77):
        x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = ops.sparse_linear(x, *sparse, None, 300)
            torch.set_num_threads(2)
            double = ops.sparse_linear(x, *sparse, None, 300)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(single, double)


def test_sparse_linear_rejects_bad_format():
    weight = pruned_weight(8, 12, 0.5, "unstructured", seed=5)
    row_ptr, col_idx, values = packing.pack_sparse_weight(weight)
    x = torch.randn(2, 12)
    bad_idx = col_idx.clone()
    bad_idx[0] = 12
    with pytest.raises(
        RuntimeError, match="expected every index in col_idx to be below 12, but col_idx contains 12"
    ):
        ops.sparse_linear(x, row_ptr, bad_idx, values, None, 8)
    with pytest.raises(RuntimeError, match="row_ptr"):
        ops.sparse_linear(x, row_ptr[:-1], col_idx, values, None, 8)
    with pytest.raises(RuntimeError, match="block shape"):
        ops.sparse_linear(
            x, row_ptr, col_idx, values.reshape(-1, 1, 1).expand(-1, 2, 1).contiguous(), None, 8
        )


@pytest.mark.parametrize("rows", [0, 1, 3, 6, 12])
@pytest.mark.parametrize("bad_index", [12, 65535])
def test_sparse_linear_rejects_index_out_of_range(isa, rows, bad_index):
    # The AVX-512 and AVX2 kernels for 1 to 8 rows check the indices of each row themselves;
    # 12 rows and the scalar path scan them all before the kernel runs.
    weight = pruned_weight(8, 12, 0.5, "unstructured", seed=5)
    row_ptr, col_idx, values = packing.pack_sparse_weight(weight)
    bad_idx = col_idx.clone()
    bad_idx[-1] = bad_index - 65536 if bad_index > 32767 else bad_index
    # Every path names the buffer and the largest index, also when it equals the limit.
    message = f"expected every index in col_idx to be below 12, but col_idx contains {bad_index}"
    with pytest.raises(RuntimeError, match=message):
        ops.sparse_linear(torch.randn(rows, 12), row_ptr, bad_idx, values, None, 8)


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("bad_row", [0, 5, 17])
def test_long_rows_reject_bad_index(isa, bad_row, m):
    # Batches of rows with more than 8192 indices are checked row by row as they are read.
    weight = torch.randn(18, 3000)
    weight[:, ::2] = 0.0  # 1500 nonzeros, and 375 or more groups of 4, per row
    row_ptr, col_idx, values = packing.pack_sparse_weight(weight)
    bad_idx = col_idx.clone()
    bad_idx[row_ptr[bad_row] + 7] = 3000
    with pytest.raises(RuntimeError, match="col_idx to be below 3000, but col_idx contains 3000"):
        ops.sparse_linear(torch.randn(m, 3000), row_ptr, bad_idx, values, None, 18)
    q_w, w_scale = reference.quantize_weight_per_channel(weight)
    (row_ptr, group_idx, values), sums = packing.pack_sparse_int8_weight(q_w)
    bad_idx = group_idx.clone()
    bad_idx[row_ptr[bad_row] + 7] = 750
    with pytest.raises(RuntimeError, match="group_idx to be below 750, but group_idx contains 750"):
        ops.sparse_int8_linear(torch.randn(m, 3000), row_ptr, bad_idx, values, sums, w_scale)


@pytest.mark.parametrize("rows", [0, 1, 3, 6, 12])
@pytest.mark.parametrize("bad_index", [3, 65535])
def test_sparse_int8_linear_rejects_index_out_of_range(isa, rows, bad_index):
    _, w_scale, sparse, sums = sparse_int8_layer(8, 12, 0.5, "unstructured", seed=5)
    row_ptr, group_idx, values = sparse
    bad_idx = group_idx.clone()
    bad_idx[-1] = bad_index - 65536 if bad_index > 32767 else bad_index  # int16 stores 65535 as -1
    message = f"expected every index in group_idx to be below 3, but group_idx contains {bad_index}"
    with pytest.raises(RuntimeError, match=message):
        ops.sparse_int8_linear(torch.randn(rows, 12), row_ptr, bad_idx, values, sums, w_scale)


def test_sparse_linear_opcheck():
    weight = pruned_weight(10, 19, 0.6, "1x4", seed=6)
    sparse = packing.pack_sparse_weight(weight, (1, 4))
    op = torch.ops.weightlight.sparse_linear.default
    for x, bias in [
        (torch.randn(3, 19), torch.randn(10)),
        (torch.randn(1, 19), None),
        (torch.randn(2, 2, 19), None),
    ]:
        torch.library.opcheck(op, (x, *sparse, bias, 10))


# ---------------------------------------------------------------------------------------------
# Sparse int8


def sparse_int8_layer(n, k, sparsity, block, seed):
    weight = pruned_weight(n, k, sparsity, block, seed)
    q_w, w_scale = reference.quantize_weight_per_channel(weight)
    sparse, sums = packing.pack_sparse_int8_weight(q_w)
    return q_w, w_scale, sparse, sums


@pytest.mark.parametrize("block", ["unstructured", "1x4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_int8_linear_matches_reference(isa, block, shape):
    m, k, n = shape
    q_w, w_scale, sparse, sums = sparse_int8_layer(n, k, 0.7, block, seed=m + k + n)
    bias = torch.randn(n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)) * 2.0
    out = ops.sparse_int8_linear(x, *sparse, sums, w_scale, bias)
    torch.testing.assert_close(out, reference.dynamic_int8_linear(x, q_w, w_scale, bias), **FLOAT_TOL)
    static = (torch.tensor(0.02), torch.tensor(130, dtype=torch.int32))
    out = ops.sparse_int8_linear(x, *sparse, sums, w_scale, bias, *static)
    torch.testing.assert_close(out, reference.static_int8_linear(x, q_w, w_scale, *static, bias), **FLOAT_TOL)


@pytest.mark.parametrize("m", [1, 3, 5, 40])
def test_sparse_int8_linear_integer_accumulators_exact(isa, m):
    generator = torch.Generator().manual_seed(m)
    k, n, zero_point = 103, 29, 77
    q_x = torch.randint(0, 256, (m, k), generator=generator, dtype=torch.uint8)
    q_w = torch.randint(-128, 128, (n, k), generator=generator, dtype=torch.int8)
    q_w[torch.rand(n, k, generator=generator) < 0.8] = 0
    q_w[3] = 0
    q_w[4, :8] = torch.tensor([-128, 127, -128, 127, 127, 127, -128, -128], dtype=torch.int8)
    sparse, sums = packing.pack_sparse_int8_weight(q_w)
    x = q_x.float() - zero_point
    out = ops.sparse_int8_linear(
        x, *sparse, sums, torch.ones(n), None, torch.tensor(1.0), torch.tensor(zero_point)
    )
    expected = reference.int8_linear_accumulators(q_x, torch.full((m,), zero_point), q_w)
    assert torch.equal(out, expected.float())


@pytest.mark.parametrize("m", [1, 3, 8, 16, 40, 70])
def test_sparse_int8_linear_bits_equal_int8_linear(isa, m):
    # The same int8 weight gives the same bits sparse or dense, and as the reference: exact integer
    # sums, then a multiply and an add that the build never fuses into an FMA.
    q_w, w_scale, sparse, sums = sparse_int8_layer(50, 131, 0.7, "unstructured", seed=m)
    packed = packing.pack_int8_weight(q_w)
    bias = torch.randn(50, generator=torch.Generator().manual_seed(14))
    x = torch.randn(m, 131, generator=torch.Generator().manual_seed(15)) * 2.0
    static = (torch.tensor(0.02), torch.tensor(130, dtype=torch.int32))
    for quantization in [(), static]:
        out = ops.sparse_int8_linear(x, *sparse, sums, w_scale, bias, *quantization)
        dense = ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias, *quantization)
        if quantization:
            expected = reference.static_int8_linear(x, q_w, w_scale, *static, bias)
        else:
            expected = reference.dynamic_int8_linear(x, q_w, w_scale, bias)
        assert torch.equal(out, dense)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("block", ["unstructured", "1x4"])
def test_int8_one_token_row_lengths(isa, block):
    # Rows of 0 to 40 groups cover the one-token kernels' last step, and 45 rows end in a part
    # of a batch of 16 rows. The bits must equal those of the dense int8 GEMM.
    unit = 4 if block == "1x4" else 1
    weight = row_lengths_weight(45, 160, seed=22, unit=unit)
    q_w, w_scale = reference.quantize_weight_per_channel(weight)
    sparse, sums = packing.pack_sparse_int8_weight(q_w)
    packed = packing.pack_int8_weight(q_w)
    bias = torch.randn(45, generator=torch.Generator().manual_seed(23))
    x = torch.randn(1, 160, generator=torch.Generator().manual_seed(24))
    for quantization in [(), (torch.tensor(0.02), torch.tensor(130, dtype=torch.int32))]:
        out = ops.sparse_int8_linear(x, *sparse, sums, w_scale, bias, *quantization)
        assert torch.equal(out, ops.int8_linear(x, packed.packed, packed.sums, w_scale, bias, *quantization))


@pytest.mark.parametrize("block", ["unstructured", "1x4"])
def test_sparse_int8_same_with_gathers_off(block):
    # Exact integer sums: gathering the inputs or loading them one by one gives the same outputs.
    _, w_scale, sparse, sums = sparse_int8_layer(90, 301, 0.8, block, seed=12)
    x = torch.randn(1, 301, generator=torch.Generator().manual_seed(13))
    try:
        ops.set_gathers("on")
        gathered = ops.sparse_int8_linear(x, *sparse, sums, w_scale)
        ops.set_gathers("off")
        loaded = ops.sparse_int8_linear(x, *sparse, sums, w_scale)
    finally:
        ops.set_gathers("auto")
    assert torch.equal(gathered, loaded)


@pytest.mark.parametrize("m", [1, 3, 70])
def test_sparse_int8_linear_thread_count_independent(isa, m):
    _, w_scale, sparse, sums = sparse_int8_layer(150, 130, 0.9, "1x4", seed=8)
    x = torch.randn(m, 130, generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.sparse_int8_linear(x, *sparse, sums, w_scale)
        torch.set_num_threads(2)
        double = ops.sparse_int8_linear(x, *sparse, sums, w_scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, double)


def test_pack_sparse_int8_weight_keeps_zeros():
    q_w, _, sparse, sums = sparse_int8_layer(17, 30, 0.75, "unstructured", seed=10)
    restored = packing.unpack_sparse_int8_weight(sparse, 17, 30)
    assert torch.equal(restored, q_w)
    assert torch.equal(sums, q_w.sum(dim=1, dtype=torch.int32))
    groups_with_nonzero = torch.nn.functional.pad(q_w, (0, 2)).reshape(17, 8, 4).ne(0).any(dim=2).sum()
    assert sparse.values.shape == (int(groups_with_nonzero), 4)


def test_sparse_int8_linear_opcheck():
    _, w_scale, sparse, sums = sparse_int8_layer(10, 19, 0.6, "1x4", seed=11)
    op = torch.ops.weightlight.sparse_int8_linear.default
    samples = [
        (torch.randn(3, 19), *sparse, sums, w_scale, torch.randn(10)),
        (torch.randn(1, 19), *sparse, sums, w_scale, None, torch.tensor(0.1), torch.tensor(3)),
        (torch.randn(2, 3, 19), *sparse, sums, w_scale),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


def test_detect_pattern():
    assert packing.detect_pattern(torch.randn(16, 16)) == "dense"
    for block in ("16x16", "8x1", "4x1", "1x4"):
        assert packing.detect_pattern(pruned_weight(32, 64, 0.5, block, seed=12)) == block
    assert packing.detect_pattern(torch.randn(32, 64) * (torch.rand(32, 64) > 0.5)) == "unstructured"
