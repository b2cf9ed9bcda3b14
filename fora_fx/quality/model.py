"""The quality-evaluation model: a small class-conditional DiT for 8x8 sklearn digits.

Null class (classifier-free guidance), as found in diffusers 0.42.1:

* ``DiTTransformer2DModel`` gives every ``BasicTransformerBlock`` its own ``AdaLayerNormZero``,
  which builds ``CombinedTimestepLabelEmbeddings(num_embeds_ada_norm, dim)`` with the latter's
  default ``class_dropout_prob=0.1``; neither ``AdaLayerNormZero`` nor the DiT config exposes that
  argument. ``LabelEmbedding`` allocates ``num_classes + (dropout_prob > 0)`` rows, so with
  ``num_embeds_ada_norm=10`` every table has 11 rows and row 10 is the CFG "no label" embedding:
  label ``NULL_CLASS = 10`` is a valid input at inference (eval mode looks it up like any other
  label). Nothing needs patching to get the row; ``build_model`` asserts it is there.
* The catch is training: in train mode each ``LabelEmbedding`` drops labels by itself with
  ``torch.rand`` on the global RNG, independently per block -- and once more for the final
  layer, which re-runs block 0's embedding. A sample would be "unconditional" in some blocks and
  conditional in others. So ``build_model`` sets each ``LabelEmbedding.dropout_prob`` to 0 (a
  plain attribute, not config or weights; the table size was fixed at construction) and the
  trainer replaces labels by ``NULL_CLASS`` itself, once per sample, from its seeded generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from safetensors.torch import load_file

from .data import IMAGE_SIZE, NUM_CLASSES

NULL_CLASS = NUM_CLASSES  # 10: the classifier-free-guidance "no label" class

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH = WEIGHTS_DIR / "digits_dit.safetensors"

# 4 heads x 32 = 128 hidden, 5 layers, one token per pixel (see data.py for why patch_size=1).
# diffusers' DiT repeats the timestep/label embedder in every block, so it is ~354k params per
# block: 1.77M in all, 7.1 MB of fp32 weights.
MODEL_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,  # epsilon only, no learned sigma
    "num_layers": 5,
    "sample_size": IMAGE_SIZE,
    "patch_size": 1,
    "num_embeds_ada_norm": NUM_CLASSES,
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_zero",
}


def _label_embeddings(model: DiTTransformer2DModel) -> list[LabelEmbedding]:
    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def build_model() -> DiTTransformer2DModel:
    """A freshly initialised model (seed the global RNG first for a reproducible init).

    DiT's adaLN-Zero init (Peebles & Xie, sec. 3.2): every block's modulation Linear and the
    final layer's Linears start at zero, so each block starts as the identity and the model
    predicts eps = 0. Label dropout inside the embedders is switched off (see module docstring).
    """
    model = DiTTransformer2DModel(**MODEL_CONFIG)
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    tables = _label_embeddings(model)
    assert tables, "DiT built without label embeddings"
    for emb in tables:
        assert emb.embedding_table.num_embeddings == NULL_CLASS + 1, "no null-class row"
        emb.dropout_prob = 0.0
    return model


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_trained(path: str | Path | None = None) -> DiTTransformer2DModel:
    """The trained (EMA) weights in eval mode; default: the committed ``WEIGHTS_PATH``."""
    model = build_model()
    state = load_file(str(WEIGHTS_PATH if path is None else path))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
