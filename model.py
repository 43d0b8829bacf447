"""The OpenVLA network as plain torch modules: fused DINOv2 + SigLIP ViTs -> MLP projector -> Llama-2 decoder.

    from model import VLA
    vla = VLA.from_pretrained("checkpoints/openvla-7b", dtype=torch.bfloat16, device="cuda")  # hub layout, on disk
    action = vla.predict_action(image, "pick up the cup", unnorm_key="bridge_orig")          # np.ndarray (7,)
    vla.save_pretrained("out/")                                                               # same layout back

    python -c "from model import VLA; print(VLA.build('tiny'))"    # any named config, random weights, no download

Module and parameter names mirror the released checkpoint (`vision_backbone.featurizer.blocks.0.attn.qkv.weight`,
`projector.fc1.weight`, `language_model.model.layers.0.self_attn.q_proj.weight`, ...), so loading is a strict
state-dict load with no rename table. The ViTs compute as timm 0.9.10's VisionTransformer, the decoder as
transformers 4.40.1's LlamaForCausalLM. Shapes in comments are for openvla-7b: P = 256 patches, D = 4096.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import oft
from tokenizer import (IGNORE_INDEX, ActionTokenizer, action_dim, build_prompt, build_text_tokenizer, empty_piece_id,
                       resolve_unnorm_key, unnormalize_actions)


@dataclass
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    kind: str  # "dinov2" (cls + 4 registers, LayerScale) or "siglip" (no prefix tokens, attention-pool head)
    patch_size: int = 14
    image_size: int = 224


@dataclass
class LlamaConfig:
    # Defaults are transformers 4.40.1's LlamaConfig defaults (= Llama-2-7B sizes): the release's text_config holds
    # only the fields that differ from them, so absent fields take these values (rms_norm_eps 1e-6, not Llama-2's 1e-5).
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0


@dataclass
class VLAConfig:
    vision_backbone_id: str
    vision: list[ViTConfig]  # [DINOv2, SigLIP] for fused backbones, one entry otherwise
    llm: LlamaConfig
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    pad_token_id: int = 32000
    norm_stats: dict = field(default_factory=dict)
    # per-view (mean, std) as they run: the release's preprocessor_config.json holds bf16-rounded DINOv2 constants
    image_norm: list = field(default_factory=list)
    arch_specifier: str = "no-align+fused-gelu-mlp"
    llm_backbone_id: str = "llama2-7b-pure"
    hf_llm_id: str = "meta-llama/Llama-2-7b-hf"


DINO_L = ViTConfig(1024, 24, 16, 4096, "dinov2")  # vit_large_patch14_reg4_dinov2.lvd142m
SIGLIP_SO = ViTConfig(1152, 27, 16, 4304, "siglip")  # vit_so400m_patch14_siglip_224: mlp int(1152 * 3.7362)
DINO_NORM = ([0.484375, 0.455078125, 0.40625], [0.228515625, 0.2236328125, 0.224609375])  # bf16(ImageNet mean/std)
SIGLIP_NORM = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])

# vision_backbone_id -> (timm ids, [(ViTConfig, normalization)], image size), prismatic/models/materialize.py; no CLIP
BACKBONES = {
    "dinosiglip-vit-so-224px": (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
                                [(DINO_L, DINO_NORM), (SIGLIP_SO, SIGLIP_NORM)], 224),
    "dinosiglip-vit-so-384px": (["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"],
                                [(DINO_L, DINO_NORM), (SIGLIP_SO, SIGLIP_NORM)], 384),
    "siglip-vit-so400m": (["vit_so400m_patch14_siglip_224"], [(SIGLIP_SO, SIGLIP_NORM)], 224),
    "siglip-vit-so400m-384px": (["vit_so400m_patch14_siglip_384"], [(SIGLIP_SO, SIGLIP_NORM)], 384),
    "dinov2-vit-l": (["vit_large_patch14_reg4_dinov2.lvd142m"], [(DINO_L, DINO_NORM)], 224),
}


def _config(backbone_id, vits, llm, **kw):
    timm_ids, views, size = BACKBONES[backbone_id]
    vision = [replace(v, image_size=size) for v in vits]
    arch = "no-align+fused-gelu-mlp" if len(views) == 2 else "no-align+gelu-mlp"
    return VLAConfig(backbone_id, vision, llm, image_norm=[norm for _, norm in views], arch_specifier=arch, **kw)


CONFIGS = {
    # The released openvla/openvla-7b: 7,541,237,184 parameters.
    "openvla-7b": _config("dinosiglip-vit-so-224px", [DINO_L, SIGLIP_SO], LlamaConfig(vocab_size=32064)),
    # Real-size ViTs and a ~1B Llama-shaped decoder: a realistic CPU benchmark.
    "mid": _config("dinosiglip-vit-so-224px", [DINO_L, SIGLIP_SO], LlamaConfig(32064, 2048, 5504, 18, 16)),
    # The golden fixture's sizes (../shared/fixtures/openvla-tiny) and the demo model.
    "tiny": _config("dinosiglip-vit-so-224px", [ViTConfig(32, 3, 2, 128, "dinov2"), ViTConfig(48, 3, 3, 179, "siglip")],
                    LlamaConfig(32064, 64, 172, 2, 4)),
}


def run_block(block, *args):
    """Run a ViT block or decoder layer; with block.checkpointing set (train.py), keep only its input for backward and
    recompute its activations then: memory per block drops from all intermediates to one (B, T, D) tensor."""
    if getattr(block, "checkpointing", False) and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ViTAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v with bias
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU in both ViTs: timm 0.9.10's default act_layer, SigLIP included
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    # timm calls the parameter `gamma`; the release renamed it `scale_factor` (transformers rewrites "gamma" keys).
    def __init__(self, dim):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), 1e-5))  # DINOv2 init_values 1e-5

    def forward(self, x):
        return x * self.scale_factor


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=1e-6)  # timm LayerNorm eps 1e-6
        self.attn = ViTAttention(D, cfg.num_heads)
        self.ls1 = LayerScale(D) if cfg.kind == "dinov2" else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, cfg.mlp_hidden)
        self.ls2 = LayerScale(D) if cfg.kind == "dinov2" else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):  # (B, 3, 224, 224) -> (B, 256, C), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class AttentionPoolHead(nn.Module):  # SigLIP's "map" head: OpenVLA never runs it; declared so a save keeps its weights
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D = cfg.embed_dim
        self.latent = nn.Parameter(torch.zeros(1, 1, D))
        self.q, self.kv, self.proj = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, cfg.mlp_hidden)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        D, n_patches = cfg.embed_dim, (cfg.image_size // cfg.patch_size) ** 2
        self.num_prefix = 5 if cfg.kind == "dinov2" else 0  # DINOv2: cls + 4 registers; SigLIP: none
        if cfg.kind == "dinov2":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            self.reg_token = nn.Parameter(torch.zeros(1, 4, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches, D))  # patch positions only
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)  # stored, unused: OpenVLA reads features before the final norm
        if cfg.kind == "siglip":
            self.attn_pool = AttentionPoolHead(cfg)

    def forward(self, x):  # (B, 3, S, S) -> (B, P, C)
        x = self.patch_embed(x) + self.pos_embed  # DINOv2 (no_embed_class): prefix tokens get no position embedding
        if self.num_prefix:
            B = x.shape[0]
            x = torch.cat([self.cls_token.expand(B, -1, -1), self.reg_token.expand(B, -1, -1), x], dim=1)
        # the second-to-last block's output, no final norm, as OpenVLA trained (get_intermediate_layers(n={depth - 2}))
        for block in self.blocks[:-1]:
            x = run_block(block, x)
        return x[:, self.num_prefix:]  # drop cls and registers


class VisionBackbone(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.featurizer = ViT(cfg.vision[0])
        if len(cfg.vision) == 2:
            self.fused_featurizer = ViT(cfg.vision[1])

    def forward(self, pixel_values):  # (B, 6, 224, 224): DINOv2 view ++ SigLIP view -> (B, 256, 1024 + 1152)
        views = pixel_values.split(3, dim=1)  # one 3-channel view per ViT
        return torch.cat([vit(x) for vit, x in zip(self.children(), views)], dim=-1)


class Projector(nn.Module):
    """fused-gelu-mlp (2176 -> 8704 -> 4096 -> 4096) for fused backbones, gelu-mlp (D_vis -> D -> D) otherwise."""

    def __init__(self, vision_dim, llm_dim, fused):
        super().__init__()
        hidden = 4 * vision_dim if fused else llm_dim
        self.fc1 = nn.Linear(vision_dim, hidden)
        self.fc2 = nn.Linear(hidden, llm_dim)
        if fused:
            self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):  # (B, P, 2176) -> (B, P, 4096)
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(x)) if hasattr(self, "fc3") else x


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalize in fp32, cast back, then scale (transformers' order)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """RoPE tables for (B, T) positions -> cos, sin (B, 1, T, hd), computed in fp32 then cast, as the original."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # halves, not interleaved
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):  # x (B, h, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values for every layer: one prefill writes [0, T), each decode step writes one position."""

    def __init__(self, n_layers, B, kv_heads, max_len, head_dim, dtype, device):
        shape = (B, kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = 0  # number of positions written (advanced by LlamaModel after all layers ran)

    def update(self, layer, k, v):  # k, v (B, h, T, hd) -> all keys/values so far
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        D, self.head_dim = cfg.hidden_size, cfg.hidden_size // self.heads
        self.q_proj = nn.Linear(D, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, D, bias=False)

    def forward(self, x, cos, sin, mask, cache):  # x (B, T, D); mask None (plain causal) or bool (B, 1, T, S)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        causal = mask is None and T > 1  # one new token attends to the whole cache; a prefill is plain causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # SwiGLU
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        # no init here (build() initializes, loading overwrites): nn.Embedding's normal_ on meta imports torch._dynamo
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, position_ids, mask=None, cache=None):  # x (B, T, D) embeddings -> hidden (B, T, D)
        cos, sin = rope_cos_sin(position_ids, x.shape[-1] // self.cfg.num_attention_heads, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            x = run_block(layer, x, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += x.shape[1]
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied from embed_tokens


def to_pixel_values(image: np.ndarray, image_norm) -> torch.Tensor:
    """uint8 (S, S, 3) -> float32 (3 * views, S, S): to_tensor (/ 255), then (x - mean) / std with each view's
    constants, in float32 as torchvision's Normalize (prismatic/models/backbones/vision/base_vision.py). data.py
    calls it too, so training and inference normalize identically."""
    x = np.asarray(image, np.uint8).transpose(2, 0, 1).astype(np.float32, order="C") / np.float32(255)  # (3, S, S)
    views = [(x - np.float32(mean).reshape(3, 1, 1)) / np.float32(std).reshape(3, 1, 1) for mean, std in image_norm]
    return torch.from_numpy(np.concatenate(views))


class VLAOutput(NamedTuple):
    logits: torch.Tensor  # (B, P + T, V) over [BOS, patches, text]; with labels (N, V) at supervised positions, or
    # an OFT model's chunks (B, chunk, action_dim)
    loss: torch.Tensor | None


def attention_bias(key_valid, T_q):
    """bool (B, 1, T_q, S) mask for SDPA: causal over the last T_q of S positions, padded keys hidden. A query that
    sees no valid key (left padding before BOS) attends to itself, so SDPA gives no NaN; those rows are never read."""
    B, S = key_valid.shape
    q_pos = torch.arange(S - T_q, S, device=key_valid.device)
    k_pos = torch.arange(S, device=key_valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]
    return (allowed | (k_pos[None, :] == q_pos[:, None])[None])[:, None]


class VLA(nn.Module):
    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        vision_dim = sum(v.embed_dim for v in config.vision)
        self.vision_backbone = VisionBackbone(config)
        self.projector = Projector(vision_dim, config.llm.hidden_size, fused=len(config.vision) == 2)
        self.language_model = LlamaForCausalLM(config.llm)
        self.action_head = self.proprio_projector = None  # OFT's (oft.py): from_pretrained attaches them when present
        self.tokenizer = None  # set by build / from_pretrained
        # Action ids count down from the base vocabulary: 32064 rows - 64 padding = 32000 (modeling_prismatic.py)
        self.action_tokenizer = ActionTokenizer(config.llm.vocab_size - config.pad_to_multiple_of, config.n_action_bins)

    @property
    def norm_stats(self):
        return self.config.norm_stats

    def blocks(self):
        """Every ViT block and decoder layer: the units FSDP shards and activation checkpointing wraps."""
        vits = list(self.vision_backbone.children())
        return [b for vit in vits for b in vit.blocks] + list(self.language_model.model.layers)

    def unused_parameter_names(self):
        """Parameters that never influence the output: each ViT's last block and final norm, SigLIP's attention pool.
        Kept for a faithful save; train.py freezes them (they would never receive a gradient)."""
        return [f"vision_backbone.{v}.{p}" for v, vit in self.vision_backbone.named_children() for p, _ in
                vit.named_parameters() if p.startswith((f"blocks.{len(vit.blocks) - 1}.", "norm.", "attn_pool."))]

    @property
    def num_patches(self):  # P: 256 for 224 x 224 images in 14 x 14 patches
        return self.vision_backbone.featurizer.pos_embed.shape[1]

    def embed(self, pixel_values, input_ids):
        """[BOS, 256 projected patches, rest of the text], as prismatic/models/vlms/prismatic.py orders them."""
        patches = self.projector(self.vision_backbone(pixel_values.to(self.projector.fc1.weight.dtype)))  # (B, P, D)
        tokens = self.language_model.model.embed_tokens(input_ids)  # (B, T, D)
        return torch.cat([tokens[:, :1], patches.to(tokens.dtype), tokens[:, 1:]], dim=1)

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, proprio=None, actions=None):
        """Right-padded batch -> logits and loss. Without labels: logits (B, P + T, V) at every position of [BOS,
        patches, text]. With labels (training): logits (N, V) only where the next token is supervised, in the order of
        labels[:, 1:][labels[:, 1:] != -100], and their mean cross-entropy: the original's loss (patches and prompt are
        never supervised), without the lm_head and logits of the ~330 positions of a 7-dim action example.
        An OFT model with labels: its chunks (B, chunk, action_dim) and their L1 loss against actions."""
        if self.action_head is not None and labels is not None:  # vla-scripts/finetune.py's run_forward_pass
            is_action = labels > self.action_tokenizer.begin_idx
            chunks = oft.forward(self, pixel_values, input_ids, attention_mask, is_action,
                                 proprio if self.proprio_projector is not None else None)[0].clone()  # not a view
            return VLAOutput(chunks, F.l1_loss(chunks.float(), actions.float()))  # the mean over B x chunk x dim
        x = self.embed(pixel_values, input_ids)
        B, L, _ = x.shape
        P = L - input_ids.shape[1]
        position_ids = torch.arange(L, device=x.device)[None].expand(B, L)  # 0..L-1 over BOS, patches, text
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = torch.cat([attention_mask[:, :1], attention_mask.new_ones(B, P), attention_mask[:, 1:]], 1)
            mask = attention_bias(key_valid.bool(), L)
        hidden = self.language_model.model(x, position_ids, mask)
        if labels is None:
            return VLAOutput(self.language_model.lm_head(hidden).float(), None)
        keep = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1): hidden[:, P + t] predicts input_ids[:, t + 1]
        logits = self.language_model.lm_head(hidden[:, P:-1][keep]).float()  # fp32 for the loss, as the original
        # one mean over every supervised token of the batch (not per example), as transformers' Llama loss
        return VLAOutput(logits, F.cross_entropy(logits, labels[:, 1:][keep]))

    def preprocess(self, images) -> torch.Tensor:
        """Images (HxWx3 uint8 arrays or PIL images, any size) -> pixel_values (B, 3 * views, S, S) float32, as the
        released processor: PIL bicubic resize (antialiased) straight to SxS ("resize-naive"), then to_pixel_values."""
        from PIL import Image

        size, out = self.config.vision[0].image_size, []
        for image in images:
            if isinstance(image, np.ndarray):
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"image must be an HxWx3 uint8 array, got {image.dtype} {image.shape}")
                image = Image.fromarray(image)
            elif not isinstance(image, Image.Image):
                raise TypeError(f"image must be a numpy uint8 HxWx3 array or a PIL image, got {type(image).__name__}")
            image = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
            out.append(to_pixel_values(image, self.config.image_norm))
        return torch.stack(out)

    def prompt_ids(self, instruction: str) -> list[int]:
        """The prompt's ids with BOS, then the lone "▁" (29871) unless already last: training put it between "Out:"
        and the action tokens, so predict_action inserts it (prismatic/extern/hf/modeling_prismatic.py)."""
        ids = self.tokenizer(build_prompt(instruction)).input_ids
        empty = empty_piece_id(self.tokenizer)
        return ids if ids[-1] == empty else ids + [empty]

    @torch.inference_mode()
    def generate(self, pixel_values, prompts: list[list[int]], max_new_tokens: int):
        """Greedy KV-cached decoding of B prompts of any lengths in one batch -> (B, max_new_tokens) ids. Rows are
        left-padded *after* the multimodal embedding ([pad.., BOS, patches, text]) so every row's next token lands in
        one column; positions restart at 0 on each BOS, padded keys are masked: each row equals its unbatched result."""
        device = self.projector.fc1.weight.device
        B, lengths, T = len(prompts), [len(p) for p in prompts], max(len(p) for p in prompts)
        ids = torch.tensor([p + [self.config.pad_token_id] * (T - len(p)) for p in prompts], device=device)
        x = self.embed(pixel_values.to(device), ids)  # (B, L, D), right-padded
        L = x.shape[1]
        padded = min(lengths) < T
        key_valid = None  # (B, L): False on left padding; only needed when prompt lengths differ
        position_ids = torch.arange(L, device=device)[None].expand(B, L)
        if padded:
            n_pad = torch.tensor([T - n for n in lengths], device=device)
            gather = (torch.arange(L, device=device)[None] - n_pad[:, None]) % L  # roll each row right by its padding
            x = x.gather(1, gather[..., None].expand_as(x))
            key_valid = torch.arange(L, device=device)[None] >= n_pad[:, None]
            position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)

        llm, cfg, out = self.language_model, self.config.llm, []
        cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads or cfg.num_attention_heads,
                        L + max_new_tokens, cfg.hidden_size // cfg.num_attention_heads, x.dtype, device)
        for step in range(max_new_tokens):
            mask = attention_bias(key_valid, x.shape[1]) if padded else None  # prefill: all L queries; then one
            next_id = llm.lm_head(llm.model(x, position_ids, mask, cache)[:, -1]).argmax(-1)  # (B,), greedy
            out.append(next_id)
            x, position_ids = llm.model.embed_tokens(next_id)[:, None], position_ids[:, -1:] + 1
            if padded:
                key_valid = torch.cat([key_valid, key_valid.new_ones(B, 1)], dim=1)
        return torch.stack(out, dim=1).cpu()

    def predict_actions(self, images, instructions, unnorm_key=None, proprio=None, center_crop=True) -> np.ndarray:
        """B images and instructions -> (B, action_dim) un-normalized actions, float64, in one batched forward;
        unnorm_key: one key for all rows, or a list with one per row. An OFT model (action_head set) returns (B, chunk,
        action_dim) from one bidirectional pass instead: each image may be a list of cameras (third-person, then wrist),
        proprio holds B raw robot states, center_crop as OFT's eval flag (oft.predict_chunks)."""
        if len(images) != len(instructions) or not images:
            raise ValueError(f"got {len(images)} images and {len(instructions)} instructions; need as many, >= 1")
        keys = unnorm_key if isinstance(unnorm_key, (list, tuple)) else [unnorm_key] * len(images)
        keys = [resolve_unnorm_key(self.norm_stats, k) for k in keys]
        dims = {action_dim(self.norm_stats, k) for k in keys}
        if len(dims) != 1:
            raise ValueError(f"unnorm_keys {sorted(set(keys))} have different action dims {sorted(dims)}")
        if self.action_head is not None:
            return oft.predict_chunks(self, images, instructions, keys, proprio, center_crop)
        if proprio is not None:
            raise ValueError("proprio= is for OFT models (with an action_head--*_checkpoint.pt); this one has none")
        ids = self.generate(self.preprocess(images), [self.prompt_ids(s) for s in instructions], dims.pop())
        normalized = self.action_tokenizer.decode(ids.numpy())  # (B, action_dim) in [-1, 1]
        return np.stack([unnormalize_actions(row, self.norm_stats, k) for row, k in zip(normalized, keys)])

    def predict_action(self, image, instruction: str, unnorm_key: str | None = None, proprio=None) -> np.ndarray:
        """One image + instruction -> (action_dim,) action, as the original's predict_action(do_sample=False);
        an OFT model: image(s) [+ proprio] -> the (chunk, action_dim) chunk, as OFT's get_vla_action."""
        return self.predict_actions([image], [instruction], unnorm_key, None if proprio is None else [proprio])[0]

    @classmethod
    def build(cls, name_or_config="tiny", dtype=torch.float32, device="cpu", seed=0):
        """A model with random weights (any named config, no download) and the locally built text tokenizer."""
        cfg = CONFIGS[name_or_config] if isinstance(name_or_config, str) else name_or_config
        torch.manual_seed(seed)
        with torch.device(device):
            vla = cls(cfg)
        init_weights(vla)
        vla.to(dtype)
        vla.tokenizer = build_text_tokenizer()
        return vla.eval()

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", timm_overrides=None):
        """Load a released-layout OpenVLA directory, running no code from it and unpickling nothing. Built on meta, then
        each tensor is read, cast and assigned as its parameter: a bf16 checkpoint never exists as an fp32 copy."""
        import checkpoint  # imported here: checkpoint.py reads this file's configs

        path = Path(path)
        headers = checkpoint.read_weight_headers(path)
        config = checkpoint.read_config(path, headers, timm_overrides)
        tokenizer = checkpoint.load_text_tokenizer(path)  # fail on a missing tokenizer before allocating anything
        with torch.device("meta"):
            vla = cls(config)  # 1) shapes only
        checkpoint.check_state(headers, {k: v.shape for k, v in vla.state_dict().items()}, path)
        checkpoint.load_weights(vla, headers, dtype, device)  # 2) real numbers, straight from the files
        oft.load_heads(vla, path, dtype, device)  # 3) OFT's action head and proprio projector, if present
        vla.tokenizer, vla.tokenizer_dir = tokenizer, path
        return vla.eval()

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30):
        """Write the released layout (config.json, safetensors, tokenizer, processor files: checkpoint.py)."""
        import checkpoint

        checkpoint.save_pretrained(self, path, max_shard_bytes)


def init_weights(vla: VLA):
    """Fresh weights: truncated-normal-ish linear/conv weights (std 0.02), zero biases, unit norms, LayerScale 1e-5."""
    for name, p in vla.named_parameters():
        with torch.no_grad():
            if name.endswith("scale_factor"):
                p.fill_(1e-5)
            elif p.ndim == 1:
                p.fill_(1.0 if name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2] else 0.0)
            else:
                p.normal_(0.0, 0.02)
