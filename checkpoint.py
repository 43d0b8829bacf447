"""The released OpenVLA directory layout: config.json, safetensors shards + index, tokenizer and processor files.

    from checkpoint import read_weight_headers, read_tensor
    headers = read_weight_headers(Path("checkpoints/openvla-7b"))    # {name: (file, dtype, shape)}, no tensor data
    rows = read_tensor(headers, "projector.fc1.weight", (0, 128))    # rows [0, 128) only: a rank's FSDP shard

model.py's VLA.from_pretrained / save_pretrained call this file; train.py and finetune.py read rank-local rows with
it. Nothing here runs code from a checkpoint directory or unpickles anything.
"""

import json
import os
import shutil
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import oft
from model import BACKBONES, CONFIGS, VLA, LlamaConfig, VLAConfig
from tokenizer import MAX_TEXT_TOKENS, PAD_TOKEN, TextTokenizer


class CheckpointError(ValueError):
    """A checkpoint directory that does not match what the model expects; the message names the file and key."""


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def expect(value, types, file, what):
    """value if it is one of types (a bool is not an int here), else a CheckpointError naming file and field."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
        raise CheckpointError(f"{file}: {what} is {shown}, expected {names}")
    return value


def read_json(file: Path, types=dict):
    try:
        raw = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # truncated or garbled
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    return expect(raw, types, file, "the top-level value")


def read_weight_headers(path: Path) -> dict:
    """{tensor name: (file, torch dtype, shape)} from the safetensors headers; safe_open validates each header (known
    dtype, ordered, in-range, non-overlapping offsets, byte size = numel x itemsize) before anything is read."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = expect(read_json(index).get("weight_map"), dict, index, "weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        bins = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {bins}: pickled weights are never loaded; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"{path}: expected model.safetensors or model.safetensors.index.json{hint}")
    headers = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{file}: listed in model.safetensors.index.json but missing")
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if s.get_dtype() not in SAFETENSORS_DTYPES:
                        raise CheckpointError(f"{file}: tensor {key} has dtype {s.get_dtype()}, expected one of "
                                              f"{list(SAFETENSORS_DTYPES)}")
                    if weight_map is not None and weight_map.get(key) != name:
                        raise CheckpointError(f"{file}: holds {key}, but {index.name} places it in "
                                              f"{weight_map.get(key)}")
                    headers[key] = (file, SAFETENSORS_DTYPES[s.get_dtype()], tuple(s.get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
    if weight_map is not None and (missing := sorted(set(weight_map) - set(headers))):
        raise CheckpointError(f"{index}: lists {missing[:5]} but no shard holds them")
    return headers


def check_state(headers: dict, shapes: dict, where) -> None:
    """Strict load check: the checkpoint holds exactly the names of `shapes` ({name: shape}), each with that shape."""
    missing, unexpected = sorted(set(shapes) - set(headers)), sorted(set(headers) - set(shapes))
    if missing or unexpected:
        files = sorted({str(headers[k][0]) for k in unexpected}) or where
        raise CheckpointError(f"{where}: state-dict mismatch: missing {len(missing)} keys {missing[:5]}, unexpected "
                              f"{len(unexpected)} keys {unexpected[:5]} (in {files})")
    for key, shape in shapes.items():
        if (found := headers[key][2]) != tuple(shape):
            raise CheckpointError(f"{headers[key][0]}: {key} has shape {list(found)}, the model expects {list(shape)}")


def read_tensor(headers: dict, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor in its stored dtype, on CPU; rows=(start, stop) reads only those rows of dim 0. safetensors returns
    a private map of the file, read lazily: copy it to hold it in memory (load_weights does)."""
    with safe_open(headers[key][0], "pt") as f:
        return f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]


def load_weights(vla: torch.nn.Module, headers: dict, dtype: torch.dtype, device):
    """Each tensor copied out of its file (cast to dtype, on device; the copy outlives the file) and assigned in place
    of its meta placeholder: one at a time, nothing allocated twice, no to_empty (meta empty_like imports sympy)."""
    state, sizes = {}, {key: s.itemsize * torch.Size(shape).numel() for key, (_, s, shape) in headers.items()}
    with _bytes_bar(sum(sizes.values()), "loading weights") as bar:
        for key in headers:
            state[key] = read_tensor(headers, key).to(device=device, dtype=dtype, copy=True)
            bar.update(sizes[key])
    vla.load_state_dict(state, assign=True)


def _bytes_bar(total: int, desc: str):
    """A progress bar for checkpoint I/O: only for >= 1 GiB (the 7B's 15 GB take a minute) and only on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=True if total < 2**30 else None)


def write_weights(vla: torch.nn.Module, out: Path, max_shard_bytes: int):
    """model.safetensors, or model-0000k-of-0000N.safetensors + index when larger than one shard (as transformers)."""
    from safetensors.torch import save_file

    shards, size = [{}], 0
    for key, t in vla.state_dict().items():
        if key.startswith(oft.HEADS):  # OFT's heads go to their own .pt files (oft.save_heads)
            continue
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    nbytes = lambda shard: sum(t.nbytes for t in shard.values())  # noqa: E731
    names = ["model.safetensors"]
    if len(shards) > 1:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        index = {"metadata": {"total_size": sum(map(nbytes, shards))}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    with _bytes_bar(sum(map(nbytes, shards)), "saving weights") as bar:
        for name, shard in zip(names, shards):
            tensors = {k: t.detach().contiguous().cpu() for k, t in shard.items()}
            save_file(tensors, str(out / name), metadata={"format": "pt"})  # the metadata transformers' loader checks
            bar.update(nbytes(shard))


def read_config(path: Path, headers: dict, timm_overrides=None) -> VLAConfig:
    """VLAConfig from config.json (+ ViT widths and depths read off the weight shapes, which config.json lacks)."""
    path = Path(path)
    file = path / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing; an OpenVLA checkpoint directory needs its config.json")
    raw = read_json(file)
    get = lambda key, types, default: expect(raw.get(key, default), types, file, key)  # noqa: E731
    backbone = get("vision_backbone_id", str, None)
    if backbone not in BACKBONES:
        raise CheckpointError(f"{file}: vision_backbone_id {backbone!r} is not supported; expected one of "
                              f"{sorted(BACKBONES)}")
    timm_ids, views, size = BACKBONES[backbone]
    fused = len(views) == 2
    arch = get("arch_specifier", str, "")
    if not arch.endswith("fused-gelu-mlp" if fused else "gelu-mlp") or (not fused and arch.endswith("fused-gelu-mlp")):
        want = "...fused-gelu-mlp" if fused else "...gelu-mlp (not fused)"
        raise CheckpointError(f"{file}: arch_specifier {arch!r} is not supported for {backbone}; expected {want}")
    llm_id = get("llm_backbone_id", str, "")
    if not llm_id.startswith(("llama2-", "vicuna-v15-")):
        raise CheckpointError(f"{file}: llm_backbone_id {llm_id!r} is not supported; expected a Llama-2 family id")
    if raw.get("image_resize_strategy", "resize-naive") != "resize-naive":
        raise CheckpointError(f"{file}: image_resize_strategy {raw['image_resize_strategy']!r} is not supported; "
                              "expected 'resize-naive'")
    text = get("text_config", dict, {})
    for key, ok in (("rope_scaling", None), ("attention_bias", False), ("hidden_act", "silu"),
                    ("tie_word_embeddings", False)):
        if text.get(key, ok) != ok:
            raise CheckpointError(f"{file}: text_config.{key} = {text[key]!r} is not supported; expected {ok!r}")
    kinds = {int: int, float: (int, float)}  # num_key_value_heads (int | None) may be null
    llm = LlamaConfig(**{f.name: expect(text[f.name], kinds.get(f.type, (int, type(None))), file,
                                        f"text_config.{f.name}") for f in fields(LlamaConfig) if f.name in text})
    # ViT heads (not in config.json): an argument, our "timm_overrides" key, or the size whose widths match the weights
    overrides = expect(timm_overrides or raw.get("timm_overrides") or {}, dict, file, "timm_overrides")
    vision = []
    for i, ((release, _), timm_id) in enumerate(zip(views, timm_ids)):
        prefix = "vision_backbone." + ("featurizer" if i == 0 else "fused_featurizer")
        pos, fc1 = f"{prefix}.pos_embed", f"{prefix}.blocks.0.mlp.fc1.weight"
        if missing := [k for k in (pos, fc1) if k not in headers]:
            raise CheckpointError(f"{path}: missing tensor {missing[0]}")
        depth = len({k.split(".")[3] for k in headers if k.startswith(prefix + ".blocks.")})
        v = replace(release, embed_dim=headers[pos][2][-1], depth=depth, mlp_hidden=headers[fc1][2][0], image_size=size)
        name = timm_id.split(".")[0]
        heads = expect(overrides.get(name) or {}, dict, file, f"timm_overrides.{name}").get("num_heads")
        heads = expect(heads, (int, type(None)), file, f"timm_overrides.{name}.num_heads")
        known = [c.vision[i] for c in CONFIGS.values() if len(c.vision) > i and c.vision[i].kind == v.kind]
        known = [c.num_heads for c in known if (c.embed_dim, c.depth) == (v.embed_dim, v.depth)]
        if heads is None and not known:
            raise CheckpointError(f"{file}: cannot tell the number of attention heads of {prefix} (width "
                                  f"{v.embed_dim}, depth {v.depth}); pass "
                                  f"timm_overrides={{'{name}': {{'num_heads': N}}}}")
        vision.append(replace(v, num_heads=heads or known[0]))
    norm_stats = dict(get("norm_stats", dict, {}))
    if (path / "dataset_statistics.json").exists():  # fine-tuned checkpoints keep their new statistics only here
        norm_stats.update(read_json(path / "dataset_statistics.json"))
    image_norm = [norm for _, norm in views]
    pre = path / "preprocessor_config.json"
    if pre.exists():  # the serialized tvf_normalize_params are the constants that run (bf16-rounded for DINOv2)
        params = expect(read_json(pre).get("tvf_normalize_params"), list, pre, "tvf_normalize_params")
        image_norm = [(expect(p, dict, pre, "tvf_normalize_params[i]")["mean"], p["std"]) for p in params]
    return VLAConfig(backbone, vision, llm, get("pad_to_multiple_of", int, 64), get("n_action_bins", int, 256),
                     get("pad_token_id", int, 32000), norm_stats, image_norm, arch, llm_id,
                     get("hf_llm_id", str, "meta-llama/Llama-2-7b-hf"))


def hf_config(cfg: VLAConfig, dtype_name: str) -> dict:
    """config.json as the original's OpenVLAConfig writes it (text_config holds only non-default Llama fields)."""
    timm_ids, views, size = BACKBONES[cfg.vision_backbone_id]
    text = {"model_type": "llama", "pad_token_id": cfg.pad_token_id, "torch_dtype": dtype_name,
            "vocab_size": cfg.llm.vocab_size}
    default = LlamaConfig()
    for f in fields(LlamaConfig):
        value, base = getattr(cfg.llm, f.name), getattr(default, f.name)
        if f.name == "num_key_value_heads":  # resolved: None means "same as attention heads" (32 by default)
            value, base = value or cfg.llm.num_attention_heads, 32
        if value != base:
            text[f.name] = value
    out = {
        "arch_specifier": cfg.arch_specifier, "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": cfg.hf_llm_id, "image_resize_strategy": "resize-naive", "image_sizes": [size] * len(views),
        "llm_backbone_id": cfg.llm_backbone_id, "llm_max_length": 2048, "model_type": "openvla",
        "n_action_bins": cfg.n_action_bins, "norm_stats": cfg.norm_stats, "output_projector_states": False,
        "pad_to_multiple_of": cfg.pad_to_multiple_of, "pad_token_id": cfg.pad_token_id, "text_config": text,
        "timm_model_ids": timm_ids, "timm_override_act_layers": [None] * len(views), "torch_dtype": dtype_name,
        "transformers_version": "4.40.1", "use_fused_vision_backbone": len(views) == 2,
        "vision_backbone_id": cfg.vision_backbone_id,
    }
    # ViT sizes other than the release's go under our own key, for our loader (the original takes sizes from timm ids)
    overrides = {tid.split(".")[0]: {"embed_dim": v.embed_dim, "depth": v.depth, "num_heads": v.num_heads}
                 for tid, v, (release, _) in zip(timm_ids, cfg.vision, views)
                 if (v.embed_dim, v.depth, v.num_heads) != (release.embed_dim, release.depth, release.num_heads)}
    return out | ({"timm_overrides": overrides} if overrides else {})


def hf_preprocessor_config(cfg: VLAConfig) -> dict:
    """preprocessor_config.json as the original's PrismaticImageProcessor saves it."""
    timm_ids, views, size = BACKBONES[cfg.vision_backbone_id]
    n = len(views)
    return {
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                     "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "image_processor_type": "PrismaticImageProcessor", "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, size, size]] * n, "interpolations": ["bicubic"] * n,
        "means": [[0.485, 0.456, 0.406] if v.kind == "dinov2" else [0.5] * 3 for v, _ in views],
        "processor_class": "PrismaticProcessor",
        "stds": [[0.229, 0.224, 0.225] if v.kind == "dinov2" else [0.5] * 3 for v, _ in views],
        "tvf_crop_params": [{"output_size": [size, size]}] * n, "tvf_do_letterbox": False, "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": list(m), "std": list(s)} for m, s in cfg.image_norm],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [size, size]}] * n,
        "use_fused_vision_backbone": n == 2,
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def load_text_tokenizer(path) -> TextTokenizer:
    """The Llama-2 tokenizer (plus <PAD> = 32000) of a checkpoint directory, from its tokenizer.json."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json; a checkpoint directory needs its tokenizer")
    try:
        tok = TextTokenizer(Tokenizer.from_file(str(file)))
    except Exception as e:  # the tokenizers library reports a garbled file without naming it
        raise CheckpointError(f"{file}: not a readable tokenizer ({e})") from None
    if tok.pad_token_id is None:
        raise CheckpointError(f"{file}: tokenizer has no pad token; OpenVLA expects {PAD_TOKEN} as id 32000")
    return tok


def save_text_tokenizer(tokenizer, out_dir: Path, source_dir=None):
    """The tokenizer files in the release's format: source_dir's copied byte for byte, else tokenizer.json and a
    tokenizer_config.json naming LlamaTokenizer, which transformers 4.40.1 (the original's pin) reads as
    LlamaTokenizerFast; transformers 5's own save would name a class 4.40.1 lacks."""
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).exists():
                shutil.copyfile(Path(source_dir) / name, out_dir / name)
        return
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    special = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                         "single_word": False, "special": True}
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(tokenizer.convert_tokens_to_ids(s)): special(s)
                                 for s in ("<unk>", "<s>", "</s>", PAD_TOKEN)},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
        "model_max_length": MAX_TEXT_TOKENS, "pad_token": PAD_TOKEN, "padding_side": "right",
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": PAD_TOKEN, "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def save_pretrained(vla: VLA, path: Path, max_shard_bytes: int):
    """Write the released layout into a temporary directory, then swap it in: a crash leaves the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it 0700: the checkpoint gets the mode of any new directory
    write_weights(vla, tmp, max_shard_bytes)
    dump = lambda name, obj: (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")  # noqa: E731
    dump("config.json", hf_config(vla.config, str(next(vla.parameters()).dtype).removeprefix("torch.")))
    dump("generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                    "pad_token_id": vla.config.pad_token_id, "transformers_version": "4.40.1"})
    dump("preprocessor_config.json", hf_preprocessor_config(vla.config))
    dump("processor_config.json", {"auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
                                   "processor_class": "PrismaticProcessor"})
    dump("dataset_statistics.json", vla.config.norm_stats)
    save_text_tokenizer(vla.tokenizer, tmp, getattr(vla, "tokenizer_dir", None))
    oft.save_heads(vla, tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
    if old:
        path.rename(old)
    tmp.rename(path)
    if old:
        shutil.rmtree(old)


def build_from_components(config: VLAConfig, vision_states: list[dict], llama_dir, dtype=torch.bfloat16, device="cpu"):
    """The untrained VLA of OpenVLA's recipe: pretrained ViTs (timm state dicts, in backbone order) + a Llama-2 HF
    directory + a freshly initialized projector. Our names mirror timm's and transformers', so this is a prefix mapping
    plus two details: timm's LayerScale `gamma` is our `scale_factor`, and the 32000-row Llama-2 embeddings are padded
    to 32064 rows (<PAD> + multiple of 64; new rows ~ N(0, 0.02), as transformers' resize_token_embeddings did)."""
    llama_dir = Path(llama_dir)
    llama_cfg = read_json(llama_dir / "config.json") if (llama_dir / "config.json").exists() else {}
    # Training used Llama-2's own config (rms_norm_eps 1e-5); the released HF model runs 1e-6 (its config.json).
    llm = replace(config.llm, rms_norm_eps=llama_cfg.get("rms_norm_eps", config.llm.rms_norm_eps))
    vla = VLA.build(replace(config, llm=llm), dtype=dtype, device=device)
    state, loaded = vla.state_dict(), set()
    with torch.no_grad():
        prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."]
        for prefix, timm_state in zip(prefixes, vision_states):
            for key, value in timm_state.items():
                if key.startswith(("head.", "fc_norm.")):  # Identity / absent with num_classes=0
                    continue
                ours = prefix + (key[: -len("gamma")] + "scale_factor" if key.endswith(".gamma") else key)
                if ours not in state or state[ours].shape != value.shape:
                    raise CheckpointError(f"timm weight {key} -> {ours}: no parameter of shape {list(value.shape)}")
                state[ours].copy_(value)
                loaded.add(ours)
        headers = read_weight_headers(llama_dir)
        for key in headers:
            ours, value = "language_model." + key, read_tensor(headers, key)
            if ours not in state:
                raise CheckpointError(f"{headers[key][0]}: {key} is not a Llama-2 weight this model has")
            state[ours][: value.shape[0]].copy_(value)  # embed_tokens / lm_head: the first 32000 of 32064 rows
            loaded.add(ours)
    if missing := [k for k in state if k not in loaded and not k.startswith("projector.")]:
        raise CheckpointError(f"pretrained components lack {len(missing)} weights, e.g. {missing[:5]}")
    vla.tokenizer, vla.tokenizer_dir = load_text_tokenizer(llama_dir), llama_dir
    return vla


def timm_vision_states(config: VLAConfig) -> list[dict]:
    """Pretrained DINOv2 / SigLIP weights through timm, from its local cache. Imported only here: on CPU-only machines
    its torchvision dependency may not import next to the CPU torch."""
    import timm

    timm_ids, _, size = BACKBONES[config.vision_backbone_id]
    return [timm.create_model(tid, pretrained=True, num_classes=0, img_size=size).state_dict() for tid in timm_ids]
