"""fora_fx on diffusers' video transformers: one refresh and one reuse step per model.

    python examples/video_probe.py [NAME ...]      # no NAME: every case below

Each case builds a tiny random-weight config of a diffusers video transformer (2 blocks,
hidden 32, 3 frames of 8x8 latents, 6 prompt tokens; every all-zero parameter re-randomised
so each site matters), transforms it with interval=3 and prints: the refresh step's
deviation from the plain model (must be exactly 0), how far the reuse step moved, and
`fora_fx.explain` (cached sites, and every refused candidate with its reason).
The models with tests against the eager FORA reference are in tests/zoo_video.py; this is
the wider, one-step survey behind docs/video.md. Exits 1 if a refresh step is not exact, a
run of repeated blocks holds no site, or a model fails; PIECEWISE models run with
piecewise=fora_fx.Piecewise().
"""

from __future__ import annotations

import diffusers
import torch
from probe_common import B, g, main, registry, rn, tstep
from probe_common import text_mask as _text_mask

C, F, S, L = 4, 3, 8, 6  # latent channels, frames, latent h/w, text tokens
HD = 16


def inputs(mask: bool = False, **extra):
    """The usual call: video latents, prompt tokens, one timestep per sample (+ a text mask);
    `extra` values that are callables get the call's generator."""

    def kw(t, seed):
        gen = g(seed)
        out = dict(hidden_states=rn(gen, B, C, F, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                   timestep=tstep(t))
        if mask:
            out["encoder_attention_mask"] = text_mask()
        out.update({k: v(gen) if callable(v) else v for k, v in extra.items()})
        return out

    return kw


# Wan 2.1 and the models built on its blocks (SkyReels-V2, ChronoEdit, Helios, Wan VACE)
WAN_LIKE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HD,
                in_channels=C, out_channels=C, text_dim=24, freq_dim=32, ffn_dim=64,
                num_layers=2, rope_max_seq_len=32)

COSMOS = dict(in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=HD,
              num_layers=2, mlp_ratio=2.0, text_embed_dim=24, adaln_lora_dim=8,
              max_size=(F, S, S), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
              extra_pos_embed_type="learnable", encoder_hidden_states_channels=24)
KANDINSKY6 = dict(in_visual_dim=C, out_visual_dim=C, in_text_dim=24, in_text_dim2=20,
                  time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                  num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False, in_audio_dim=4,
                  out_audio_dim=4)

CASES, case = registry()


def text_mask():
    return _text_mask(L)


@case
def skyreels_v2():
    torch.manual_seed(0)
    m = diffusers.SkyReelsV2Transformer3DModel(**WAN_LIKE)
    return m, inputs()


@case
def skyreels_v2_df():  # diffusion forcing: per-frame timesteps
    torch.manual_seed(0)
    m = diffusers.SkyReelsV2Transformer3DModel(**WAN_LIKE)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, C, F, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=torch.full((B, F), float(t)), enable_diffusion_forcing=True)
    return m, kw


@case
def allegro():
    torch.manual_seed(0)
    m = diffusers.AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=HD, in_channels=C,
        out_channels=C, num_layers=2, cross_attention_dim=32, sample_height=S, sample_width=S,
        sample_frames=F, caption_channels=24)
    return m, inputs(mask=True)


@case
def latte():
    torch.manual_seed(0)
    m = diffusers.LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HD, in_channels=C, out_channels=2 * C,
        num_layers=2, cross_attention_dim=32, sample_size=S, patch_size=2,
        norm_type="ada_norm_single", caption_channels=24, video_length=F, num_embeds_ada_norm=1000)
    return m, inputs()  # the Latte pipeline passes no text mask


@case
def cosmos():
    torch.manual_seed(0)
    # concat_padding_mask=True needs torchvision: cosmos_padmask stands in for it
    m = diffusers.CosmosTransformer3DModel(**COSMOS, concat_padding_mask=False)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, C, F, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=tstep(t / 1000.0), fps=24)
    return m, kw


@case
def mochi():
    torch.manual_seed(0)
    m = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=HD, num_layers=2,
        pooled_projection_dim=16, in_channels=C, text_embed_dim=24, time_embed_dim=8,
        max_sequence_length=L)
    return m, inputs(mask=True)


@case
def wan_vace():
    torch.manual_seed(0)
    m = diffusers.WanVACETransformer3DModel(
        **WAN_LIKE,
        vace_layers=[0, 1], vace_in_channels=8)
    return m, inputs(control_hidden_states=lambda gen: rn(gen, B, 8, F, S, S),
                     control_hidden_states_scale=torch.ones(2))


@case
def chronoedit():
    torch.manual_seed(0)
    m = diffusers.ChronoEditTransformer3DModel(**WAN_LIKE)
    return m, inputs()


@case
def hunyuan_video15():
    torch.manual_seed(0)
    m = diffusers.HunyuanVideo15Transformer3DModel(
        in_channels=2 * C + 1, out_channels=C, num_attention_heads=2, attention_head_dim=HD,
        num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=24, text_embed_2_dim=20, image_embed_dim=12, rope_axes_dim=(4, 6, 6),
        target_size=64, task_type="t2v")

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, 2 * C + 1, F, S, S),
                    encoder_hidden_states=rn(gen, B, L, 24), encoder_attention_mask=text_mask(),
                    encoder_hidden_states_2=rn(gen, B, 4, 20),
                    encoder_attention_mask_2=torch.ones(B, 4),
                    image_embeds=torch.zeros(B, 5, 12), timestep=tstep(t))
    return m, kw


