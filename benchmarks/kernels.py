"""Time the deploy modules against PyTorch's CPU paths, through the module call as users run it.

Every number in a row is measured in the same run, with the candidates taking turns, and the
ratios are ``torch time / our time`` (above 1 means ours is faster). Times are the fastest of
several interleaved samples after a warm-up, with the weights hot in cache.

    python benchmarks/kernels.py            # the full grid, 1 and 2 threads (about 10 minutes)
    python benchmarks/kernels.py --quick    # two shapes, three batch sizes, 90% sparsity
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch
from torch import nn

from lightning_weightlight.kernels import Int8Linear, SparseInt8Linear, SparseLinear, active_isa

SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]
BATCH_ROWS = [1, 8, 32, 128, 512]
SPARSITIES = [0.5, 0.7, 0.9, 0.95]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``cpu`` counts the CPU time of this process (all its threads), which load from other processes
on a shared machine does not inflate; with several threads it is the sum over threads."""
clock = time.perf_counter


def time_us(candidates: dict, x: torch.Tensor, budget_s: float, rounds: int = 5) -> dict[str, float]:
    """Microseconds per call of each candidate: the fastest of ``rounds`` interleaved samples.

    The candidates take turns, one sample each per round, so that load from other processes on
    a shared machine falls on all of them alike; the minimum discards samples that were slowed.
    """
    best = {}
    calls = {}
    slow = set()
    with torch.inference_mode():
        for name, fn in candidates.items():
            start = clock()
            fn(x)
            first = max(clock() - start, 1e-9)
            if first > budget_s:
                # Slower than the whole budget (torch._int_mm without AVX-512 VNNI takes seconds
                # at M = 128): this first call is the only sample.
                slow.add(name)
                best[name] = first
                continue
            start = clock()
            fn(x)
            once = max(clock() - start, 1e-9)
            calls[name] = max(1, min(1000, int(budget_s / rounds / once)))
            best[name] = float("inf")
        for _ in range(rounds):
            for name, fn in candidates.items():
                if name in slow:
                    continue
                start = clock()
                for _ in range(calls[name]):
                    fn(x)
                best[name] = min(best[name], (clock() - start) / calls[name])
    return {name: seconds * 1e6 for name, seconds in best.items()}


def pruned(weight: torch.Tensor, sparsity: float, block: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a random ``sparsity`` fraction of ``weight`` in blocks of ``block`` consecutive inputs."""
    n, k = weight.shape
    keep = torch.rand(n, k // block, generator=generator) >= sparsity
    return weight * keep.repeat_interleave(block, dim=1)


def linear_with(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


class OneDnnLinear(nn.Module):
    """fp32 Linear through ``torch.ops.mkldnn._linear_pointwise`` with a prepacked weight."""

    def __init__(self, layer: nn.Linear, batch_rows: int) -> None:
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), batch_rows)
        self.bias = layer.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class CsrLinear(nn.Module):
    """A CSR weight with ``torch.sparse.addmm``: ``(W @ x.T + b).T``."""

    def __init__(self, layer: nn.Linear, index_dtype: torch.dtype) -> None:
        super().__init__()
        csr = layer.weight.detach().to_sparse_csr()
        self.weight = torch.sparse_csr_tensor(
            csr.crow_indices().to(index_dtype), csr.col_indices().to(index_dtype), csr.values(), csr.shape
        )
        self.bias = layer.bias.detach()[:, None]

    def forward(self, x):
        return torch.sparse.addmm(self.bias, self.weight, x.t()).t()


class IntMm(nn.Module):
    """``torch._int_mm`` on int8 operands that are already quantized: the raw int8 GEMM alone."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight_t = torch.randint(-128, 128, layer.weight.shape, dtype=torch.int8).t().contiguous()

    def forward(self, x):
        return torch._int_mm(x, self.weight_t)


def quantize_dynamic(layer: nn.Linear) -> nn.Module:
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)


