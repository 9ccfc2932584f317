"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection), from its config.json."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..configs import Count, config_from_dict, source_of
from ..errors import ModelFormatError
from . import activations
from .layers import scaled_dot_product_attention


@dataclass
class CLIPTextConfig:
    hidden_size: Count = 768
    intermediate_size: Count = 3072
    num_hidden_layers: Count = 12
    num_attention_heads: Count = 12
    max_position_embeddings: Count = 77
    vocab_size: Count = 49408
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Count | None = None  # set for CLIPTextModelWithProjection (SDXL's second encoder)
    eos_token_id: int = 49407
    architectures: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> CLIPTextConfig:
        config = config_from_dict(cls, d)
        if config.hidden_act not in ACTIVATIONS:
            raise ModelFormatError(f"{source_of(d, 'the CLIP config')}: hidden_act {config.hidden_act!r} is not "
                                   f"supported (only {', '.join(ACTIVATIONS)})")
        if "CLIPTextModelWithProjection" not in (config.architectures or []):
            config.projection_dim = None
        return config


ACTIVATIONS = {
    "quick_gelu": activations.quick_gelu,
    "gelu": activations.gelu,
}


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, d = x.shape
        h = self.heads
        q, k, v = (p(x).reshape(b, n, h, d // h).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = scaled_dot_product_attention(q, k, v, (d // h) ** -0.5, causal=True)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


@dataclass
class TextEncoderOutput:
    last_hidden_state: mx.array  # after the final layer norm: SD 1.x/2.x context
    penultimate_hidden_state: mx.array  # input of the last layer: SDXL context
    pooled: mx.array  # final-normed state at the first end-of-text token, projected if the model has one
    hidden_states: list[mx.array]  # the embeddings, then each layer's output (before the final layer norm)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array) -> TextEncoderOutput:
        tm = self.text_model
        n = input_ids.shape[1]
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding.weight[:n]
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        if self.config.eos_token_id == 2:
            # Legacy configs (including SDXL's second encoder) name a wrong end token; transformers then
            # takes the highest id, which is the end-of-text token of the CLIP vocabulary.
            eos_position = mx.argmax(input_ids, axis=-1)
        else:
            eos_position = mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)
        pooled = last[mx.arange(last.shape[0]), eos_position]
        if "text_projection" in self:
            pooled = self.text_projection(pooled)
        return TextEncoderOutput(last, hidden[-2], pooled, hidden)