@case
def kandinsky5():
    torch.manual_seed(0)
    m = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=C, in_text_dim=24, in_text_dim2=20, time_dim=16, out_visual_dim=C,
        patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
        axes_dims=(4, 6, 6), visual_cond=False)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, F, S, S, C), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=tstep(t), pooled_projections=rn(gen, B, 20),
                    visual_rope_pos=(torch.arange(F), torch.arange(S // 2), torch.arange(S // 2)),
                    text_rope_pos=torch.arange(L))
    return m, kw


@case
def sana_video():
    torch.manual_seed(0)
    m = diffusers.SanaVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=HD, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=HD, cross_attention_dim=32,
        caption_channels=24, mlp_ratio=2.0, sample_size=S, patch_size=(1, 2, 2),
        rope_max_seq_len=32)
    return m, inputs(mask=True)


@case
def ltx2():
    torch.manual_seed(0)
    m = diffusers.LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=HD, cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
        audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
        num_layers=2, caption_channels=24, rope_double_precision=False)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, F * 16, 8), audio_hidden_states=rn(gen, B, 5, 8),
                    encoder_hidden_states=rn(gen, B, L, 24),
                    audio_encoder_hidden_states=rn(gen, B, L, 24), timestep=tstep(t / 1000.0),
                    encoder_attention_mask=text_mask(), audio_encoder_attention_mask=text_mask(),
                    num_frames=F, height=4, width=4, audio_num_frames=5)
    return m, kw


@case
def easyanimate():
    torch.manual_seed(0)
    m = diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HD, in_channels=C, out_channels=C, patch_size=2,
        sample_width=S, sample_height=S, num_layers=2, mmdit_layers=2, time_embed_dim=16,
        text_embed_dim=24)
    return m, inputs()


@case
def consisid():
    torch.manual_seed(0)
    m = diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HD, in_channels=C, out_channels=C,
        time_embed_dim=16, text_embed_dim=24, num_layers=2, sample_width=S, sample_height=S,
        sample_frames=4 * (F - 1) + 1, patch_size=2, max_text_seq_length=L)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, F, C, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=tstep(t))
    return m, kw


@case
def helios():
    torch.manual_seed(0)
    m = diffusers.HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HD, in_channels=C,
        out_channels=C, text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6),
        has_multi_term_memory_patch=False)
    return m, inputs()


@case
def motif_video():
    torch.manual_seed(0)
    m = diffusers.MotifVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=HD, num_layers=1,
        num_single_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=24,
        rope_axes_dim=(4, 6, 6))
    return m, inputs(mask=True)


@case
def cosmos_padmask():  # concat_padding_mask=True with a stand-in for torchvision's resize
    import types

    import diffusers.models.transformers.transformer_cosmos as tc

    def resize(x, size, interpolation=None):
        return torch.nn.functional.interpolate(x, size=size, mode="nearest")
    tc.transforms = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize),
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))
    torch.manual_seed(0)
    m = diffusers.CosmosTransformer3DModel(**COSMOS, concat_padding_mask=True)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, C, F, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=tstep(t / 1000.0), padding_mask=torch.zeros(1, 1, S, S), fps=24)
    return m, kw


@case
def kandinsky6():
    torch.manual_seed(0)
    m = diffusers.Kandinsky6Transformer3DModel(**KANDINSKY6)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, F, S, S, C), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=tstep(t), pooled_projections=rn(gen, B, 20))
    return m, kw


@case
def kandinsky6_audio():
    torch.manual_seed(0)
    m = diffusers.Kandinsky6Transformer3DModel(**KANDINSKY6)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, F, S, S, C), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=tstep(t), pooled_projections=rn(gen, B, 20),
                    audio_hidden_states=rn(gen, B, 5, 4),
                    encoder_attention_mask=text_mask().bool())
    return m, kw


@case
def framepack():
    torch.manual_seed(0)
    m = diffusers.HunyuanVideoFramepackTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=HD, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1,
        text_embed_dim=24, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_proj_dim=12,
        has_image_proj=True, has_clean_x_embedder=True)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, C, F, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                    encoder_attention_mask=text_mask(), pooled_projections=rn(gen, B, 8),
                    image_embeds=rn(gen, B, 4, 12), indices_latents=torch.arange(F),
                    guidance=torch.full((B,), 6000.0), timestep=tstep(t),
                    latents_clean=rn(gen, B, C, 1, S, S),
                    indices_latents_clean=torch.tensor([F]),
                    latents_history_2x=rn(gen, B, C, 2, S, S),
                    indices_latents_history_2x=torch.tensor([F + 1, F + 2]),
                    latents_history_4x=rn(gen, B, C, 4, S, S),
                    indices_latents_history_4x=torch.arange(F + 3, F + 7))
    return m, kw


@case
def anyflow():
    torch.manual_seed(0)
    m = diffusers.AnyFlowTransformer3DModel(**WAN_LIKE)

    def kw(t, seed):
        gen = g(seed)
        return dict(hidden_states=rn(gen, B, F, C, S, S), encoder_hidden_states=rn(gen, B, L, 24),
                    timestep=torch.full((B, F), float(t)), r_timestep=torch.full((B, F), t * 0.9))
    return m, kw



# Dynamo cannot capture the model in one graph (docs/video.md): under the default
# one graph fora_fx raises; with piecewise=fora_fx.Piecewise() it is cached piecewise.
PIECEWISE = {"hunyuan_video15"}
EXPECTED_FAILURES: set[str] = set()


if __name__ == "__main__":
    main(CASES, EXPECTED_FAILURES, PIECEWISE)
