"""Full VLA training with raw torch FSDP2: bf16 compute, fp32 master weights, activation checkpointing, accumulation,
sharded checkpoints that resume exactly, and an export in the released OpenVLA layout. finetune.py runs this loop.

    python train.py                 # laptop demo: tiny model on the demo task (CPU, < 10 min) -> checkpoints/demo
    torchrun --nproc-per-node 2 train.py --config.max-steps 50       # the same loop, 2 processes (gloo on CPU)
    torchrun --nproc-per-node 8 train.py --config.global-batch-size 256 --config.data-root /data/oxe \
        --config.data-mix bridge_orig --config.init-from checkpoints/openvla-7b --config.run-dir runs/bridge
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 train.py ...  # many nodes
        ... --config.shard-group-size 8               # HSDP: shard within each node, replicate across nodes
    ... --config.resume                               # continue a killed run exactly (same losses)

One step (the original's prismatic/training/strategies/base_strategy.py): lr(step) -> A micro-batches of forward +
backward(loss / A), reduce-scatter on the last -> clip the global grad norm -> AdamW on this rank's fp32 shard -> log.
bf16: shards, AdamW state, reduced grads, clipping and the step are fp32; FSDP gathers a bf16 copy of each block for
its forward and backward; model.py casts the logits to fp32 for the loss.
"""

import json
import math
import os
import resource
import shutil
import sys
import time
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.checkpoint.state_dict import set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import data
import demo
import oft
from checkpoint import CheckpointError, check_state, load_text_tokenizer, read_config, read_tensor, read_weight_headers
from model import CONFIGS, VLA, init_weights
from tokenizer import IGNORE_INDEX, action_dim, build_text_tokenizer


