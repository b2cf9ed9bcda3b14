"""Tiny random-weight video diffusion transformers from diffusers, for the zoo (tests/zoo.py).

Latents are 3 frames of 8x8 (4 channels), patchified 1x2x2: 48 video tokens, plus 6 text
tokens, one of which is masked out where the model takes a text mask. Each builder imports
its helpers from zoo at call time (zoo imports this module to register the cases).
"""

from __future__ import annotations

import torch

FRAMES = 3
TOKENS = FRAMES * 4 * 4  # frames x (8 / 2) x (8 / 2)
HEAD_DIM = 16


def _text_mask(batch: int) -> torch.Tensor:
    mask = torch.ones(batch, 6)
    mask[:, -1] = 0  # padding, as a tokenizer pads short prompts
    return mask


def video_inputs(batch: int, text_dim: int, mask: bool = False, **extra):
    """inputs(step, seed) for the usual call: [B, C, frames, H, W] latents, prompt tokens,
    one timestep per sample, the text mask if `mask`; `extra` values that are callables get
    the call's generator."""
    from zoo import LATENT_CH, SAMPLE, TEXT_LEN, _gen, _randn, _timesteps

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        kwargs = {
            "hidden_states": _randn(g, batch, LATENT_CH, FRAMES, SAMPLE, SAMPLE),
            "encoder_hidden_states": _randn(g, batch, TEXT_LEN, text_dim),
            "timestep": _timesteps(step, batch),
        }
        if mask:
            kwargs["encoder_attention_mask"] = _text_mask(batch)
        kwargs.update({k: v(g) if callable(v) else v for k, v in extra.items()})
        return (), kwargs

    return inputs


def build_wan(batch: int):
    """Wan 2.1 (self-attention with an empty_like rotary embedding, cross-attention, FFN)."""
    from diffusers import WanTransformer3DModel
    from zoo import LATENT_CH, Case, _finish

    text_dim = 24
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CH, out_channels=LATENT_CH, text_dim=text_dim, freq_dim=32,
        ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )
    model = _finish(model)
    sites = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ffn")]
    return Case("wan", model, video_inputs(batch, text_dim), sites)


def build_cogvideox(batch: int):
    """CogVideoX 1.5-style: joint text + video attention with rotary embeddings written into
    the image half of the query in place; one FFN over the joint stream."""
    from diffusers import CogVideoXTransformer3DModel
    from zoo import LATENT_CH, SAMPLE, TEXT_LEN, Case, _finish, _gen, _randn, _timesteps

    text_dim = 24
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=LATENT_CH,
        out_channels=LATENT_CH, time_embed_dim=16, text_embed_dim=text_dim, num_layers=2,
        sample_width=SAMPLE, sample_height=SAMPLE, sample_frames=4 * (FRAMES - 1) + 1,
        patch_size=2, max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True,
    )
    model = _finish(model)
    angles = torch.arange(TOKENS)[:, None] * torch.linspace(0.1, 1.0, HEAD_DIM)[None, :]
    rotary = (angles.cos(), angles.sin())  # what the pipeline computes once per video

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        return (), {
            "hidden_states": _randn(g, batch, FRAMES, LATENT_CH, SAMPLE, SAMPLE),
            "encoder_hidden_states": _randn(g, batch, TEXT_LEN, text_dim),
            "timestep": _timesteps(step, batch),
            "image_rotary_emb": rotary,
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]
    return Case("cogvideox", model, inputs, sites)


def build_ltx(batch: int):
    """LTX-Video: self-attention with rotary embeddings, masked cross-attention, FFN."""
    from diffusers import LTXVideoTransformer3DModel
    from zoo import TEXT_LEN, Case, _finish, _gen, _randn, _timesteps

    channels, caption_dim = 8, 24
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=channels, out_channels=channels, num_attention_heads=2,
        attention_head_dim=HEAD_DIM, cross_attention_dim=32, num_layers=2,
        caption_channels=caption_dim,
    )
    model = _finish(model)

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        return (), {
            "hidden_states": _randn(g, batch, TOKENS, channels),  # already patchified
            "encoder_hidden_states": _randn(g, batch, TEXT_LEN, caption_dim),
            "timestep": _timesteps(step, batch),
            "encoder_attention_mask": _text_mask(batch),
            "num_frames": FRAMES, "height": 4, "width": 4,
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")]
    return Case("ltx", model, inputs, sites)


def build_hunyuan_video(batch: int):
    """HunyuanVideo: a token-refiner block on the text, one dual-stream block (joint
    attention, two FFNs) and one single-stream parallel block, as in Flux."""
    from diffusers import HunyuanVideoTransformer3DModel
    from zoo import LATENT_CH, Case, _finish, _randn

    text_dim, pooled_dim = 24, 8
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=LATENT_CH, out_channels=LATENT_CH, num_attention_heads=2,
        attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1, num_refiner_layers=1,
        patch_size=2, patch_size_t=1, text_embed_dim=text_dim, pooled_projection_dim=pooled_dim,
        rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
    )
    model = _finish(model)
    inputs = video_inputs(batch, text_dim, mask=True,
                          pooled_projections=lambda g: _randn(g, batch, pooled_dim),
                          guidance=torch.full((batch,), 6000.0))  # the pipeline: 1000 x scale

    refiner = "context_embedder.token_refiner.refiner_blocks.0"
    sites = [
        f"{refiner}.attn", f"{refiner}.ff",
        "transformer_blocks.0.attn",  # returns (video_out, text_out)
        "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
        "single_transformer_blocks.0.proj_out",  # parallel block: the fused projection
    ]
    fora_sites = sites[:5] + ["single_transformer_blocks.0"]
    return Case("hunyuan_video", model, inputs, sites, fora_sites)


def build_mochi(batch: int):
    """Mochi 1: joint attention that gathers each prompt's unmasked tokens with nonzero (a
    data-dependent size, with Dynamo's runtime checks on it) and pads back; an attention
    pooling of the prompt in the time embedding; the last block is context-pre-only."""
    from diffusers import MochiTransformer3DModel
    from zoo import LATENT_CH, TEXT_LEN, Case, _finish

    text_dim = 24
    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=HEAD_DIM, num_layers=2,
        pooled_projection_dim=16, in_channels=LATENT_CH, text_embed_dim=text_dim,
        time_embed_dim=8, max_sequence_length=TEXT_LEN,
    )
    model = _finish(model)
    sites = [
        "time_embed.pooler",  # attention pooling of the prompt (see docs/sharp-edges.md)
        "transformer_blocks.0.attn1",  # returns (video_out, text_out)
        "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
        "transformer_blocks.1.attn1", "transformer_blocks.1.ff",  # text_out is None here
    ]
    return Case("mochi", model, video_inputs(batch, text_dim, mask=True), sites)


__all__ = ["build_cogvideox", "build_hunyuan_video", "build_ltx", "build_mochi", "build_wan"]
