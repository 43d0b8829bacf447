"""LoRA fine-tuning of an OpenVLA checkpoint on your own RLDS dataset, with LoRA written out (no peft).

    python finetune.py --config.checkpoint checkpoints/openvla-7b --config.data-root /data \
        --config.dataset-name my_robot --config.run-dir runs/my_robot
    torchrun --nproc-per-node 4 finetune.py ...                     # the same on several GPUs (FSDP2, as train.py)
    python serve.py --config.checkpoint runs/my_robot/merged --config.unnorm-key my_robot
    python finetune.py                                             # demo: adapt checkpoints/demo (python train.py)

REFERENCE.md 11. Each adapted linear layer computes y = W x + (alpha / r) * B (A x) with W frozen in bf16 (never copied
to fp32), A (r x in) ~ N(0, 1/r^2) and B (out x r) = 0, so training starts from exactly the checkpoint's outputs. Only
A and B train (fp32 master copies; FSDP gathers them in bf16 with everything else). Reused from train.py: the process
group, FSDP2 sharding + activation checkpointing, materializing shards from safetensors, the action metrics.

Differences from the original on purpose: the fine-tuning dataset's statistics go into the merged checkpoint's
config.json norm_stats and dataset_statistics.json (the original left the base model's in config.json); adapter
checkpoints carry the optimizer state and data position and resume exactly; peft 0.11.1's "all-linear" also put a
LoRA Conv2d on both ViTs' patch embeddings (their module is named `proj`) - we adapt linear layers only, lm_head
included (as that peft version did, its exclusion of the output layer never matched); adapters on modules that never
run (each ViT's last block, SigLIP's attention pool) are left out, as they would never train.
"""

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

import data
import demo
import train
from checkpoint import load_text_tokenizer, read_config, read_weight_headers
from model import VLA
from tokenizer import action_dim


@dataclass
class FinetuneConfig:
    checkpoint: Path = Path("checkpoints/demo")
    """the OpenVLA-layout checkpoint to adapt (openvla-7b, or what train.py exported)"""
    data_root: Path = Path("runs/demo_data")
    """directory of RLDS datasets (<data-root>/<dataset-name>/<version>/)"""
    dataset_name: str = "nanovla_demo"
    """your dataset (a key of data.py DATASETS); also the unnorm_key of the merged checkpoint"""
    run_dir: Path = Path("runs/finetune")
    """adapters/, metrics.jsonl, dataset_statistics.json and merged/ go here"""
    lora_rank: int = 32
    """r (the original's 32)"""
    lora_alpha: float | None = None
    """scale numerator; None: min(r, 16) as the original (scale 0.5 at r = 32)"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input (the original's 0.0)"""
    lora_targets: Literal["all-linear", "llm", "attention"] = "all-linear"
    """which linear layers get adapters: every one that runs (the original's), the Llama decoder + lm_head only, or
    the attention projections only (ViT qkv/proj, Llama q/k/v/o)"""
    batch_size: int = 16
    """examples per forward on one device (the original's 16)"""
    grad_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    learning_rate: float = 5e-4
    """constant, no schedule (the original's)"""
    weight_decay: float = 0.01
    """AdamW weight decay on the adapters (torch's default, which the original used)"""
    max_steps: int = 200_000
    """optimizer steps"""
    save_every: int = 5000
    """adapter checkpoint (+ optimizer, data position) every this many steps, and at the end"""
    keep_last: int = 1
    """adapter checkpoints kept (the original keeps the latest only)"""
    image_aug: bool = True
    """random crop + colour jitter (the original's default for fine-tuning; serve with center crop)"""
    shuffle_buffer_size: int = 100_000
    """frames in the shuffle buffer per rank"""
    activation_checkpointing: bool = True
    """recompute each block in backward (lets a 7B LoRA run fit smaller GPUs)"""
    resume: bool = False
    """continue from the latest adapter checkpoint in <run-dir>/adapters, exactly"""
    seed: int = 7
    """seed of the adapters' initialization, dropout and the data stream"""
    log_every: int = 10
    """sync, print and record metrics every this many steps"""


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))). merge() folds scale * B @ A into the base weight; unmerge() takes it out."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, device=base.weight.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))  # (out, r)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def weight(self):  # model.py reads projector.fc1.weight.dtype for the input cast
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale

    def delta(self):  # (out, in), fp32
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self):
        self.base.weight += self.delta().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.base.weight -= self.delta().to(self.base.weight.dtype)
        self.merged = False


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


def base_name(name: str) -> str | None:
    """Parameter name in the checkpoint: "x.q_proj.base.weight" -> "x.q_proj.weight"; adapters -> None."""
    return None if name.endswith(("lora_A", "lora_B")) else name.replace(".base.", ".")


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------------------------------------------
# Adapter checkpoints: small safetensors, written by rank 0 into a temporary directory, renamed when complete