@dataclass
class TrainConfig:
    model: Literal["tiny", "mid", "openvla-7b"] | None = None
    """architecture with random weights, and the recipe below; None: tiny, or init-from's with the openvla-7b recipe"""
    init_from: Path | None = None
    """an OpenVLA-layout directory (e.g. checkpoints/openvla-7b) whose weights start the run"""
    data_root: Path = Path("runs/demo_data")
    """directory of RLDS datasets (<data-root>/<name>/<version>/); the demo task is written here on first run"""
    data_mix: str = "nanovla_demo"
    """a dataset, a mixture (data.py MIXTURES) or "name:weight,...", e.g. bridge_orig, oxe_magic_soup_plus_minus"""
    run_dir: Path = Path("runs/demo")
    """checkpoints/, metrics.jsonl and train_config.json go here"""
    export_dir: Path | None = None
    """the released-layout checkpoint written at the end; None: checkpoints/demo (the demo), else <run-dir>/export"""
    global_batch_size: int | None = None
    """examples per optimizer step over all ranks; None: per-device x world, or the recipe's (16 demo, 2048 7b)"""
    per_device_batch_size: int | None = None
    """examples per forward on one rank; accumulation = global / (per-device x world); None: global / world"""
    learning_rate: float | None = None
    """peak learning rate; None: the recipe's (2e-5 for openvla-7b)"""
    schedule: Literal["constant", "warmup+cosine"] | None = None
    """constant (the original's), or linear warmup then cosine decay to 0; None: the recipe's"""
    warmup_ratio: float | None = None
    """share of the steps spent warming up (warmup+cosine only)"""
    weight_decay: float | None = None
    """AdamW weight decay on matrices (biases, norms and 1-d params get none); None: the recipe's (0.0)"""
    max_grad_norm: float = 1.0
    """clip the global gradient L2 norm to this (the original's 1.0)"""
    max_steps: int | None = None
    """optimizer steps to train; None: from epochs"""
    epochs: int | None = None
    """passes over the mixture's length (data.py dataset_length) when max-steps is None"""
    freeze_vision: bool = False
    """freeze both ViTs (the original's "vla-train" stage: projector + LLM train)"""
    freeze_llm: bool = False
    """freeze the Llama decoder, embeddings and lm_head (projector, and vision unless frozen, train)"""
    shard_group_size: int = 0
    """HSDP (the original's HYBRID_SHARD): shard within groups of this many ranks (GPUs per node), replicate across"""
    activation_checkpointing: bool | None = None
    """recompute each ViT block and decoder layer in backward instead of storing its activations"""
    bf16: bool | None = None
    """bf16 compute, fp32 master weights and gradient reduce; False: fp32 compute (the CPU demo's: no fast bf16)"""
    image_aug: bool | None = None
    """the original's random crop and colour jitter; None: the recipe's (off for pretraining, on for fine-tuning)"""
    shuffle_buffer_size: int | None = None
    """frames in the shuffle buffer per rank; None: the recipe's (256_000 for openvla-7b)"""
    save_every: int | None = None
    """write a sharded checkpoint every this many steps (and at the end)"""
    keep_last: int = 2
    """checkpoints kept in <run-dir>/checkpoints (older ones are deleted once a newer one is complete)"""
    resume: bool = False
    """continue from the latest checkpoint in <run-dir>/checkpoints: weights, optimizer, step, data position, RNG"""
    export_only: bool = False
    """with resume: write the export from the latest checkpoint and stop"""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the exported weights (the release is bfloat16)"""
    seed: int = 7
    """seed of the initialization and of the data stream (the original's 7)"""
    log_every: int = 10
    """sync, print and record metrics every this many steps"""
    eval_episodes: int = 50
    """closed-loop demo episodes after training (demo task only; 0: skip)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (wandb is imported only when set)"""
    action_head: Literal["tokens", "l1"] = "tokens"
    """tokens: OpenVLA's autoregressive action tokens; l1: OFT's chunk from one bidirectional pass, MLP head, L1"""
    chunk: int | None = None
    """actions per chunk with action-head l1 (OFT's NUM_ACTIONS_CHUNK, 8 for LIBERO); None: the recipe's"""
    wrist: bool | None = None
    """with action-head l1: the wrist camera as a second image (the dataset's oxe.Layout names it); None: on for the
    demo (its second camera, demo.second_view), off elsewhere"""
    proprio: bool = True
    """with action-head l1: the robot state, normalized, as one more input token (OFT's use_proprio)"""


# None fields take these values: openvla-7b's is the original's (prismatic/conf/vla.py); tiny's trains the demo.
RECIPES = {
    "openvla-7b": dict(global_batch_size=2048, learning_rate=2e-5, schedule="constant", warmup_ratio=0.0,
                       weight_decay=0.0, epochs=1000, activation_checkpointing=True, shuffle_buffer_size=256_000,
                       save_every=2500, bf16=True, image_aug=False, chunk=8),
    "tiny": dict(global_batch_size=16, learning_rate=2e-3, schedule="warmup+cosine", warmup_ratio=0.03,
                 weight_decay=0.0, max_steps=1000, activation_checkpointing=False, shuffle_buffer_size=10_000,
                 save_every=200, export_dir=Path("checkpoints/demo"), bf16=False, image_aug=False, chunk=2),
}  # the demo's episodes are 2-3 steps long: a chunk of 2 (OFT's pipeline drops frames whose chunk runs past the end)
RECIPES["mid"] = RECIPES["openvla-7b"]


def resolve(config: TrainConfig, world: int) -> tuple[TrainConfig, int]:
    """Fill None fields from the recipe and check the batch arithmetic -> (config, accumulation steps)."""
    if config.global_batch_size is None and config.per_device_batch_size:
        config = replace(config, global_batch_size=config.per_device_batch_size * world)
    recipe = RECIPES[config.model or ("openvla-7b" if config.init_from else "tiny")]
    if config.action_head == "l1" and config.run_dir == TrainConfig.run_dir:  # the demo's OFT twin, beside it
        config = replace(config, run_dir=Path("runs/demo-oft"))
        recipe = {**recipe, "export_dir": Path("checkpoints/demo-oft")}
    if config.wrist is None:
        config = replace(config, wrist=config.action_head == "l1" and config.data_mix == "nanovla_demo")
    if config.action_head == "tokens" and config.wrist:
        raise ValueError("--config.wrist needs --config.action-head l1 (OpenVLA's token head reads one image)")
    fill = {k: v for k, v in recipe.items() if getattr(config, k) is None and not (k == "epochs" and config.max_steps)}
    config = replace(config, **fill)
    if config.export_dir is None:
        config = replace(config, export_dir=config.run_dir / "export")
    if config.per_device_batch_size is None:
        if config.global_batch_size % world:
            raise ValueError(f"global-batch-size {config.global_batch_size} is not divisible by the world size {world}")
        config = replace(config, per_device_batch_size=config.global_batch_size // world)
    per_step = config.per_device_batch_size * world
    if config.global_batch_size % per_step:
        raise ValueError(f"global-batch-size {config.global_batch_size} is not divisible by per-device-batch-size "
                         f"{config.per_device_batch_size} x world size {world} = {per_step}; pick numbers that divide")
    if config.shard_group_size and (config.shard_group_size < 0 or world % config.shard_group_size):
        raise ValueError(f"shard-group-size {config.shard_group_size} does not divide the world size {world}; use a "
                         "divisor (e.g. the processes per node), or 0 to shard over all ranks")
    if config.export_only and not config.resume:
        raise ValueError("export-only writes the export of the latest checkpoint: pass --config.resume too")
    return config, config.global_batch_size // per_step


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """transformers' get_cosine_schedule_with_warmup (the original's warmup+cosine), or a constant."""
    lr, warmup = config.learning_rate, int(total * config.warmup_ratio)
    if config.schedule == "constant":
        return lr
    if step < warmup:
        return lr * step / warmup
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def setup_distributed():
    """-> (rank, world, device): torchrun's process group, else a 1-process one so the same FSDP code runs anywhere."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        alone = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)  # no torchrun
        dist.init_process_group("nccl" if cuda else "gloo", **alone)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # CPU: the cores shared among this machine's ranks, one left for TF's decode (oversubscribed OpenMP spins)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))
    return dist.get_rank(), dist.get_world_size(), device


def shard(vla: VLA, mesh, bf16: bool, checkpointing: bool):
    """FSDP2 per ViT block and decoder layer, then the root (embeddings, projector, lm_head, norms). Each ViT's unused
    last block stays in the root: a unit that never runs forward breaks FSDP's skipped-reduce accumulation."""
    mp = MixedPrecisionPolicy(torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    unused = {id(vla.get_parameter(name)) for name in vla.unused_parameter_names()}
    for block in vla.blocks():
        if not all(id(p) in unused for p in block.parameters()):
            # backward re-runs the block from its saved input (model.py run_block): one (B, T, D) tensor per block
            block.checkpointing = checkpointing
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(vla, mesh=mesh, mp_policy=mp)


def shard_rows(param) -> tuple[int, int]:
    """This rank's rows [start, stop) of an FSDP2 parameter: torch.chunk's split of dim 0 on each sharding mesh dim."""
    start, stop = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard():
            size, coord = param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim)
            chunk = -(-(stop - start) // size)
            start, stop = min(start + coord * chunk, stop), min(start + (coord + 1) * chunk, stop)
    return start, stop


def materialize(vla: VLA, device, read_rows):
    """Allocate this rank's shard of every parameter and fill it from read_rows(index, name, shape, (start, stop)) ->
    those rows of the full tensor on CPU: a rank reads only what it keeps, one parameter at a time."""
    vla.to_empty(device=device)
    with torch.no_grad():
        for i, (name, param) in enumerate(vla.named_parameters()):
            local = param.to_local()
            rows = read_rows(i, name, tuple(param.shape), shard_rows(param))
            if tuple(rows.shape) != tuple(local.shape):
                raise ValueError(f"{name}: got rows of shape {list(rows.shape)} for a shard of {list(local.shape)}")
            local.copy_(rows)


def random_init(seed: int):
    """read_rows for materialize: model.py's init, seeded per parameter on the full tensor: any world size agrees."""
    def read_rows(i, name, shape, rows):
        full = torch.empty(shape)
        torch.manual_seed(seed * 100_003 + i)
        init_weights(types.SimpleNamespace(named_parameters=lambda: [(name, full)]))  # init_weights walks only this
        return full[rows[0]:rows[1]]
    return read_rows


BATCH_KEYS = ("pixel_values", "input_ids", "attention_mask", "labels", "proprio", "actions")  # VLA.forward's inputs


@torch.no_grad()
def action_metrics(out, batch, begin_idx: int, decode) -> torch.Tensor:
    """The original's metrics (prismatic/training/strategies/base_strategy.py) as device-side sums: [loss, correct
    action tokens, action tokens, L1 of de-tokenized actions, 1 micro-batch, examples]; OFT's chunks: no accuracy,
    the L1 of each normalized action value."""
    labels = batch["labels"]
    if out.logits.ndim == 3:  # (B, chunk, action_dim)
        error = (out.logits.float() - batch["actions"].float()).abs()
        correct, mask, l1 = error.new_tensor(0), error.new_tensor(error.numel()), error.sum()
    else:
        gt = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]  # (N,) in the logits' row order
        preds, mask = out.logits.argmax(-1), gt > begin_idx  # action tokens: not EOS, not prompt
        correct, l1 = ((preds == gt) & mask).sum(), (decode[preds] - decode[gt]).abs()[mask].sum()
    n = [out.loss.detach(), correct, mask.sum(), l1, l1.new_tensor(1), l1.new_tensor(len(labels))]
    return torch.stack([x.double() for x in n])


# Checkpoints: DCP shards under a temporary name, renamed when complete. Frozen parameters are the init's, which a
# resume materializes again, so they are not saved (a LoRA checkpoint: adapters, their AdamW state, step, data, RNG).
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))  # complete ones only: .tmp-* never matches