def fmt(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def ratio(baseline: float, ours: float) -> str:
    return f"{baseline / ours:.2f}"


def run(shapes, batch_rows, sparsities, threads, budget_s) -> list[str]:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    dense_rows = [
        "| shape (N, K) | M | F.linear | oneDNN | dense fp32 | quantize_dynamic | _int_mm (raw) "
        "| Int8Linear | x dense | x quantize_dynamic | x _int_mm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sparse_rows = [
        "| shape (N, K) | M | sparsity | dense fp32 | best torch int8 | CSR int32 | CSR int64 "
        "| SparseLinear | x dense | x best CSR | SparseInt8 1x4 | x dense | x torch int8 "
        "| SparseInt8 unstr. | x SparseLinear |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, k in shapes:
        weight = torch.randn(n, k, generator=generator) / k**0.5
        bias = torch.randn(n, generator=generator)
        layer = linear_with(weight, bias)
        qdyn = quantize_dynamic(linear_with(weight, bias))
        int8 = Int8Linear.from_float(layer)
        int_mm = IntMm(layer)
        pruned_modules = {}
        for sparsity in sparsities:
            unstructured = linear_with(pruned(weight, sparsity, 1, generator), bias)
            blocks = linear_with(pruned(weight, sparsity, 4, generator), bias)
            pruned_modules[sparsity] = {
                "csr32": CsrLinear(unstructured, torch.int32),
                "csr64": CsrLinear(unstructured, torch.int64),
                "sparse": SparseLinear.from_dense(unstructured),
                "sparse_int8_1x4": SparseInt8Linear.from_float(blocks),
                "sparse_int8_unstructured": SparseInt8Linear.from_float(unstructured),
            }
        for m in batch_rows:
            x = torch.randn(m, k, generator=generator)
            x_int8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=generator)
            dense = time_us(
                {"linear": layer, "onednn": OneDnnLinear(layer, m), "qdyn": qdyn, "int8": int8}, x, budget_s
            )
            t_linear, t_onednn, t_qdyn, t_int8 = (
                dense["linear"],
                dense["onednn"],
                dense["qdyn"],
                dense["int8"],
            )
            t_int_mm = time_us({"int_mm": int_mm}, x_int8, budget_s)["int_mm"]
            t_dense = min(t_linear, t_onednn)
            dense_rows.append(
                f"| ({n}, {k}) | {m} | {fmt(t_linear)} | {fmt(t_onednn)} | {fmt(t_dense)} | {fmt(t_qdyn)} "
                f"| {fmt(t_int_mm)} | {fmt(t_int8)} | {ratio(t_dense, t_int8)} | {ratio(t_qdyn, t_int8)} "
                f"| {ratio(t_int_mm, t_int8)} |"
            )
            print(dense_rows[-1], flush=True)
            for sparsity, modules in pruned_modules.items():
                t = time_us(modules, x, budget_s)
                t_csr = min(t["csr32"], t["csr64"])
                # quantize_dynamic is torch's int8 Linear; _int_mm leaves out the quantization.
                t_torch_int8 = t_qdyn
                t_sparse, t_1x4, t_unstructured = (
                    t["sparse"],
                    t["sparse_int8_1x4"],
                    t["sparse_int8_unstructured"],
                )
                sparse_rows.append(
                    f"| ({n}, {k}) | {m} | {sparsity:.0%} | {fmt(t_dense)} | {fmt(t_torch_int8)} "
                    f"| {fmt(t['csr32'])} | {fmt(t['csr64'])} | {fmt(t_sparse)} | {ratio(t_dense, t_sparse)} "
                    f"| {ratio(t_csr, t_sparse)} | {fmt(t_1x4)} | {ratio(t_dense, t_1x4)} "
                    f"| {ratio(t_torch_int8, t_1x4)} | {fmt(t_unstructured)} "
                    f"| {ratio(t_sparse, t_unstructured)} |"
                )
                print(sparse_rows[-1], flush=True)
    title = f"### {threads} thread{'s' if threads > 1 else ''}"
    sparse_title = (
        "Pruned weights (unstructured for SparseLinear and CSR; 1x4 blocks or unstructured for SparseInt8):"
    )
    return [title, "", "Dense weights:", "", *dense_rows, "", sparse_title, "", *sparse_rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="two shapes, M in {1, 8, 128}, 90%% sparsity, 1 thread"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 2)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per candidate and row")
    parser.add_argument("--output", help="also write the Markdown tables to this file")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall-clock time, or CPU time of this process for a machine shared with other jobs",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]

    if args.quick:
        shapes, batch_rows, sparsities, threads = [(384, 384), (4096, 4096)], [1, 8, 128], [0.9], [1]
    else:
        shapes, batch_rows, sparsities, threads = SHAPES, BATCH_ROWS, SPARSITIES, [1, 2]
    threads = args.threads or threads
    header = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, ISA {active_isa()}.",
        f"Times in microseconds per module call ({args.clock} clock, fastest of 5 interleaved samples); "
        "ratios are torch / ours.",
        "",
    ]
    print("\n".join(header), flush=True)
    lines = list(header)
    for count in threads:
        lines += run(shapes, batch_rows, sparsities, count, args.budget)
    if args.output:
        with open(args.output, "w") as file:
            file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