def save_adapters(run_dir: Path, step: int, vla, optimizer, dataset, config: FinetuneConfig):
    from safetensors.torch import save_file

    named = [(n, p) for n, p in vla.named_parameters() if p.requires_grad]
    adapters = {n: full(p.detach()).cpu() for n, p in named}  # all-gathers: every rank takes part
    moments = {f"{n}.{k}": full(optimizer.state[p][k]).cpu() for n, p in named if optimizer.state[p]
               for k in ("exp_avg", "exp_avg_sq")}
    opt_step = float(optimizer.state[named[0][1]]["step"]) if optimizer.state[named[0][1]] else 0.0
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"data": dataset.state_dict(), "torch_rng": torch.get_rng_state().tolist()})
    path = run_dir / "adapters" / f"step-{step:06d}"
    if dist.get_rank() == 0:
        tmp = path.with_name(f".tmp-{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(adapters, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_file(moments, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        adapter_config = {"base_checkpoint": str(config.checkpoint), "r": config.lora_rank,
                          "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                          "target_modules": config.lora_targets}
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer_step": opt_step,
                                                            "ranks": per_rank}) + "\n")
        tmp.rename(path)
        for old in sorted(path.parent.glob("step-*"))[:-config.keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return path


def load_adapters(path: Path, vla, optimizer, dataset) -> int:
    from safetensors.torch import load_file

    adapters, moments = load_file(str(path / "adapter_model.safetensors")), load_file(str(path / "optimizer.safetensors"))
    state = json.loads((path / "trainer_state.json").read_text())
    if len(state["ranks"]) != dist.get_world_size():
        raise ValueError(f"{path} was written by {len(state['ranks'])} ranks; resume with the same number")
    shard = lambda t, p: distribute_tensor(t.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)  # noqa: E731
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if p.requires_grad:
                p.to_local().copy_(shard(adapters[n], p).to_local())
                if f"{n}.exp_avg" in moments:
                    optimizer.state[p] = {"step": torch.tensor(state["optimizer_step"]),
                                          "exp_avg": shard(moments[f"{n}.exp_avg"], p),
                                          "exp_avg_sq": shard(moments[f"{n}.exp_avg_sq"], p)}
    mine = state["ranks"][dist.get_rank()]
    dataset.load_state_dict(mine["data"])
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    return state["step"]


def export_merged(vla, config: FinetuneConfig, model_config, tokenizer, norm_stats) -> Path | None:
    """W + (alpha / r) B A for every adapted layer, in the checkpoint's bf16, written in the released layout."""
    state = get_model_state_dict(vla, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
    if dist.get_rank() != 0:
        return None
    scale = (config.lora_alpha) / config.lora_rank
    merged = {}
    for name, t in state.items():
        if base_name(name) is None:
            continue
        if name.endswith(".base.weight"):
            prefix = name.removesuffix(".base.weight")
            delta = scale * (state[f"{prefix}.lora_B"].float() @ state[f"{prefix}.lora_A"].float())
            t = (t.float() + delta).to(t.dtype)
        merged[base_name(name)] = t
    with torch.device("meta"):
        out = VLA(replace(model_config, norm_stats=norm_stats))
    out.load_state_dict(merged, strict=True, assign=True)
    out.tokenizer, out.tokenizer_dir = tokenizer, config.checkpoint
    path = config.run_dir / "merged"
    out.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------


def main(config: FinetuneConfig) -> dict:
    """Fine-tune adapters, save them, write the merged checkpoint; returns {"step", "history", "merged",
    "trainable", "total", "model" (the adapted, sharded model)}."""
    rank, world, device = train.setup_distributed()
    is_main = rank == 0
    if config.lora_alpha is None:
        config = replace(config, lora_alpha=float(min(config.lora_rank, 16)))
    headers = read_weight_headers(config.checkpoint)
    model_config, tokenizer = read_config(config.checkpoint, headers), load_text_tokenizer(config.checkpoint)
    if config.dataset_name == "nanovla_demo" and not (config.data_root / "nanovla_demo").exists():
        if is_main:
            demo.make_demo(config.data_root)
        dist.barrier()
    dataset = data.RLDSDataset(config.data_root, config.dataset_name, tokenizer,
                               image_size=model_config.vision[0].image_size, image_norm=model_config.image_norm,
                               train=True, image_aug=config.image_aug, shuffle_buffer_size=config.shuffle_buffer_size,
                               seed=config.seed, rank=rank, world=world)
    # the model emits one token per action dimension: a dataset with another dimension cannot reuse this head
    new_dim = action_dim(dataset.norm_stats, config.dataset_name)
    dims = {k: action_dim(model_config.norm_stats, k) for k in model_config.norm_stats}
    if dims and new_dim not in dims.values():
        raise ValueError(f"{config.dataset_name} has {new_dim}-dim actions but {config.checkpoint} was trained on "
                         f"{sorted(set(dims.values()))}-dim actions ({dims}); fine-tune a checkpoint with the same "
                         f"action dimension, or convert the dataset's actions")
    found = sorted((config.run_dir / "adapters").glob("step-*"))
    if found and not config.resume:
        raise SystemExit(f"{config.run_dir} already has adapters ({found[-1].name}); pass --config.resume, or choose "
                         "another --config.run-dir")

    with torch.device("meta"):
        vla = VLA(model_config).to(torch.bfloat16)  # base weights: bf16 shards, exactly as stored, never fp32
    vla.tokenizer = tokenizer
    for p in vla.parameters():
        p.requires_grad_(False)
    add_lora(vla, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)  # fp32 A, B
    train.shard(vla, train.init_device_mesh(device.type, (world,)), bf16=True, checkpointing=config.activation_checkpointing)
    base = train.from_checkpoint(vla, config.checkpoint, headers, rename=base_name)

    def fill(i, name, shape, rows):
        if name.endswith("lora_A"):  # peft's "gaussian" init: N(0, (1 / r)^2), drawn in full: any world size, same A
            torch.manual_seed(config.seed * 100_003 + i)
            return (torch.randn(shape) / config.lora_rank)[rows[0]:rows[1]]
        if name.endswith("lora_B"):
            return torch.zeros(rows[1] - rows[0], *shape[1:])
        return base(i, name, shape, rows)

    train.materialize(vla, device, fill)
    vla.train()
    adapters = [p for p in vla.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in adapters), sum(p.numel() for p in vla.parameters())
    optimizer = torch.optim.AdamW(adapters, lr=config.learning_rate, weight_decay=config.weight_decay)
    step = 0
    if config.resume and found:
        step = load_adapters(found[-1], vla, optimizer, dataset)
    norm_stats = {**model_config.norm_stats, **dataset.norm_stats}  # the new key joins the checkpoint's own
    if is_main:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        data.save_dataset_statistics(dataset.norm_stats, config.run_dir / "dataset_statistics.json")
        print(f"LoRA r={config.lora_rank} alpha={config.lora_alpha} on {config.lora_targets}: {trainable:,} trainable "
              f"of {total:,} parameters ({100 * trainable / total:.2f}%)" + (f"; resumed at step {step}" if step else ""))

    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=data.collate))
    decode_table = train.decode_table(vla, model_config, device)
    window, history, t_log, A = torch.zeros(6, dtype=torch.float64, device=device), [], time.perf_counter(), config.grad_accumulation_steps
    while step < config.max_steps:
        for micro in range(A):
            batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
            vla.set_requires_gradient_sync(micro == A - 1)  # reduce the adapters' gradients once per step
            out = vla(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                      supervised_logits_only=True)
            (out.loss / A).backward()  # mean over micro-batches, as train.py
            window += train.action_metrics(out, batch["labels"], vla.action_tokenizer.begin_idx, decode_table)
        optimizer.step()  # no clipping and no schedule, as the original
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last = step == config.max_steps
        if step % config.log_every == 0 or last:
            dist.all_reduce(window)
            s = window.tolist()
            metrics = {"step": step, "loss": s[0] / s[4], "action_accuracy": s[1] / max(s[2], 1),
                       "l1_loss": s[3] / max(s[2], 1), "samples_per_s": s[5] / (time.perf_counter() - t_log)}
            if not math.isfinite(metrics["loss"]):
                raise SystemExit(f"non-finite loss by step {step}; stopping (adapter checkpoints are in "
                                 f"{config.run_dir / 'adapters'})")
            history.append(metrics)
            window.zero_()
            t_log = time.perf_counter()
            if is_main:
                print(f"step {step}/{config.max_steps} | loss {metrics['loss']:.4f} | acc "
                      f"{metrics['action_accuracy']:.3f} | l1 {metrics['l1_loss']:.4f} | "
                      f"{metrics['samples_per_s']:.1f} samples/s", flush=True)
                with open(config.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
        if step % config.save_every == 0 or last:
            save_adapters(config.run_dir, step, vla, optimizer, dataset, config)

    merged = export_merged(vla, config, model_config, tokenizer, norm_stats)
    if is_main:
        print(f"merged checkpoint: {merged} (python serve.py --config.checkpoint {merged} "
              f"--config.unnorm-key {config.dataset_name})")
    dist.barrier()
    return {"step": step, "history": history, "merged": merged, "trainable": trainable, "total": total, "model": vla}


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
    dist.destroy_process_group()
