"""Sana and SanaVideo for the zoo (tests/zoo.py): ReLU linear attention, (V K^T) Q with no
softmax, and a convolutional GLU feed-forward (GLUMBConv; SanaVideo adds a temporal conv).
Each builder imports its helpers from zoo at call time, as tests/zoo_video.py does."""

from __future__ import annotations

import torch

HEAD_DIM = 16
CAPTION_DIM = 24
SITES = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")]


def _config() -> dict:
    """What the image and video models share: 2 blocks, hidden 32, 2 cross-attention heads."""
    from zoo import LATENT_CH, SAMPLE

    return dict(in_channels=LATENT_CH, out_channels=LATENT_CH, num_attention_heads=2,
                attention_head_dim=HEAD_DIM, num_layers=2, num_cross_attention_heads=2,
                cross_attention_head_dim=HEAD_DIM, cross_attention_dim=32,
                caption_channels=CAPTION_DIM, mlp_ratio=2.0, sample_size=SAMPLE)


def build_sana(batch: int):
    from diffusers import SanaTransformer2DModel
    from zoo import LATENT_CH, SAMPLE, TEXT_LEN, Case, _finish, _gen, _randn, _timesteps
    from zoo_video import _text_mask

    torch.manual_seed(0)
    model = _finish(SanaTransformer2DModel(**_config(), patch_size=2))

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        return (), {
            "hidden_states": _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE),
            "encoder_hidden_states": _randn(g, batch, TEXT_LEN, CAPTION_DIM),
            "encoder_attention_mask": _text_mask(batch),
            "timestep": _timesteps(step, batch),
        }

    return Case("sana", model, inputs, list(SITES))


def build_sana_video(batch: int):
    from diffusers import SanaVideoTransformer3DModel
    from zoo import Case, _finish
    from zoo_video import video_inputs

    torch.manual_seed(0)
    model = _finish(SanaVideoTransformer3DModel(**_config(), patch_size=(1, 2, 2),
                                                rope_max_seq_len=32))
    return Case("sana_video", model, video_inputs(batch, CAPTION_DIM, mask=True), list(SITES))


__all__ = ["build_sana", "build_sana_video"]