def save_checkpoint(run_dir: Path, step: int, vla, optimizer, dataset, keep_last: int):
    rank = dist.get_rank()
    tmp, final = run_dir / "checkpoints" / f".tmp-step-{step:06d}", run_dir / "checkpoints" / f"step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    dist.barrier()
    model_state, optim_state = get_state_dict(vla, optimizer, options=TRAINED_ONLY)
    dcp.save({"model": model_state, "optimizer": optim_state, "step": step,
              f"rank{rank}": rank_state(dataset)}, checkpoint_id=tmp)  # every rank writes its own shard files
    dist.barrier()
    if rank == 0:
        tmp.rename(final)  # atomic: a checkpoint directory named step-* is always complete
        for old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def rank_state(dataset) -> dict:
    """What differs per rank: its data-stream position and its RNG states (under a per-rank key in the checkpoint)."""
    state = {"data": dataset.state_dict(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def load_checkpoint(found: list[Path], vla, optimizer, dataset) -> int:
    """Restore the newest checkpoint; one that cannot be read is named, with the way to the one before it."""
    rank, path = dist.get_rank(), found[-1]
    model_state, optim_state = get_state_dict(vla, optimizer, options=TRAINED_ONLY)
    state = {"model": model_state, "optimizer": optim_state, "step": 0, f"rank{rank}": rank_state(dataset)}
    try:
        dcp.load(state, checkpoint_id=path)  # fills the tensors in place, each rank reads the slices it owns
    except (Exception, dcp.api.CheckpointException) as e:  # a damaged file surfaces deep in torch: say the way on
        e = next(iter(e.failures.values()))[0] if isinstance(e, dcp.api.CheckpointException) else e  # a rank's error
        way = (f"to continue from the one before it, {found[-2].name}, move it aside: mv {path} "
               f"{path.parent}/.unreadable-{path.name}" if len(found) > 1 else "no earlier checkpoint is left")
        raise SystemExit(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); {way}") from None
    set_state_dict(vla, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=TRAINED_ONLY)
    mine = state[f"rank{rank}"]
    dataset.load_state_dict(mine["data"])  # fails clearly on a different world size, seed or mixture
    torch.set_rng_state(mine["torch_rng"])
    if "cuda_rng" in mine:
        torch.cuda.set_rng_state(mine["cuda_rng"])
    return int(state["step"])


def export(vla, config: TrainConfig, model_config, tokenizer, norm_stats, merge=None, step=0) -> Path | None:
    """Consolidated released-layout checkpoint, written by rank 0 from a full state dict gathered to its CPU;
    merge(state) -> state maps the trained model's names to the release's (finetune.py folds LoRA in)."""
    full = get_model_state_dict(vla, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # collective
    if dist.get_rank() != 0:
        return None
    full, dtype, path = merge(full) if merge else full, getattr(torch, config.export_dtype), config.export_dir
    with torch.device("meta"):
        out = VLA(replace(model_config, norm_stats=norm_stats))
    if vla.action_head is not None:  # OFT's heads, named action_head--<step>_checkpoint.pt as the original's
        proprio_dim = vla.proprio_projector.fc1.in_features if vla.proprio_projector is not None else 0
        oft.add_heads(out, vla.action_head.chunk, vla.action_head.action_dim, proprio_dim, 0)
        out.action_head.step = str(step)
    out.load_state_dict({k: v.to(dtype) for k, v in full.items()}, strict=True, assign=True)
    out.tokenizer, out.tokenizer_dir = tokenizer, config.init_from
    out.save_pretrained(path)
    return path


def main(config: TrainConfig, adapt=None, merge=None) -> dict:
    """Train, save, export -> {"step", "history" (metrics of each log step), "export", "model", "params_local" (this
    rank's), "params_total", "params_trained", on the demo (rank 0) "success_rate"}. finetune.py passes adapt(vla)
    (on the meta model: freeze, add layers -> {name: read_rows} of the new parameters) and merge (for the export)."""
    rank, world, device = setup_distributed()
    is_main = rank == 0
    config, accumulation = resolve(config, world)
    l1 = config.action_head == "l1"
    run_dir, found = config.run_dir, checkpoints(config.run_dir)
    if found and not config.resume:
        raise SystemExit(f"{run_dir} already has checkpoints ({found[-1].name}); pass --config.resume to continue "
                         "it, or choose another --config.run-dir")

    # -- model: shapes on meta, shard, then each rank materializes its shard ------------------------------------
    headers = read_weight_headers(config.init_from) if config.init_from else None
    model_config = read_config(config.init_from, headers) if headers else CONFIGS[config.model or "tiny"]
    tokenizer = load_text_tokenizer(config.init_from) if headers else build_text_tokenizer()
    if config.data_mix == "nanovla_demo" and not (config.data_root / "nanovla_demo").exists():
        if config.data_root != TrainConfig.data_root:  # a mistyped path must not quietly become a new demo dataset
            raise data.DataError(f"{config.data_root}: no nanovla_demo dataset; the demo is written on first use only "
                                 f"to {TrainConfig.data_root}, elsewhere with python demo.py --data-dir DIR")
        if is_main:
            demo.make_demo(config.data_root)  # once
        dist.barrier()
    dataset = open_data(config, tokenizer, model_config, train=True, rank=rank, world=world)
    dims = {k: action_dim(model_config.norm_stats, k) for k in model_config.norm_stats}
    for name in dataset.norm_stats if headers and dims else ():  # one token per action dimension: the head's layout
        if (new := action_dim(dataset.norm_stats, name)) not in dims.values():
            raise ValueError(f"{name} has {new}-dim actions but {config.init_from} was trained on "
                             f"{sorted(set(dims.values()))}-dim actions ({dims}); start from a checkpoint with the "
                             "same action dimension, or convert the dataset's actions")
    with torch.device("meta"):
        vla = VLA(model_config)
    vla.tokenizer = tokenizer
    frozen = set(vla.unused_parameter_names())  # never influence the output: no gradient, kept out of AdamW
    frozen |= {"language_model.lm_head.weight"} if l1 else set()  # the L1 head reads hidden states, not logits
    for name, p in vla.named_parameters():
        if (name in frozen or (config.freeze_vision and name.startswith("vision_backbone."))
                or (config.freeze_llm and name.startswith("language_model."))):
            p.requires_grad_(False)
    added = adapt(vla) if adapt else {}
    if l1:  # OFT: a new action head (and proprio projector), trained in full beside the VLA (or its adapters)
        widths = {len(s["proprio"]["mean"]) for s in dataset.norm_stats.values()} if config.proprio else {0}
        if len(widths) != 1:  # one projector reads one width
            raise data.DataError(f"the mixture's proprio widths differ {sorted(widths)}; try --config.no-proprio")
        added.update(oft.add_heads(vla, config.chunk, data.ACTION_DIM, widths.pop(), config.seed))
    group = config.shard_group_size or world
    # 1-d mesh: FSDP over all ranks; 2-d (replicate, shard): HSDP, sharded within a group, replicated across groups
    mesh = (init_device_mesh(device.type, (world,)) if group == world else
            init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard")))
    shard(vla, mesh, config.bf16, config.activation_checkpointing)
    if headers:  # strict: the checkpoint holds exactly the names and shapes the model expects
        check_state(headers, {n: tuple(p.shape) for n, p in vla.named_parameters() if n not in added}, config.init_from)
    init = (lambda i, name, shape, rows: read_tensor(headers, name, rows)) if headers else random_init(config.seed)
    materialize(vla, device, lambda i, name, *rest: (added.get(name) or init)(i, name, *rest))
    vla.train()

    # AdamW (torch's betas, eps) on this rank's fp32 shards; DTensors keep their shapes, so matrices decay, 1-d don't
    trainable = [(n, p) for n, p in vla.named_parameters() if p.requires_grad]
    decay = {n for n, p in trainable if p.ndim >= 2 and not n.endswith(".bias")}
    groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": config.weight_decay},
              {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
    params = {"params_local": sum(p.to_local().numel() for p in vla.parameters()),
              "params_total": sum(p.numel() for p in vla.parameters()),
              "params_trained": sum(p.numel() for _, p in trainable)}

    step = load_checkpoint(found, vla, optimizer, dataset) if config.resume and found else 0
    if is_main and step:
        print(f"resumed from {found[-1]} at step {step}")
    total = config.max_steps or math.ceil(config.epochs * dataset.dataset_length / config.global_batch_size)
    norm_stats = {**model_config.norm_stats, **dataset.norm_stats}  # the init's keys stay usable, new data overrides
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
        data.save_dataset_statistics(dataset.norm_stats, run_dir / "dataset_statistics.json")
        log = run_dir / "metrics.jsonl"
        if step and log.exists():  # the steps after the checkpoint run again: keep only the lines up to it
            lines = [line for line in log.read_text().splitlines() if line.endswith("}")]  # not a line cut by a kill
            log.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
        sharding = f"FSDP over {world}" if group == world else f"HSDP: {world // group} replicas x {group} shards"
        print(f"{params['params_total'] / 1e6:.1f}M parameters ({params['params_trained'] / 1e6:.1f}M trained), "
              f"{world} rank(s) on {device.type}, {sharding}, batch {config.global_batch_size} = {world} x "
              f"{config.per_device_batch_size} x {accumulation} accumulation, {total} steps, bf16 {config.bf16}, "
              f"activation checkpointing {config.activation_checkpointing}")
        if config.wandb_project:
            import wandb

            wandb.init(project=config.wandb_project, name=run_dir.name, config=asdict(config))

    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=config.per_device_batch_size,
                                              collate_fn=data.collate, num_workers=0))  # TF decodes in its own threads
    ids = torch.arange(model_config.llm.vocab_size).numpy()  # token id -> normalized action, by tokenizer.py's decode
    decode = torch.tensor(vla.action_tokenizer.decode(ids), dtype=torch.float32, device=device)
    # action_metrics' sums since the last log, synced on log steps only; bad_step: the first non-finite one (-1: none)
    window = torch.zeros(6, dtype=torch.float64, device=device)
    bad_step = torch.tensor(-1, device=device)
    history, t_log, steps_in_window = [], time.perf_counter(), 0

    while step < total and not config.export_only:
        lr = lr_at(step, total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accumulation):
            batch = {k: v.to(device) for k, v in next(loader).items() if torch.is_tensor(v)}
            # reduce-scatter after the last micro-batch only; until then FSDP sums each block's unsharded fp32 grad
            vla.set_requires_gradient_sync(micro == accumulation - 1)
            # with labels, out.logits is (N, V): only the N supervised positions
            out = vla(*(batch.get(k) for k in BATCH_KEYS))  # an OFT model: chunks and their L1 loss
            # .grad sums micro-batches and FSDP averages ranks: loss / A makes the step's gradient one global batch's
            (out.loss / accumulation).backward()
            window += action_metrics(out, batch, vla.action_tokenizer.begin_idx, decode)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], config.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # same on every rank
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bad = ~(torch.isfinite(out.loss.detach()) & torch.isfinite(grad_norm))
        bad_step = torch.where(bad & (bad_step < 0), torch.tensor(step + 1, device=device), bad_step)
        step, steps_in_window = step + 1, steps_in_window + 1

        last = step == total
        save = config.save_every and (step % config.save_every == 0 or last)
        if step % config.log_every == 0 or last or save:
            dist.all_reduce(window)  # sums over ranks: the only sync of a step, and only on log steps
            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
            if int(bad_step) >= 0:
                raise SystemExit(f"non-finite loss or gradient norm at step {int(bad_step)}; stopping. The last good "
                                 f"checkpoint is {checkpoints(run_dir)[-1] if checkpoints(run_dir) else 'none'}")
            s, elapsed = window.tolist(), time.perf_counter() - t_log
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            metrics = {"step": step, "loss": s[0] / s[4], "action_accuracy": s[1] / max(s[2], 1),
                       "l1_loss": s[3] / max(s[2], 1), "learning_rate": lr, "grad_norm": float(grad_norm),
                       "samples_per_s": s[5] / elapsed, "step_time_s": elapsed / steps_in_window,
                       "peak_memory_gb": peak / 2**30}
            history.append(metrics)
            window.zero_()
            t_log, steps_in_window = time.perf_counter(), 0
            if is_main:
                eta = (total - step) * metrics["step_time_s"]
                print(f"step {step}/{total} | loss {metrics['loss']:.4f} | acc {metrics['action_accuracy']:.3f} | "
                      f"l1 {metrics['l1_loss']:.4f} | lr {lr:.2e} | {metrics['samples_per_s']:.1f} samples/s | "
                      f"eta {int(eta // 60)}m{int(eta % 60):02d}s", flush=True,
                      end="\r" if sys.stdout.isatty() and not last else "\n")
                with open(log, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if config.wandb_project:
                    wandb.log(metrics, step=step)
        if save:
            path = save_checkpoint(run_dir, step, vla, optimizer, dataset, config.keep_last)
            if is_main:
                print(("\n" if sys.stdout.isatty() else "") + f"saved {path}")

    path = export(vla, config, model_config, tokenizer, norm_stats, merge, step)
    result = {"step": step, "history": history, "export": path, "model": vla, **params}
    if is_main:
        key = f" --config.unnorm-key {config.data_mix}" if len(norm_stats) > 1 and config.data_mix in norm_stats else ""
        key += " --config.no-center-crop" if l1 and not config.image_aug else ""  # trained without random crops
        print(f"exported {path}; serve it with: python serve.py --config.checkpoint {path}{key}")
        if config.data_mix == "nanovla_demo" and config.eval_episodes:
            result["heldout"] = heldout(path, config)
            print("held-out (validation split): " + ", ".join(f"{k} {v:.4f}" for k, v in result["heldout"].items()))
            result["success_rate"], speed = demo_success(path, config.eval_episodes, wrist=config.wrist)
            print(f"closed-loop success {result['success_rate']:.0%} over {config.eval_episodes} demo episodes, "
                  f"{speed:.1f} actions/s")
            if l1 and ((token_demo := RECIPES["tiny"]["export_dir"]) / "config.json").exists():  # the AR demo policy
                rate, token_speed = demo_success(token_demo, config.eval_episodes)
                print(f"autoregressive {token_demo}: {rate:.0%}, {token_speed:.1f} actions/s; OFT's chunks: "
                      f"{speed / token_speed:.1f}x the actions per second")
        if config.wandb_project:
            wandb.finish()
    dist.barrier()
    return result


def open_data(config: TrainConfig, tokenizer, model_config, train: bool, rank: int = 0, world: int = 1):
    """The run's data stream (train), or one pass over its validation split."""
    l1 = config.action_head == "l1"
    return data.RLDSDataset(config.data_root, config.data_mix, tokenizer, model_config.vision[0].image_size,
                            model_config.image_norm, train=train, image_aug=config.image_aug, seed=config.seed,
                            shuffle_buffer_size=config.shuffle_buffer_size if train else 0, rank=rank, world=world,
                            chunk=config.chunk if l1 else 1, wrist=config.wrist, proprio=l1 and config.proprio)


@torch.no_grad()
def heldout(path: Path, config: TrainConfig) -> dict:
    """The export on its data's validation split, measured as training logs it: action accuracy (tokens) and L1."""
    vla = VLA.from_pretrained(path, dtype=torch.float32)
    decode = torch.tensor(vla.action_tokenizer.decode(np.arange(vla.config.llm.vocab_size)), dtype=torch.float32)
    s = sum(action_metrics(vla(*(b.get(k) for k in BATCH_KEYS)), b, vla.action_tokenizer.begin_idx, decode)
            for b in torch.utils.data.DataLoader(open_data(config, vla.tokenizer, vla.config, False), 32,
                                                 collate_fn=data.collate))
    metrics = {"action_accuracy": float(s[1] / s[2]), "l1_loss": float(s[3] / s[2])}
    return metrics if vla.action_head is None else {"l1_loss": metrics["l1_loss"]}


def demo_success(path: Path, episodes: int, mirrored: bool = False, wrist: bool = False) -> tuple[float, float]:
    """Closed-loop success in the demo world (demo.py) of the checkpoint at path, loaded as serve.py loads it, and
    the policy's actions per second (an OFT chunk counts each of its actions)."""
    vla, clock = VLA.from_pretrained(path, dtype=torch.float32), [0.0, 0]

    def policy(image, instruction, state):
        start = time.perf_counter()
        proprio = None if vla.proprio_projector is None else [state]  # OFT: no center crop, the demo trains uncropped
        cameras = [image, demo.second_view(image)] if wrist else image
        action = vla.predict_actions([cameras], [instruction], "nanovla_demo", proprio, center_crop=False)[0]
        clock[0], clock[1] = clock[0] + time.perf_counter() - start, clock[1] + len(np.atleast_2d(action))
        return action
    return demo.demo_success_rate(policy, episodes=episodes, mirrored=mirrored), clock[1] / max(clock[0], 1e-9)


def cli(main):
    """python train.py / finetune.py: parse the flags and run; a data or checkpoint error is its message alone."""
    import tyro

    try:
        tyro.cli(main)
    except (data.DataError, CheckpointError, FileNotFoundError, SystemExit) as e:  # SystemExit: our stops, tyro's
        finish(e.code if isinstance(e, SystemExit) else f"error: {e}")
    finish(0)


def finish(code: int | str | None):
    """Exit without interpreter teardown: DTensor's caches keep the mesh's process groups past destroy_process_group,
    and their gloo threads then race the teardown, aborting a rank now and then."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stderr.write(f"{code}\n" if isinstance(code, str) else "")  # a message, as SystemExit prints it
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


if __name__ == "__main__":
    def train(config: TrainConfig):  # the command line: main without finetune.py's hooks
        return main(config)
    cli(train)
