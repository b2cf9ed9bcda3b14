"""FORA on unmodified diffusers pipelines: one line per pipeline, every family.

    python examples/pipelines.py [--family dit|pixart|sd3|flux|wan|all] [--compiler inductor]

Each family builds its real diffusers pipeline around a tiny random-weight transformer and
VAE (no downloads; with real weights you would use `from_pretrained`) and passes prompt
embeddings directly (no text encoder). Then:

    pipe = fora_fx.transform(pipe, interval=N)   # the one line
    pipe(...)                                    # every call is a new generation
    fora_fx.restore(pipe)                        # back to the original transformer

The script checks that interval=1 reproduces the untransformed pipeline and prints what
interval=3 cached and how far its output moved (random weights: not an image-quality test).
"""

from __future__ import annotations

import argparse
import sys

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

import fora_fx

B, L, S = 2, 6, 8  # images per call, prompt tokens, latent side
TINY = dict(num_attention_heads=2, attention_head_dim=16)  # hidden 32


def vae(**kw):  # one level: vae_scale_factor 1, so image side == latent side
    return AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=2,
                         down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), sample_size=S, **kw)


def embeds(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dit(seed):  # DDIM (no step_index: steps are counted), batched CFG
    model = DiTTransformer2DModel(**TINY, num_layers=2, sample_size=S, in_channels=4,
                                  out_channels=4, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=model, vae=vae(), scheduler=DDIMScheduler())
    return pipe, dict(class_labels=[207, 360], output_type="pt")


def pixart(seed):  # DPM-Solver, self- and gate-less cross-attention
    model = PixArtTransformer2DModel(**TINY, num_layers=2, cross_attention_dim=32,
                                     sample_size=S, caption_channels=24,
                                     use_additional_conditions=False)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae(), transformer=model,
                               scheduler=DPMSolverMultistepScheduler())
    mask = torch.ones(B, L, dtype=torch.long)
    return pipe, dict(prompt_embeds=embeds(B, L, 24, seed=seed), prompt_attention_mask=mask,
                      negative_prompt=None, negative_prompt_embeds=embeds(B, L, 24, seed=-1),
                      negative_prompt_attention_mask=mask, height=S, width=S,
                      use_resolution_binning=False, output_type="latent")


def sd3(seed):  # flow matching (step_index), joint attention, skip-layer guidance: 2 calls/step
    model = SD3Transformer2DModel(**TINY, sample_size=S, num_layers=2, joint_attention_dim=24,
                                  caption_projection_dim=32, pooled_projection_dim=20,
                                  pos_embed_max_size=S, dual_attention_layers=())
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                          "text_encoder_3", "tokenizer_3"])
    pipe = StableDiffusion3Pipeline(transformer=model, vae=vae(shift_factor=0.0),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **none)
    return pipe, dict(prompt_embeds=embeds(B, L, 24, seed=seed),
                      pooled_prompt_embeds=embeds(B, 20, seed=seed),
                      negative_prompt_embeds=embeds(B, L, 24, seed=-1),
                      negative_pooled_prompt_embeds=embeds(B, 20, seed=-1),
                      skip_guidance_layers=[0], skip_layer_guidance_start=-1.0,
                      height=S, width=S, output_type="latent")


def flux(seed):  # double + single (parallel) blocks, true CFG with cache_context: 2 calls/step
    model = FluxTransformer2DModel(**TINY, patch_size=1, in_channels=16, num_layers=1,
                                   num_single_layers=1, joint_attention_dim=24,
                                   pooled_projection_dim=20, axes_dims_rope=(4, 6, 6))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    pipe = FluxPipeline(transformer=model, vae=vae(shift_factor=0.0), scheduler=sched, **none)
    return pipe, dict(prompt_embeds=embeds(B, L, 24, seed=seed),
                      pooled_prompt_embeds=embeds(B, 20, seed=seed),
                      negative_prompt_embeds=embeds(B, L, 24, seed=-1),
                      negative_pooled_prompt_embeds=embeds(B, 20, seed=-1),
                      true_cfg_scale=4.0, height=2 * S, width=2 * S, output_type="latent")


def wan(seed):  # video: rotary self-attention, cross-attention; cond / uncond calls per step
    model = WanTransformer3DModel(**TINY, patch_size=(1, 2, 2), in_channels=4, out_channels=4,
                                  text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2)
    # The VAE is not run (latent output); its scale factors make 9 frames of 16 x 16 pixels
    # 3 latent frames of S x S.
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[], scale_factor_spatial=2)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched,
                       transformer=model)
    return pipe, dict(prompt_embeds=embeds(B, L, 24, seed=seed),
                      negative_prompt_embeds=embeds(B, L, 24, seed=-1),
                      height=2 * S, width=2 * S, num_frames=9, output_type="latent")


FAMILIES = {"dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux, "wan": wan}


def images(pipe, kwargs, seed):
    out = pipe(**kwargs, num_inference_steps=8, generator=torch.Generator().manual_seed(seed))
    frames = out.frames if hasattr(out, "frames") else out.images  # video / image pipelines
    return frames if isinstance(frames, torch.Tensor) else torch.as_tensor(frames)


def run(name: str, compiler: str) -> bool:
    torch.manual_seed(0)
    pipe, kwargs = FAMILIES[name](seed=0)
    pipe.transformer.eval()  # from_pretrained does this; a model built from a config trains
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        plain = [images(pipe, kwargs, s) for s in (0, 1)]
        fora_fx.transform(pipe, interval=1, compiler=compiler)
        same = [images(pipe, kwargs, s) for s in (0, 1)]
        fora_fx.restore(pipe)
        fora_fx.transform(pipe, interval=3, compiler=compiler)
        cached = [images(pipe, kwargs, s) for s in (0, 1)]
        print(f"== {name}: {type(pipe).__name__}")
        print(fora_fx.explain(pipe))
        fora_fx.restore(pipe)
    exact = max((a - b).abs().max().item() for a, b in zip(plain, same, strict=True))
    moved = max(((a - c).norm() / a.norm()).item() for a, c in zip(plain, cached, strict=True))
    print(f"interval=1 vs untransformed: max abs diff {exact:.2e}; "
          f"interval=3 relative change {moved:.2e}\n")
    return exact < 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--compiler", choices=["inductor", "aot_eager", "eager"],
                        default="inductor")
    args = parser.parse_args()
    names = list(FAMILIES) if args.family == "all" else [args.family]
    ok = all([run(n, args.compiler) for n in names])
    print("OK" if ok else "FAILED: interval=1 did not reproduce a pipeline")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
