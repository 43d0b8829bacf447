"""OFT: parallel decoding of action chunks, L1 head, proprio, wrist camera (openvla-oft, arXiv 2502.19645).

The same VLA, read differently: instead of 7 greedy tokens per step, ONE bidirectional forward over
[BOS, patches of every camera, proprio token, prompt, chunk * action_dim zeroed placeholders, STOP] gives a hidden state
per action value, and a small MLP regresses the whole chunk of continuous actions from them (L1 loss in training).

    from model import VLA
    vla = VLA.from_pretrained("checkpoints/openvla-7b-oft-finetuned-libero-spatial")  # finds the two .pt heads
    chunk = vla.predict_action([full, wrist], "put the bowl on the plate", unnorm_key="libero_spatial_no_noops",
                               proprio=state)                                          # np.ndarray (8, 7)

A released OFT directory is the merged VLA in the usual layout plus `action_head--<step>_checkpoint.pt` and
`proprio_projector--<step>_checkpoint.pt` (torch.save of the DDP-wrapped modules' state dicts, keys `module.*`); the
parameter names below are the original's (prismatic/models/action_heads.py, projectors.py), so loading is strict.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK = 8  # NUM_ACTIONS_CHUNK for LIBERO (prismatic/vla/constants.py); the checkpoint does not store it
PLACEHOLDER_ID, STOP_ID = 1, 2  # predict_action appends torch.ones (BOS ids) for the actions, then STOP
CROP_SCALE = 0.9  # center_crop_image: the crop area of the train-time random crop, at the center
HEADS = ("action_head", "proprio_projector")  # VLA attribute = file prefix = parameter-name prefix
CHUNK_KEY = "num_actions_chunk"  # config.json: the chunk a head was trained for, when it is ours


class MLPResNetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x):  # pre-LayerNorm residual MLP
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionActionHead(nn.Module):
    """(B, chunk * action_dim, D) hidden states -> (B, chunk, action_dim) normalized actions; no output activation."""

    def __init__(self, input_dim, hidden_dim, action_dim, chunk=CHUNK):
        super().__init__()
        self.action_dim, self.chunk, self.step = action_dim, chunk, "0"  # step: "<N>" or "latest", as in the file name
        self.model = MLPResNet(2, input_dim * action_dim, hidden_dim, action_dim)

    def forward(self, hidden):  # chunk row t reads the 7 hidden states of its own 7 placeholders, concatenated
        return self.model(hidden.reshape(hidden.shape[0], self.chunk, -1))


class ProprioProjector(nn.Module):
    """(B, proprio_dim) normalized robot state -> (B, D): one more input token after the image patches."""

    def __init__(self, llm_dim, proprio_dim):
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1 = nn.GELU()

    def forward(self, proprio):
        return self.fc2(self.act_fn1(self.fc1(proprio)))


# The heads' files: torch.load(weights_only=True) only, so a .pt can never run code

def head_file(path: Path, name: str) -> Path | None:
    files = sorted(path.glob(f"{name}--*_checkpoint.pt"))
    if len(files) > 1:  # the original's find_checkpoint_file asserts exactly one too
        raise _error(f"{path}: {len(files)} {name} checkpoints {[f.name for f in files]}; keep exactly one")
    return files[0] if files else None


def read_head(file: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle that needs code to load
        raise _error(f"{file}: not a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _error(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}  # saved from the DDP wrapper


def load_heads(vla, path: Path, dtype, device):
    """Attach the OFT heads found beside the weights; none there: an OpenVLA model, nothing attached."""
    files = {name: head_file(path, name) for name in HEADS}
    if files["action_head"] is None:
        if files["proprio_projector"] is not None:
            raise _error(f"{files['proprio_projector']}: a proprio projector but no action_head--*_checkpoint.pt")
        return
    D, chunk = vla.config.llm.hidden_size, json.loads((path / "config.json").read_text()).get(CHUNK_KEY, CHUNK)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise _error(f"{path / 'config.json'}: {CHUNK_KEY} must be a positive integer, got {chunk!r}")
    for name, file in files.items():
        if file is None:
            continue
        state = read_head(file)
        dim_key = "model.fc2.weight" if name == "action_head" else "fc1.weight"  # action_dim / proprio_dim
        if dim_key not in state or state[dim_key].ndim != 2:
            raise _error(f"{file}: no {dim_key}; expected a {name} state dict ({sorted(state)[:3]}...)")
        out, inp = state[dim_key].shape
        module = L1RegressionActionHead(D, D, out, chunk) if name == "action_head" else ProprioProjector(D, inp)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise _error(f"{file}: does not fit this model (LLM width {D}): {e}") from None
        setattr(vla, name, module.to(device=device, dtype=dtype).eval())
    vla.action_head.step = files["action_head"].name.split("--", 1)[1].removesuffix("_checkpoint.pt")


def save_heads(vla, path: Path):
    """The released format back: torch.save of {"module." + name: tensor}, one file per head, same step; the chunk
    size in config.json (the released ones leave it to NUM_ACTIONS_CHUNK; the original ignores unknown keys)."""
    if vla.action_head is not None:
        config = {**json.loads((path / "config.json").read_text()), CHUNK_KEY: vla.action_head.chunk}
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as checkpoint.py
    for name in HEADS:
        if (module := getattr(vla, name, None)) is not None:
            state = {"module." + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            torch.save(state, path / f"{name}--{vla.action_head.step}_checkpoint.pt")


def _error(message):
    from checkpoint import CheckpointError  # checkpoint.py imports model.py, which imports this file

    return CheckpointError(message)


# Inputs as the OFT eval prepares them (experiments/robot/openvla_utils.py)

def prepare_image(image: np.ndarray, center_crop: bool = True) -> np.ndarray:
    """Camera frame -> the uint8 224x224 image the processor receives, with TF's ops as the original (bit-exact).

    resize_image_for_policy (any frame not 224x224): JPEG round trip + Lanczos-3, as the RLDS builder stored frames.
    center_crop_image: the central 90% of the area, bilinear back to 224x224 (models trained with random crops).
    """
    import data  # TF, imported in the order data.py needs; the same decode + Lanczos as the training frames
    tf = data.tf

    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"image must be an HxWx3 uint8 array, got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")
    if image.shape[:2] != (224, 224):
        image = data.decode_and_resize(tf.image.encode_jpeg(image), 224).numpy()  # quality 95, 4:2:0 as TF's defaults
    if not center_crop:
        return image
    x = tf.image.convert_image_dtype(image, tf.float32)[None]
    s = tf.sqrt(CROP_SCALE)  # float32, as crop_and_resize in openvla_utils.py
    o = (1 - s) / 2
    x = tf.image.crop_and_resize(x, [[o, o, o + s, o + s]], [0], (224, 224))[0]
    return tf.image.convert_image_dtype(tf.clip_by_value(x, 0, 1), tf.uint8, saturate=True).numpy()


def normalize_proprio(state, stats: dict) -> np.ndarray:
    """BOUNDS_Q99 as the eval does it (float64, clipped after the mask; no min == max rule, unlike training)."""
    x = np.asarray(state, np.float64)
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    return np.clip(np.where(mask, 2 * (x - low) / (high - low + 1e-8) - 1, x), -1.0, 1.0)


def unnormalize_chunk(normalized, stats: dict) -> np.ndarray:
    """_unnormalize_actions (modeling_prismatic.py): unlike OpenVLA's, it keeps the + 1e-8; the gripper passes."""
    low, high = np.asarray(stats["q01"], np.float64), np.asarray(stats["q99"], np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1) * (high - low + 1e-8) + low, normalized).astype(np.float64)


