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

# Three UNet blocks (two downsamplings) so that odd latent sizes exercise the upsample-size path.
VARIANTS = {
    "sd15": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32),
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                  attention_head_dim=4, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=SD15_SCHEDULER,
        pad_token="<|endoftext|>",
    ),
    "sd2v": dict(
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", projection_dim=48),
        unet=dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=48,
                  attention_head_dim=(2, 4, 4), norm_num_groups=16, use_linear_projection=True,
                  upcast_attention=True,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=SD2V_SCHEDULER,
        pad_token="!",
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


def make_tiny_model(folder: Path, variant: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny diffusers-layout Stable Diffusion model into `folder` and return it."""
    from diffusers import AutoencoderKL, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = VARIANTS[variant]
    folder = Path(folder)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=1, **spec["text"])
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **spec["unet"])
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    for i, module in enumerate((text_encoder, unet, vae)):
        _scale_weights(module, 1.5, seed * 10 + i)

    vocab_dir = folder / "_vocab"
    write_clip_tokenizer_files(vocab_dir, pad_token=spec["pad_token"])
    tokenizer = CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"),
                              pad_token=spec["pad_token"], model_max_length=77)
    scheduler_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[spec["scheduler"]["_class_name"]]
    scheduler = scheduler_cls.from_config({k: v for k, v in spec["scheduler"].items() if k != "_class_name"})
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in vocab_dir.iterdir():
        f.unlink()
    vocab_dir.rmdir()
    return folder
