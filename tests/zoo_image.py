"""Image transformers for the zoo (tests/zoo.py) whose sites need this repo's newer patterns:
Flux 2 (a parallel block inside one attention module: fused QKV + MLP-in Linear, SwiGLU,
shared `to_out`) and AuraFlow (SwiGLU feed-forwards with separate gate and value Linears).
Inputs mirror the pipelines: timestep / 1000; Flux 2 takes packed latents, (t, h, w, l) ids
and a guidance scale. Each builder imports its helpers from zoo at call time."""

from __future__ import annotations

import torch

HEAD_DIM = 16
TEXT_DIM = 24


def build_flux2(batch: int):
    from diffusers import Flux2Transformer2DModel
    from zoo import LATENT_CH, SAMPLE, TEXT_LEN, Case, _finish, _gen, _randn, timestep_value

    torch.manual_seed(0)
    model = _finish(Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CH, num_layers=2, num_single_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True))
    side = SAMPLE // 2

    def ids(*sizes: int) -> torch.Tensor:
        grid = torch.cartesian_prod(*(torch.arange(n) for n in sizes))
        return grid.unsqueeze(0).expand(batch, -1, -1)

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        return (), {
            "hidden_states": _randn(g, batch, side * side, 4 * LATENT_CH),
            "encoder_hidden_states": _randn(g, batch, TEXT_LEN, TEXT_DIM),
            "timestep": torch.full((batch,), timestep_value(step) / 1000.0),
            "guidance": torch.full((batch,), 4.0),
            "txt_ids": ids(1, 1, 1, TEXT_LEN),
            "img_ids": ids(1, side, side, 1),
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff", "ff_context")]
    sites += [f"single_transformer_blocks.{i}.attn" for i in range(2)]
    return Case("flux2", model, inputs, sites)


def build_auraflow(batch: int):
    from diffusers import AuraFlowTransformer2DModel
    from zoo import LATENT_CH, SAMPLE, TEXT_LEN, Case, _finish, _gen, _randn, timestep_value

    torch.manual_seed(0)
    model = _finish(AuraFlowTransformer2DModel(
        sample_size=SAMPLE, patch_size=2, in_channels=LATENT_CH, num_mmdit_layers=2,
        num_single_dit_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=32, out_channels=LATENT_CH,
        pos_embed_max_size=64))

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        return (), {
            "hidden_states": _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE),
            "encoder_hidden_states": _randn(g, batch, TEXT_LEN, TEXT_DIM),
            "timestep": torch.full((batch,), timestep_value(step) / 1000.0),
        }

    sites = [f"joint_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff",
                                                                           "ff_context")]
    sites += [f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff")]
    return Case("auraflow", model, inputs, sites)


__all__ = ["build_auraflow", "build_flux2"]
