"""Tiny random-weight diffusers *pipelines* for end-to-end FORA tests on CPU.

Each case builds a real diffusers pipeline (DiT, PixArt-alpha/sigma, SD3, Flux, Sana, Wan) around a
1-2 block transformer with hidden size 32, an 8x8 latent and a one-level AutoencoderKL
(vae_scale_factor 1), so an 8-step pipeline call takes a few tens of milliseconds.  There are
no tokenizers or text encoders: prompt embeddings are random tensors drawn from the seed.
Weights are deterministic (torch.manual_seed(0) before building) and every all-zero
parameter (zero-initialised adaLN / gate projections, ...) is re-randomised so that every
cached site influences the output.

``PipeCase.call(seed)`` returns the keyword arguments of one pipeline call: 8 steps, a
``torch.Generator`` seeded with ``seed`` and latent output where the pipeline supports it
(DiTPipeline always decodes, so it returns ``output_type="pt"`` images).
``PipeCase.calls_per_step`` is how many transformer forwards one denoising step makes.

Scheduler notes: DDIMScheduler (dit) has no ``step_index``; DPMSolverMultistepScheduler
(pixart) and FlowMatchEulerDiscreteScheduler (sd3, flux) have ``step_index`` /
``begin_index``.  All three are deterministic here (DDIM eta=0, DPM-Solver++ without noise,
Euler flow matching without stochastic sampling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from zoo import _finish, _gen, _randn  # the same deterministic helpers as the model zoo

STEPS = 8
BATCH = 2  # images per pipeline call
SAMPLE = 8  # latent height / width
LATENT_CH = 4
TEXT_LEN = 6
HEADS, HEAD_DIM = 2, 16  # hidden size 32


@dataclass
class PipeCase:
    name: str
    pipe: Any  # the diffusers pipeline, on CPU, float32
    call: Callable[[int], dict]  # call(seed) -> kwargs for pipe(**kwargs)
    sites: list[str]  # module paths inside pipe.transformer whose outputs FORA caches
    calls_per_step: int  # transformer forwards per denoising step with these kwargs


# --------------------------------------------------------------------------- helpers


def _vae(latent_channels: int = LATENT_CH, **config: Any) -> nn.Module:
    """One-level AutoencoderKL: vae_scale_factor = 2 ** (len(block_out_channels) - 1) = 1."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=SAMPLE,
        **config,
    )
    return vae.float().eval()


def _finish_pipe(pipe: Any) -> Any:
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_scale(pipe: Any) -> None:
    # the one-level VAE does not downsample: image side == latent side
    assert pipe.vae_scale_factor == 1, pipe.vae_scale_factor


def output_tensor(out) -> torch.Tensor:
    """The images / latents tensor of a pipeline output (``.images``, ``.frames``, a tuple,
    numpy, ...)."""
    import numpy as np

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, np.ndarray):
        return torch.from_numpy(out)
    images = getattr(out, "images", getattr(out, "frames", None))  # frames: video pipelines
    if images is not None:
        return output_tensor(images)
    if isinstance(out, (tuple, list)) and len(out) > 0:
        return output_tensor(out[0])
    raise TypeError(f"cannot extract an image tensor from {type(out).__name__}")


# --------------------------------------------------------------------------- DiT


def build_dit() -> PipeCase:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CH,
        out_channels=LATENT_CH,  # no learned sigma
        num_layers=2,
        sample_size=SAMPLE,
        patch_size=2,
        # DiTPipeline uses class id 1000 as the null (unconditional) label, so the label
        # table needs 1000 classes (+1 CFG row); 1001 x 32 is still tiny.
        num_embeds_ada_norm=1000,
    )
    # DiTPipeline has no vae_scale_factor: it samples sample_size x sample_size latents
    pipe = DiTPipeline(transformer=_finish(transformer), vae=_vae(), scheduler=DDIMScheduler())

    def call(seed: int) -> dict:
        labels = torch.randint(0, 1000, (BATCH,), generator=_gen(seed + 1)).tolist()
        return {
            "class_labels": labels,
            "guidance_scale": 4.0,  # batched CFG: one forward on [cond, uncond]
            "generator": _gen(seed),
            "num_inference_steps": STEPS,
            "output_type": "pt",  # DiTPipeline always decodes: no latent output
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]
    return PipeCase("dit", _finish_pipe(pipe), call, sites, calls_per_step=1)