# The forward: one pass, bidirectional, hidden states read just before each placeholder

def embed(vla, pixel_values, input_ids, action_mask, proprio=None):
    """(B, 6 * n_images, S, S), (B, T) right-padded ids, (B, T) bool action positions, (B, p) normalized state or None
    -> LLM input (B, 1 + n_images * P (+1) + T - 1, D): [BOS, patches of each image, proprio token, text[1:]]."""
    B, S = pixel_values.shape[0], pixel_values.shape[-1]
    images = pixel_values.reshape(-1, 3 * len(vla.config.image_norm), S, S)  # every camera through the backbone at once
    patches = vla.projector(vla.vision_backbone(images.to(vla.projector.fc1.weight.dtype)))  # (B * n, P, D)
    patches = patches.reshape(B, -1, patches.shape[-1])  # (B, n * P, D), cameras in input order
    if proprio is not None:
        token = vla.proprio_projector(proprio.to(patches.dtype).reshape(B, -1))  # (B, D)
        patches = torch.cat([patches, token[:, None]], dim=1)
    tokens = vla.language_model.model.embed_tokens(input_ids) * ~action_mask[..., None]  # only RoPE tells them apart
    return torch.cat([tokens[:, :1], patches.to(tokens.dtype), tokens[:, 1:]], dim=1)


