"""LoRA fine-tuning of an OpenVLA checkpoint on your RLDS dataset, LoRA written out (no peft), in train.py's loop:
train.py's flags (--config.*; the fine-tuning recipes below fill what you leave unset), plus --lora.*.

    python finetune.py            # demo: teach checkpoints/demo (python train.py) a mirrored camera, in minutes
    python finetune.py --config.init-from checkpoints/openvla-7b --config.data-root /data \
        --config.data-mix my_robot --config.run-dir runs/my_robot      # the original's recipe: 200k steps
    python finetune.py ... --config.action-head l1 --config.wrist    # OFT: adapters + a new L1 head and projector
    torchrun --nproc-per-node 4 finetune.py ...                      # the same on several GPUs (FSDP2, as train.py)
    python serve.py --config.checkpoint runs/my_robot/merged --config.unnorm-key my_robot

Each adapted linear layer computes y = W x + (alpha / r) * B (A x), W frozen in bf16, A ~ N(0, 1/r^2), B = 0: training
starts from the checkpoint's outputs (the original's vla-scripts/finetune.py, via peft). Only A and B train (fp32); all
else is train.main, whose checkpoints hold the adapters and whose export merges them in. Unlike the original: the new
dataset's statistics go into the merged config.json; peft's "all-linear" also adapted the ViTs' patch-embedding convs,
we adapt linear layers only (lm_head included), none that never run.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import demo
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
    """linear layers adapted: every one that runs (the original's), the Llama's + lm_head, or attention's only"""


# None fields take these, then train.py's openvla-7b recipe's (constant lr); "original" is vla-scripts/finetune.py's
RECIPES = {
    "original": dict(per_device_batch_size=16, learning_rate=5e-4, max_steps=200_000, save_every=5000, image_aug=True,
                     shuffle_buffer_size=100_000, activation_checkpointing=True, bf16=True),
    "demo": dict(per_device_batch_size=8, learning_rate=3e-3, schedule="warmup+cosine", warmup_ratio=0.03,
                 max_steps=600, save_every=200, image_aug=False, shuffle_buffer_size=10_000, chunk=2,
                 activation_checkpointing=False, bf16=False),  # CPU: fp32; a mirrored camera in minutes (README)
}
DEMO = Path("checkpoints/demo")  # what python train.py exports
# train.py's config with fine-tuning's constants: AdamW's default decay, no clipping
FINETUNE = train.TrainConfig(init_from=DEMO, data_root=Path("runs/demo_data_mirrored"), run_dir=Path("runs/finetune"),
                             weight_decay=0.01, max_grad_norm=math.inf, keep_last=1)


def merge_weight(weight, lora_A, lora_B, scale: float):
    """W + scale * B @ A, added in fp32 and rounded once to W's dtype: the one merge, of merge() and the export."""
    return (weight.float() + scale * (lora_B.float() @ lora_A.float())).to(weight.dtype)


class LoRALinear(nn.Module):
    """A linear layer + scale * B(A(dropout(x))), keeping weight and bias under their names: only lora_A / B are new."""

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
        return y if self.merged else y + F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)),
                                                  self.lora_B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def merge(self):
        self.weight.copy_(merge_weight(self.weight, self.lora_A, self.lora_B, self.scale))
        self.merged = True


TARGETS = {"all-linear": lambda name: True, "llm": lambda name: name.startswith("language_model."),
           "attention": lambda name: ".attn." in name or ".self_attn." in name}  # ViT qkv / proj, Llama q/k/v/o_proj


def add_lora(vla: VLA, rank: int, alpha: float, dropout: float, targets: str = "all-linear") -> list[str]:
    """Wrap the targeted nn.Linear modules that run in LoRALinear (in place); returns the wrapped module names."""
    unused = set(vla.unused_parameter_names())
    names = [n for n, m in vla.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" not in unused
             and TARGETS[targets](n)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(vla.get_submodule(parent), child, LoRALinear(vla.get_submodule(name), rank, alpha, dropout))
    return names


def merged_state(state: dict, scale: float) -> dict:
    """The release's state dict from the adapted model's: every adapted weight merged, the adapters dropped."""
    lora = lambda name, x: state.get(f"{name.removesuffix('.weight')}.lora_{x}")  # noqa: E731
    return {name: t if lora(name, "A") is None else merge_weight(t, lora(name, "A"), lora(name, "B"), scale)
            for name, t in state.items() if not name.endswith(("lora_A", "lora_B"))}


def main(config: train.TrainConfig = FINETUNE, lora: LoRAConfig = LoRAConfig()) -> dict:
    """Fine-tune adapters with train.main and export the merged checkpoint (<run-dir>/merged); returns train.main's
    result, on the demo (rank 0) with "success" {"before", "after" (mirrored camera), "original" (after)}."""
    is_demo = config.init_from == DEMO and config.data_mix == "nanovla_demo"  # python finetune.py
    episodes, alpha = config.eval_episodes, lora.alpha or min(lora.rank, 16)
    recipe = {k: v for k, v in RECIPES["demo" if is_demo else "original"].items() if getattr(config, k) is None}
    config = replace(config, export_dir=config.export_dir or config.run_dir / "merged", eval_episodes=0, **recipe)
    rank = train.setup_distributed()[0]
    if is_demo:  # the demo policy, and the mirrored world it never saw, written once like the demo data
        if not (DEMO / "config.json").exists():
            raise SystemExit(f"no demo policy in {DEMO}: train it first with python train.py (minutes on a CPU)")
        if rank == 0 and config.data_root == FINETUNE.data_root and not (config.data_root / "nanovla_demo").exists():
            demo.make_demo(config.data_root, mirrored=True)  # once
        dist.barrier()
        before = train.demo_success(DEMO, episodes, mirrored=True)[0] if rank == 0 and episodes else None

    def adapt(vla):
        vla.to(torch.bfloat16).requires_grad_(False)  # the base weights: bf16 shards, as stored, never fp32
        names = add_lora(vla, lora.rank, alpha, lora.dropout, lora.targets)  # fp32 A, B
        return {f"{n}.lora_{x}": init for n in names for x in "AB"}

    def init(i, name, shape, rows):  # peft's "gaussian" A ~ N(0, (1 / r)^2), drawn in full: any world size; B = 0
        if name.endswith("lora_B"):
            return torch.zeros(rows[1] - rows[0], *shape[1:])
        torch.manual_seed(config.seed * 100_003 + i)
        return (torch.randn(shape) / lora.rank)[rows[0]:rows[1]]

    result = train.main(config, adapt=adapt, merge=lambda state: merged_state(state, alpha / lora.rank))
    if is_demo and rank == 0 and episodes:
        after, original = (train.demo_success(result["export"], episodes, mirrored=m)[0] for m in (True, False))
        result["success"] = {"before": before, "after": after, "original": original}
        print(f"closed-loop success over {episodes} episodes, mirrored camera: {before:.0%} before, {after:.0%} after "
              f"fine-tuning; original camera after: {original:.0%}. Serve it: python serve.py --config.checkpoint "
              f"{result['export']}")
    return result


if __name__ == "__main__":
    train.cli(main)