# --------------------------------------------------------------------------- PixArt


def _build_pixart(name: str, pipe_cls_name: str) -> PipeCase:
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    caption_channels = 24
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CH,
        out_channels=LATENT_CH,
        num_layers=2,
        cross_attention_dim=HEADS * HEAD_DIM,
        sample_size=SAMPLE,
        patch_size=2,
        use_additional_conditions=False,
        caption_channels=caption_channels,
    )
    pipe_cls = getattr(diffusers, pipe_cls_name)
    pipe = pipe_cls(
        tokenizer=None,
        text_encoder=None,
        vae=_vae(),
        transformer=_finish(transformer),
        scheduler=DPMSolverMultistepScheduler(),
    )
    _check_scale(pipe)

    def call(seed: int) -> dict:
        g = _gen(seed + 1)
        mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
        neg_mask = mask.clone()
        neg_mask[:, TEXT_LEN // 2 :] = 0  # a padded negative prompt: exercises the mask
        return {
            "prompt_embeds": _randn(g, BATCH, TEXT_LEN, caption_channels),
            "prompt_attention_mask": mask,
            "negative_prompt": None,  # defaults to "", which check_inputs rejects with embeds
            "negative_prompt_embeds": _randn(g, BATCH, TEXT_LEN, caption_channels),
            "negative_prompt_attention_mask": neg_mask,
            "guidance_scale": 4.5,  # batched CFG: one forward on [uncond, cond]
            "height": SAMPLE * pipe.vae_scale_factor,
            "width": SAMPLE * pipe.vae_scale_factor,
            "use_resolution_binning": False,
            "generator": _gen(seed),
            "num_inference_steps": STEPS,
            "output_type": "latent",
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")]
    return PipeCase(name, _finish_pipe(pipe), call, sites, calls_per_step=1)


def build_pixart_alpha() -> PipeCase:
    return _build_pixart("pixart_alpha", "PixArtAlphaPipeline")


def build_pixart_sigma() -> PipeCase:
    return _build_pixart("pixart_sigma", "PixArtSigmaPipeline")


# --------------------------------------------------------------------------- SD3


def _build_sd3(name: str, slg: bool) -> PipeCase:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    joint_dim, pooled_dim = 24, 20
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE,
        patch_size=2,
        in_channels=LATENT_CH,
        out_channels=LATENT_CH,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=joint_dim,
        caption_projection_dim=HEADS * HEAD_DIM,  # must equal the inner dim
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=SAMPLE,
        dual_attention_layers=(),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=_finish(transformer),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    _check_scale(pipe)

    def call(seed: int) -> dict:
        g = _gen(seed + 1)
        kwargs = {
            "prompt_embeds": _randn(g, BATCH, TEXT_LEN, joint_dim),
            "pooled_prompt_embeds": _randn(g, BATCH, pooled_dim),
            "negative_prompt_embeds": _randn(g, BATCH, TEXT_LEN, joint_dim),
            "negative_pooled_prompt_embeds": _randn(g, BATCH, pooled_dim),
            "guidance_scale": 5.0,  # batched CFG: one forward on [uncond, cond]
            "height": SAMPLE * pipe.vae_scale_factor,
            "width": SAMPLE * pipe.vae_scale_factor,
            "generator": _gen(seed),
            "num_inference_steps": STEPS,
            "output_type": "latent",
        }
        if slg:
            # Skip-layer guidance: step i makes a second, cond-only forward (batch BATCH,
            # not 2 * BATCH, with skip_layers=[0], so block 0 and its sites do not run)
            # iff  STEPS * start < i < STEPS * stop  (strict on both sides).  start=0.0
            # would leave out step 0; start=-1.0 / stop=1.0 make every step i = 0..7 call it.
            kwargs.update(
                skip_guidance_layers=[0],
                skip_layer_guidance_start=-1.0,
                skip_layer_guidance_stop=1.0,
                skip_layer_guidance_scale=2.8,
            )
        return kwargs

    # Block 0: attn -> (img, ctx) pair, ff, ff_context.  Block 1 is the last block and is
    # context_pre_only: no ff_context.
    sites: list[str] = []
    for i, block in enumerate(transformer.transformer_blocks):
        sites += [f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.ff"]
        if block.ff_context is not None:
            sites.append(f"transformer_blocks.{i}.ff_context")
    return PipeCase(name, _finish_pipe(pipe), call, sites, calls_per_step=2 if slg else 1)


def build_sd3() -> PipeCase:
    return _build_sd3("sd3", slg=False)


def build_sd3_slg() -> PipeCase:
    return _build_sd3("sd3_slg", slg=True)


# --------------------------------------------------------------------------- Flux


def _build_flux(name: str, true_cfg: bool) -> PipeCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    joint_dim, pooled_dim = 24, 20
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CH * 4,  # latents are packed into 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # FLUX.1's scheduler config: FluxPipeline always passes mu = calculate_shift(seq_len, ...)
    # to set_timesteps, which requires use_dynamic_shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(shift_factor=0.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=_finish(transformer),
    )
    _check_scale(pipe)
    # prepare_latents: latent side = 2 * (height // (vae_scale_factor * 2)), so an image side
    # of SAMPLE * vae_scale_factor gives SAMPLE x SAMPLE latents = (SAMPLE // 2) ** 2 tokens.
    side = SAMPLE * pipe.vae_scale_factor
    assert side % (pipe.vae_scale_factor * 2) == 0

    def call(seed: int) -> dict:
        g = _gen(seed + 1)
        kwargs = {
            "prompt_embeds": _randn(g, BATCH, TEXT_LEN, joint_dim),
            "pooled_prompt_embeds": _randn(g, BATCH, pooled_dim),
            "height": side,
            "width": side,
            "generator": _gen(seed),
            "num_inference_steps": STEPS,
            "output_type": "latent",  # packed latents (BATCH, (SAMPLE // 2) ** 2, 16)
        }
        if true_cfg:
            # two forwards per step, in transformer.cache_context("cond") / ("uncond")
            kwargs.update(
                negative_prompt_embeds=_randn(g, BATCH, TEXT_LEN, joint_dim),
                negative_pooled_prompt_embeds=_randn(g, BATCH, pooled_dim),
                true_cfg_scale=4.0,
            )
        return kwargs

    sites = [
        "transformer_blocks.0.attn",  # returns (img_out, ctx_out)
        "transformer_blocks.0.ff",
        "transformer_blocks.0.ff_context",
        # parallel block: attn (pre_only) and the MLP are concatenated into proj_out, whose
        # output (before the gate) is the cache point
        "single_transformer_blocks.0.proj_out",
    ]
    return PipeCase(name, _finish_pipe(pipe), call, sites, calls_per_step=2 if true_cfg else 1)


def build_flux() -> PipeCase:
    return _build_flux("flux", true_cfg=False)


def build_flux_true_cfg() -> PipeCase:
    return _build_flux("flux_true_cfg", true_cfg=True)


# --------------------------------------------------------------------------- Sana


def build_sana() -> PipeCase:
    """Sana: ReLU linear attention, conv-GLU FFN; DPM-Solver with flow sigmas, batched CFG.
    No VAE (latent output): the pipeline then assumes a scale factor of 32."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    caption_dim = 24
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=LATENT_CH, out_channels=LATENT_CH, num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM, num_layers=2, num_cross_attention_heads=HEADS,
        cross_attention_head_dim=HEAD_DIM, cross_attention_dim=HEADS * HEAD_DIM,
        caption_channels=caption_dim, mlp_ratio=2.0, sample_size=SAMPLE, patch_size=2,
    )
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None,
                        transformer=_finish(transformer), scheduler=scheduler)

    def call(seed: int) -> dict:
        g = _gen(seed + 1)
        mask = torch.ones(BATCH, TEXT_LEN)
        return {
            "prompt_embeds": _randn(g, BATCH, TEXT_LEN, caption_dim),
            "prompt_attention_mask": mask,
            "negative_prompt": None,
            "negative_prompt_embeds": _randn(g, BATCH, TEXT_LEN, caption_dim),
            "negative_prompt_attention_mask": mask,
            "height": 32 * SAMPLE, "width": 32 * SAMPLE, "use_resolution_binning": False,
            "generator": _gen(seed),
            "num_inference_steps": STEPS,
            "output_type": "latent",
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")]
    return PipeCase("sana", _finish_pipe(pipe), call, sites, calls_per_step=1)


# --------------------------------------------------------------------------- Wan (video)


def build_wan(experts: int = 1) -> PipeCase:
    """Wan 2.1 text-to-video: cond and uncond are separate transformer calls per step, in
    transformer.cache_context("cond") / ("uncond"), with Wan's UniPC flow-matching scheduler.
    experts=2: Wan 2.2 A14B, `transformer` for the high-noise steps and `transformer_2` for
    the rest (boundary_ratio 0.8: timesteps 999-833 and 750-301, 4 steps each of 8)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    text_dim = 24
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CH, out_channels=LATENT_CH, text_dim=text_dim, freq_dim=32,
        ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    )
    # Never called with output_type="latent"; the pipeline reads its scale factors: 9 frames
    # -> 3 latent frames, 16 x 16 pixels (Wan needs multiples of 16) -> 8 x 8 latents.
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT_CH, dim_mult=[1], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[], scale_factor_spatial=2)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0)
    second = None
    if experts == 2:
        torch.manual_seed(1)
        second = _finish(WanTransformer3DModel(**transformer.config))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), scheduler=scheduler,
                       transformer=_finish(transformer), transformer_2=second,
                       boundary_ratio=0.8 if experts == 2 else None)

    def call(seed: int) -> dict:
        g = _gen(seed + 1)
        return {
            "prompt_embeds": _randn(g, BATCH, TEXT_LEN, text_dim),
            "negative_prompt_embeds": _randn(g, BATCH, TEXT_LEN, text_dim),
            "height": 2 * SAMPLE, "width": 2 * SAMPLE, "num_frames": 9,
            "generator": _gen(seed),
            "num_inference_steps": STEPS,
            "output_type": "latent",  # (BATCH, LATENT_CH, 3, SAMPLE, SAMPLE)
        }

    sites = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ffn")]
    name = "wan" if experts == 1 else "wan22"
    return PipeCase(name, _finish_pipe(pipe), call, sites, calls_per_step=2)


def build_wan22() -> PipeCase:
    return build_wan(experts=2)


# --------------------------------------------------------------------------- registry

# PixArt, SD3 and Flux pipelines are diffusers "torch and transformers" objects: without the
# `transformers` package diffusers exports dummy classes that raise ImportError when built,
# even with every text encoder / tokenizer set to None.  DiT needs only torch.
PIPES: dict[str, Callable[[], PipeCase]] = {
    "dit": build_dit,
    "pixart_alpha": build_pixart_alpha,
    "pixart_sigma": build_pixart_sigma,
    "sd3": build_sd3,
    "sd3_slg": build_sd3_slg,
    "flux": build_flux,
    "flux_true_cfg": build_flux_true_cfg,
    "wan": build_wan,
    "sana": build_sana,
}


def make_pipe(name: str) -> PipeCase:
    try:
        builder = PIPES[name]
    except KeyError:
        raise KeyError(f"unknown pipeline case {name!r}; known: {sorted(PIPES)}") from None
    return builder()