def forward(vla, pixel_values, input_ids, attention_mask, action_mask, proprio=None):
    """-> (normalized chunks (B, chunk, action_dim), the head's input (B, chunk * action_dim, D)).

    action_mask marks the action tokens (placeholders at inference, labels > 31743 in training); the action value at
    text position t is read from the hidden state of position t - 1, as run_forward_pass selects them."""
    x = embed(vla, pixel_values, input_ids, action_mask, proprio)
    B, L, _ = x.shape
    n_prefix = L - input_ids.shape[1]  # patches (+ proprio)
    key_valid = torch.cat([attention_mask.new_ones(B, n_prefix + 1), attention_mask[:, 1:]], dim=1).bool()
    # The fork's SDPA attention: every query sees every non-pad key (model.py is causal only when given no mask)
    hidden = vla.language_model.model(x, torch.arange(L, device=x.device)[None].expand(B, L), key_valid[:, None, None])
    actions_hidden = hidden[:, n_prefix - 1:L - 1][action_mask].reshape(B, -1, hidden.shape[-1])
    return vla.action_head(actions_hidden), actions_hidden


@torch.inference_mode()
def predict_chunks(vla, images, instructions, keys, proprio=None, center_crop=True) -> np.ndarray:
    """B requests (each one image or a list: third-person first, then wrist) -> (B, chunk, action_dim) float64."""
    images = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    if len({len(im) for im in images}) != 1:
        raise ValueError(f"every request needs the same number of cameras; got {[len(im) for im in images]}")
    if (proprio is None) != (vla.proprio_projector is None):
        need = "pass proprio= (raw robot states)" if proprio is None else "it has no proprio projector: drop proprio="
        raise ValueError(f"this OFT model was trained {'with' if proprio is None else 'without'} proprio; {need}")
    device = vla.projector.fc1.weight.device
    n_actions = vla.action_head.chunk * vla.action_head.action_dim
    pixel_values = torch.stack([vla.preprocess([prepare_image(i, center_crop) for i in im]).flatten(0, 1)
                                for im in images]).to(device)  # (B, 6 * n, S, S): [full DINOv2, full SigLIP, wrist ...]
    prompts = [vla.prompt_ids(s) + [PLACEHOLDER_ID] * n_actions + [STOP_ID] for s in instructions]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [vla.config.pad_token_id] * (T - len(p)) for p in prompts], device=device)
    attention_mask = torch.tensor([[1] * len(p) + [0] * (T - len(p)) for p in prompts], device=device)
    pos = torch.arange(T, device=device)[None]
    first = torch.tensor([len(p) - 1 - n_actions for p in prompts], device=device)[:, None]
    action_mask = (pos >= first) & (pos < first + n_actions)
    if proprio is not None:
        proprio = torch.tensor(np.stack([normalize_proprio(s, vla.norm_stats[k]["proprio"])
                                         for s, k in zip(proprio, keys)]), dtype=torch.float32, device=device)
    normalized = forward(vla, pixel_values, ids, attention_mask, action_mask, proprio)[0].float().cpu().numpy()
    return np.stack([unnormalize_chunk(a, vla.norm_stats[k]["action"]) for a, k in zip(normalized, keys)])


def add_heads(vla, chunk: int, action_dim: int, proprio_dim: int, seed: int) -> dict:
    """New heads to train (torch's default init, seeded), attached on the meta device as train.py builds the model ->
    {parameter name: read_rows} for train.materialize. proprio_dim 0: no proprio projector."""
    D = vla.config.llm.hidden_size
    torch.manual_seed(seed)
    heads = {"action_head": L1RegressionActionHead(D, D, action_dim, chunk)}
    if proprio_dim:
        heads["proprio_projector"] = ProprioProjector(D, proprio_dim)
    full = {f"{name}.{k}": v for name, module in heads.items() for k, v in module.state_dict().items()}
    for name, module in heads.items():
        setattr(vla, name, module.to("meta"))
    return {name: lambda i, name, shape, rows: full[name][rows[0]:rows[1]] for name in full}
