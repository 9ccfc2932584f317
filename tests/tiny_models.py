"""Tiny random-weight Stable Diffusion models in the exact diffusers layout, built by diffusers itself.

The weights are random but scaled up so that every component visibly moves the output; the tokenizer
is the real CLIP vocabulary rebuilt from the open-clip-torch wheel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.clip_vocab import write_clip_tokenizer_files

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

SD2V_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
}

SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
}

SD_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               hidden_act="quick_gelu", projection_dim=32)
# SDXL's second encoder: gelu, a text projection, and the legacy eos_token_id=2 of the real config.
BIGG_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 hidden_act="gelu", projection_dim=24, eos_token_id=2)
SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=16,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))

# Three UNet blocks (two downsamplings) so that odd latent sizes exercise the upsample-size path.
VARIANTS = {
    "sd15": dict(
        encoders=[("text_encoder", SD_TEXT, "<|endoftext|>")],
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=SD15_SCHEDULER,
    ),
    "sd2v": dict(
        encoders=[("text_encoder", dict(SD_TEXT, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                        hidden_act="gelu", projection_dim=48), "!")],
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=48,
                  attention_head_dim=(2, 4, 4), norm_num_groups=16, use_linear_projection=True,
                  upcast_attention=True,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=SD2V_SCHEDULER,
    ),
    "lcm": dict(  # an LCM-distilled SD 1.x: guidance scale embedded in the UNet (time_cond_proj_dim)
        encoders=[("text_encoder", SD_TEXT, "<|endoftext|>")],
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=16, time_cond_proj_dim=16,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=dict(SD15_SCHEDULER, _class_name="LCMScheduler", timestep_spacing="leading",
                       original_inference_steps=50),
        weight_scale=1.0,
    ),
    "sd15_inpaint": dict(  # a dedicated inpainting UNet: latents + mask + masked-image latents (9 channels)
        encoders=[("text_encoder", SD_TEXT, "<|endoftext|>")],
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=16, in_channels=9,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=SD15_SCHEDULER,
        weight_scale=1.0,
    ),
    "sdxl": dict(
        encoders=[("text_encoder", SD_TEXT, "<|endoftext|>"), ("text_encoder_2", BIGG_TEXT, "!")],
        unet=dict(SDXL_UNET, cross_attention_dim=64, projection_class_embeddings_input_dim=24 + 6 * 8),
        scheduler=SDXL_SCHEDULER,
        vae=dict(scaling_factor=0.13025),
        weight_scale=1.0,  # at 1.5 this random UNet is chaotic: DDIM amplifies float32 rounding 8x a step
    ),
    "sdxl_inpaint": dict(  # SDXL with a 9-channel inpainting UNet
        encoders=[("text_encoder", SD_TEXT, "<|endoftext|>"), ("text_encoder_2", BIGG_TEXT, "!")],
        unet=dict(SDXL_UNET, cross_attention_dim=64, projection_class_embeddings_input_dim=24 + 6 * 8, in_channels=9),
        scheduler=SDXL_SCHEDULER,
        vae=dict(scaling_factor=0.13025),
        weight_scale=1.0,
    ),
    "sdxl_refiner": dict(
        encoders=[("text_encoder_2", BIGG_TEXT, "!")],
        unet=dict(SDXL_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=24 + 5 * 8),
        scheduler=SDXL_SCHEDULER,
        vae=dict(scaling_factor=0.13025),
        pipeline=dict(requires_aesthetics_score=True, force_zeros_for_empty_prompt=False),
        weight_scale=1.0,
    ),
}


def _scale_weights(module: torch.nn.Module, factor: float, seed: int) -> None:
    """Redraw weights larger than diffusers' init so that a tiny model's output depends on every part."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * factor / fan_in**0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def _tokenizer(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder, pad_token=pad_token)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def make_tiny_model(folder: Path, variant: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny diffusers-layout Stable Diffusion model into `folder` and return it."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = VARIANTS[variant]
    folder = Path(folder)
    torch.manual_seed(seed)
    parts = {}
    for name, text, pad_token in spec["encoders"]:
        config = CLIPTextConfig(**{"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                                   "eos_token_id": 49407, "pad_token_id": 1, **text})
        parts[name] = (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(config)
        parts[name.replace("text_encoder", "tokenizer")] = _tokenizer(folder / f"_vocab_{name}", pad_token)
    parts["unet"] = diffusers.UNet2DConditionModel(**{"sample_size": 8, "in_channels": 4, "out_channels": 4,
                                                      **spec["unet"]})
    parts["vae"] = diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=64, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        **spec.get("vae", {}))
    modules = [m for m in parts.values() if isinstance(m, torch.nn.Module)]
    for i, module in enumerate(modules):
        _scale_weights(module, spec.get("weight_scale", 1.5), seed * 10 + i)
    scheduler_config = dict(spec["scheduler"])
    parts["scheduler"] = getattr(diffusers, scheduler_config.pop("_class_name")).from_config(scheduler_config)

    if variant.startswith("sdxl"):
        parts.setdefault("text_encoder", None)
        parts.setdefault("tokenizer", None)
        cls = diffusers.StableDiffusionXLInpaintPipeline if variant.endswith("_inpaint") else \
            diffusers.StableDiffusionXLImg2ImgPipeline
        pipe = cls(**parts, **spec.get("pipeline", {}))
    else:
        cls = diffusers.StableDiffusionImg2ImgPipeline
        if variant == "lcm":
            cls = diffusers.LatentConsistencyModelImg2ImgPipeline
        elif variant.endswith("_inpaint"):
            cls = diffusers.StableDiffusionInpaintPipeline
        pipe = cls(**parts, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for vocab_dir in folder.glob("_vocab_*"):
        for f in vocab_dir.iterdir():
            f.unlink()
        vocab_dir.rmdir()
    return folder
