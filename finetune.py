"""LoRA fine-tuning of an OpenVLA checkpoint on your own RLDS dataset, with LoRA written out (no peft), run by
train.py's loop.

    python finetune.py --config.init-from checkpoints/openvla-7b --config.data-root /data \
        --config.data-mix my_robot --config.run-dir runs/my_robot --lora.rank 32
    torchrun --nproc-per-node 4 finetune.py ...                     # the same on several GPUs (FSDP2, as train.py)
    python serve.py --config.checkpoint runs/my_robot/merged --config.unnorm-key my_robot
    python finetune.py                                             # demo: adapt checkpoints/demo (python train.py)

Each adapted linear layer computes y = W x + (alpha / r) * B (A x) with W frozen in bf16 (never copied to fp32),
A (r x in) ~ N(0, 1/r^2) and B (out x r) = 0, so training starts from exactly the checkpoint's outputs (the original's
vla-scripts/finetune.py, through peft). Only A and B train (fp32 master copies; FSDP gathers them in bf16 with the
rest). All else is train.main: process group, FSDP2 sharding, rank-local checkpoint reads, accumulation, metrics,
the non-finite stop, checkpoints that resume exactly (holding what trains: adapters and their optimizer state) and
the released-layout export, here with the adapters merged in. So the flags are train.py's (--config.*, with the
fine-tuning recipe below as defaults), plus --lora.*.

Differences from the original on purpose: the new dataset's statistics go into the merged config.json too (the
original kept the base model's there); peft 0.11.1's "all-linear" also put a LoRA Conv2d on the ViTs' patch embeddings
(named `proj`): we adapt linear layers only, lm_head included (as peft did), and none on modules that never run.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import train
from model import VLA


@dataclass
class LoRAConfig:
    rank: int = 32
    """r (the original's 32)"""
    alpha: float | None = None
    """scale numerator; None: min(r, 16) as the original (scale 0.5 at r = 32)"""
    dropout: float = 0.0
    """dropout on the adapter's input (the original's 0.0)"""
    targets: Literal["all-linear", "llm", "attention"] = "all-linear"
    """which linear layers get adapters: every one that runs (the original's), the Llama decoder + lm_head only, or
    the attention projections only (ViT qkv/proj, Llama q/k/v/o)"""


# train.py's config with the original's fine-tuning recipe (vla-scripts/finetune.py): batch 16 per device, constant
# lr 5e-4, AdamW's default weight decay, no clipping, augmentation on; the export is <run-dir>/merged.
FINETUNE = train.TrainConfig(
    init_from=Path("checkpoints/demo"), run_dir=Path("runs/finetune"), per_device_batch_size=16, learning_rate=5e-4,
    schedule="constant", weight_decay=0.01, max_grad_norm=math.inf, max_steps=200_000, save_every=5000, keep_last=1,
    image_aug=True, shuffle_buffer_size=100_000, activation_checkpointing=True, bf16=True, eval_episodes=0)


def merge_weight(weight, lora_A, lora_B, scale: float):
    """W + scale * B @ A, added in fp32 and rounded once to W's dtype: the one merge, of merge() and the export."""
    return (weight.float() + scale * (lora_B.float() @ lora_A.float())).to(weight.dtype)


class LoRALinear(nn.Module):
    """A linear layer + scale * B(A(dropout(x))); it keeps the layer's weight and bias under their own names, so the
    checkpoint's "x.q_proj.weight" loads as is and only lora_A / lora_B are new."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def merge(self):
        self.weight.copy_(merge_weight(self.weight, self.lora_A, self.lora_B, self.scale))
        self.merged = True


def is_target(name: str, targets: str) -> bool:
    if targets == "all-linear":
        return True
    if targets == "llm":
        return name.startswith("language_model.")
    return ".attn." in name + "." or ".self_attn." in name  # attention: ViT qkv / proj, Llama q / k / v / o_proj


def add_lora(vla: VLA, rank: int, alpha: float, dropout: float, targets: str = "all-linear") -> list[str]:
    """Wrap the targeted nn.Linear modules that run in LoRALinear (in place); returns the wrapped module names."""
    unused = set(vla.unused_parameter_names())
    names = [n for n, m in vla.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" not in unused
             and is_target(n, targets)]
    for name in names:
        parent, child = vla.get_submodule(name.rsplit(".", 1)[0]) if "." in name else vla, name.rsplit(".", 1)[-1]
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def lora_init(seed: int, rank: int):
    """train.materialize's read_rows for the adapters: peft's "gaussian" A ~ N(0, (1 / r)^2), drawn in full so any
    world size gets the same A, and B = 0."""
    def read_rows(i, name, shape, rows):
        if name.endswith("lora_B"):
            return torch.zeros(rows[1] - rows[0], *shape[1:])
        torch.manual_seed(seed * 100_003 + i)
        return (torch.randn(shape) / rank)[rows[0]:rows[1]]
    return read_rows


def merged_state(state: dict, scale: float) -> dict:
    """The release's state dict from the adapted model's: every adapted weight merged, the adapters dropped."""
    out = {}
    for name, t in state.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A" in state:
            t = merge_weight(t, state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"], scale)
        if not name.endswith(("lora_A", "lora_B")):
            out[name] = t
    return out


def main(config: train.TrainConfig = FINETUNE, lora: LoRAConfig = LoRAConfig()) -> dict:
    """Fine-tune adapters with train.main and export the merged checkpoint; returns train.main's result."""
    alpha = float(min(lora.rank, 16)) if lora.alpha is None else lora.alpha
    config = replace(config, export_dir=config.export_dir or config.run_dir / "merged")

    def adapt(vla):
        vla.to(torch.bfloat16)  # the base weights: bf16 shards, exactly as stored, never fp32
        for p in vla.parameters():
            p.requires_grad_(False)
        names = add_lora(vla, lora.rank, alpha, lora.dropout, lora.targets)  # fp32 A, B
        if dist.get_rank() == 0:
            print(f"LoRA r={lora.rank} alpha={alpha} on {len(names)} {lora.targets} layers")
        return {f"{n}.lora_{x}": lora_init(config.seed, lora.rank) for n in names for x in "AB"}

    return train.main(config, adapt=adapt, merge=lambda state: merged_state(state, alpha / lora.rank))


if __name__ == "__main__":
    train.cli(main)
