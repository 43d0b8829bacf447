"""RLDS robot episodes -> tokenized, augmented training batches, exactly as OpenVLA trains on them.

    RLDSDataset("runs/demo_data", "nanovla_demo", tokenizer.build_text_tokenizer()).norm_stats  # and .frames()

The path of one frame (the original's prismatic/vla/datasets/rlds/*):
    <data_root>/<name>/<version>/*.tfrecord  --tfds, images left encoded-->  episode (steps as numpy arrays)
    --standardize by oxe.DATASETS[name]-->  {image, action (T, 7) with gripper 1 = open, instruction, proprio}
    --normalize (q01/q99, gripper masked)-->  frames  --mixture sampler by weight-->  shuffle buffer of *encoded*
    frames  --decode, Lanczos resize, optional augmentation (TF ops)-->  tokenize (tokenizer.py)  -->  collate

Differences from the original, on purpose: ranks read disjoint slices of every dataset (the original reads everything
on every rank); the stream is seeded and resumable; the shuffle buffer holds JPEG bytes, not decoded 224 px frames
(the original's buffer of 256k decoded frames is what grows to hundreds of GB per node). train.py shows the use.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# On CUDA builds of torch, loading triton (torch.compile) *after* tensorflow segfaults (both ship LLVM/protobuf
# symbols): load it first, unless the caller already imported tensorflow (then loading it now is that crash).
if "tensorflow" not in sys.modules:
    import torch._dynamo  # noqa: F401

    try:
        import triton  # noqa: F401
    except ImportError:
        pass  # CPU builds have no triton: nothing to protect
# no TF start-up chatter before our output; oneDNN speeds up only ops we do not run (the golden bits hold without it)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from model import DINO_NORM, SIGLIP_NORM, to_pixel_values  # noqa: E402
from oxe import DATASETS, GRIPPER, MIXTURES  # noqa: E402
from tokenizer import IGNORE_INDEX, MAX_TEXT_TOKENS, ActionTokenizer, normalize_actions, training_example  # noqa: E402

tf.config.set_visible_devices([], "GPU")  # TF only decodes images; the GPUs belong to torch (as the original)
tf.get_logger().setLevel("ERROR")
tfds.disable_progress_bar()

ACTION_DIM = 7  # every standardized dataset: xyz, roll/pitch/yaw deltas, absolute gripper (1 = open, 0 = closed)
ACTION_MASK = [True] * 6 + [False]  # EEF_POS: normalize the 6 movement dims, pass the gripper through
PAD_TOKEN_ID = 32000  # <PAD>, added by OpenVLA after Llama-2's 32000 tokens
# (mean, std) of DINOv2 (channels 0-2) and SigLIP (3-5) as the release's preprocessor_config.json holds them (model.py)
OPENVLA_IMAGE_NORM = (DINO_NORM, SIGLIP_NORM)
# The original's image_augment_kwargs (prismatic/vla/datasets/datasets.py), applied in this order
CROP_SCALE, CROP_RATIO = (0.9, 0.9), (1.0, 1.0)  # always a square of 90% area
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.2, (0.8, 1.2), (0.8, 1.2), 0.05
DECODE_THREADS, DECODE_AHEAD = 2, 32  # frames decode in threads (TF releases the GIL), in order, up to 32 ahead


class DataError(ValueError):
    """Bad or missing data; the message names the dataset, the file and what was expected."""


DIRECTORY_ALIASES = {"bridge_orig": ("bridge_dataset",)}  # the Bridge V2 release's name; OpenVLA renamed it


def resolve_mixture(data_mix: str) -> list[tuple[str, float]]:
    """[(dataset, weight)] of a named mixture (oxe.MIXTURES), a single dataset, or your own "name:weight,name:weight"
    list (e.g. "my_robot:1.0,bridge_orig:0.5" to co-train with Bridge; a missing weight is 1.0); duplicates dropped
    (first kept), as the original. Weights are pre-balancing, as in the named mixtures."""
    spec = MIXTURES.get(data_mix, data_mix)
    if data_mix not in MIXTURES and data_mix not in DATASETS and not ("," in data_mix or ":" in data_mix):
        raise DataError(f"unknown dataset or mixture {data_mix!r}; known datasets: {sorted(DATASETS)}; "
                        f"mixtures: {sorted(MIXTURES)}")
    mix = []
    for part in spec.split(","):
        name, _, weight = (x.strip() for x in part.partition(":"))
        try:
            mix.append((name, float(weight or 1.0)))
        except ValueError:
            raise DataError(f"data mix {data_mix!r}: weight {weight!r} of {name!r} is not a number; expected "
                            "name:weight,name:weight (e.g. bridge_orig:1.0,fractal20220817_data:0.5)") from None
        if not name or not mix[-1][1] > 0:
            raise DataError(f"data mix {data_mix!r}: {part.strip()!r} needs a dataset name and a weight > 0")
    mix = [(name, w) for i, (name, w) in enumerate(mix) if name not in [n for n, _ in mix[:i]]]  # first one kept
    if missing := [name for name, _ in mix if name not in DATASETS]:
        raise DataError(f"mixture {data_mix!r}: not supported yet: {', '.join(missing)} (add its oxe.Layout to "
                        f"DATASETS; supported: {sorted(DATASETS)})")
    return mix


# Reading RLDS with tensorflow-datasets (no network: the builder is built from the files on disk)

def open_dataset(data_root, name: str):
    """The tfds builder of <data_root>/<name>/<latest version>/ (dataset_info.json + features.json + tfrecords)."""
    resolve_mixture(name)  # unknown / unsupported names fail here, before touching the disk
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"{name}: data_root {root} is not a directory (expected {root}/{name}/<version>/)")
    for dirname in (name, *DIRECTORY_ALIASES.get(name, ())):
        versions = [d for d in (root / dirname).glob("*") if (d / "dataset_info.json").is_file()]
        if versions:
            break
    else:
        raise DataError(f"{name}: no RLDS dataset at {root / name}/<version>/dataset_info.json (Open X-Embodiment "
                        f"layout: dataset_info.json, features.json, {name}-train.tfrecord-*)")
    version_dir = max(versions, key=lambda d: tuple(int(x) if x.isdigit() else -1 for x in d.name.split(".")))
    try:
        return tfds.builder_from_directory(str(version_dir))
    except Exception as e:  # a broken dataset_info.json / features.json: say which directory, not tfds' internals
        raise DataError(f"{name}: cannot open the RLDS dataset in {version_dir}: {type(e).__name__}: {e}") from None


def split_names(builder) -> tuple[str, str]:
    """(train, val) splits: a dataset without "val" gives its last 5% of episodes to validation, as the original."""
    return ("train", "val") if "val" in builder.info.splits else ("train[:95%]", "train[95%:]")


class Features(dict):
    """One episode's features; a missing key raises a DataError naming the feature instead of a bare KeyError."""

    def __init__(self, items, where: str, path: str = "steps"):
        super().__init__(items)
        self.where, self.path = where, path

    def __getitem__(self, key):
        if key not in self:
            raise DataError(f"{self.where}: no feature '{self.path}/{key}' (it has {sorted(self)}); the dataset's "
                            f"features.json does not match its standardization function in data.py")
        value = super().__getitem__(key)
        return Features(value, self.where, f"{self.path}/{key}") if isinstance(value, dict) else value


def _columns(steps: Features, feature: str | None, T: int) -> np.ndarray:
    """(T, k) columns of a Layout feature such as "observation/state[7:10]" or "action[6]"; None: a zero column."""
    if feature is None:
        return np.zeros((T, 1), np.float32)
    path, _, cut = feature.partition("[")
    node = steps
    while path not in node:  # feature names may contain "/" themselves (kuka, bc_z)
        head, _, path = path.partition("/")
        node = node[head]
    x, cut = node[path].reshape(T, -1), cut.rstrip("]")
    if ":" in cut:
        start, stop = (int(v) if v else None for v in cut.split(":"))
        return x[:, start:stop]
    return x[:, int(cut) : int(cut) + 1 or None] if cut else x


def standardize(name: str, episode: dict, where: str) -> dict:
    """DATASETS[name] applied to one episode: {image, action (T, 7) float32, instruction, proprio (T, P) float32}."""
    layout, steps = DATASETS[name], Features(episode["steps"], where)
    cameras = [steps["observation"][c] for c in ((layout.image,) if isinstance(layout.image, str) else layout.image)]
    T = len(cameras[0])
    # a camera pair (DROID): one per episode, picked by its first image's crc (random-like, and the same on a resume)
    image = cameras[zlib.crc32(cameras[0][0]) % len(cameras)] if T else cameras[0]
    rule, column = layout.gripper
    gripper = GRIPPER[rule](_columns(steps, column, T)[:, 0])
    action = np.concatenate([_columns(steps, f, T) for f in layout.movement] + [gripper[:, None]], axis=1)
    proprio = [_columns(steps, f, T) for f in layout.proprio]
    out = {"image": image, "action": action.astype(np.float32),
           "instruction": _columns(steps, layout.instruction, T)[:, 0] if layout.instruction else None,
           "proprio": np.concatenate(proprio, axis=1).astype(np.float32) if proprio else np.zeros((T, 0), np.float32)}
    if layout.wrist:
        out["wrist_image"] = steps["observation"][layout.wrist]
    out = layout.fn(steps, out) if layout.fn else out
    if out["action"].shape[1:] != (ACTION_DIM,):
        raise DataError(f"{where}: standardized action has shape {out['action'].shape}, expected (T, {ACTION_DIM})")
    if len({len(out[k]) for k in ("image", "instruction", "action", "proprio")}) > 1:
        raise DataError(f"{where}: standardization gave " + ", ".join(f"{len(out[k])} {k}" for k in out) +
                        "; expected one of each per step")
    return out


def read_episodes(builder, name: str, split: str, shuffle_seed: int | None = None, repeat: bool = False):
    """Standardized episodes of `split` in file order (or a seeded file order, reshuffled each pass when repeating);
    images stay encoded bytes."""
    ds = builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, decoders={"steps": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=shuffle_seed),  # tfds_id = "<file>__<record>"
    )
    # prefetch: tf.data reads and parses the next episodes in its own threads while this one standardizes
    episodes = iter(tfds.as_numpy((ds.repeat() if repeat else ds).prefetch(2)))
    while True:
        try:
            episode = next(episodes)
        except StopIteration:
            return
        except tf.errors.OpError as e:  # DataLossError for a truncated or corrupt tfrecord; it names no file
            raise DataError(f"{name}: corrupt record in {_unreadable_file(builder) or builder.data_dir} (split "
                            f"{split!r}): {e.message.splitlines()[0]}") from None
        where = f"{name} ({builder.data_dir}/{episode['tfds_id'].decode()})"
        yield where, standardize(name, episode, where)


def _unreadable_file(builder) -> str | None:
    """The first tfrecord of the dataset whose records fail their checksums (None: all pass)."""
    for path in sorted(tf.io.gfile.glob(f"{builder.data_dir}/*.tfrecord*")):
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except tf.errors.OpError:
            return path


# Statistics: one pass over every split, after standardization, before any filter; cached next to the data

def quantile(x: np.ndarray, q: float) -> np.ndarray:
    """np.quantile(x, q, axis=0) of float32 columns as numpy 1.26 computed it for the original (numpy 2 returns
    float32): the step between the two neighbours in float32, the linear interpolation in float64."""
    s, index = np.sort(x, axis=0), (len(x) - 1) * q
    lo = int(index)
    hi, t = min(lo + 1, len(s) - 1), index - lo
    step = (s[hi] - s[lo]).astype(np.float64)
    return s[hi] - step * (1 - t) if t >= 0.5 else s[lo] + step * t


def compute_statistics(builder, name: str, proprio: bool = False) -> dict:
    n_episodes = sum(split.num_examples for split in builder.info.splits.values())
    # split by split, as the original's "all" (float32 sums agree bit for bit); a progress bar on terminals only
    episodes = itertools.chain.from_iterable(read_episodes(builder, name, split) for split in builder.info.splits)
    episodes = tqdm(episodes, total=n_episodes, desc=f"statistics of {name} (once)", unit="episode", disable=None)
    columns = [(ep["action"], ep["proprio"]) for _, ep in episodes]  # not the episodes: their images fill memory
    actions, states = [a for a, _ in columns], [p for _, p in columns]
    if not actions or not sum(len(a) for a in actions):
        raise DataError(f"{name}: {builder.data_dir} holds no steps after standardization; nothing to train on")
    a = np.concatenate(actions)  # float32 (N, 7)

    def describe(x):  # mean/std/max/min in float32
        return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(),
                "min": x.min(0).tolist(), "q01": quantile(x, 0.01).tolist(), "q99": quantile(x, 0.99).tolist()}

    # OpenVLA loads no proprio, so its proprio statistics are those of zeros_like(action) (all zeros in norm_stats)
    return {"action": describe(a), "proprio": describe(np.concatenate(states) if proprio else np.zeros_like(a)),
            "num_transitions": int(len(a)), "num_trajectories": len(actions)}


def dataset_statistics(builder, name: str, proprio: bool = False) -> dict:
    """Statistics of one dataset, cached as dataset_statistics_<sha256>.json in its version directory (read-only:
    ~/.cache/nanovla). The hash covers its tfds info (with the path), the proprio keys ("()": none, as OpenVLA), its
    Layout with its functions' source and the statistics code: editing any of them recomputes."""
    layout = [getattr(DATASETS[name], f.name) for f in dataclasses.fields(DATASETS[name])]
    code = [inspect.getsource(v) if callable(v) else v for v in layout + [compute_statistics, quantile]]
    key = "".join([str(builder.info), str(DATASETS[name].proprio) if proprio else "()", repr(code)])
    filename = f"dataset_statistics_{hashlib.sha256(key.encode()).hexdigest()}.json"
    paths = [Path(builder.data_dir) / filename, Path.home() / ".cache" / "nanovla" / filename]
    for path in paths:
        if path.is_file():
            return json.loads(path.read_text())
    stats = compute_statistics(builder, name, proprio)
    for path in paths:
        if path.parent.exists() and not (os.access(path.parent, os.W_OK) and path.parent.stat().st_mode & 0o200):
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")  # ranks computing at once each write whole files
            tmp.write_text(json.dumps(stats))
            os.replace(tmp, path)
            break
        except OSError:
            continue
    return stats


def load_norm_stats(data_root, data_mix: str, proprio: bool = False) -> dict:
    """{dataset: statistics + action mask} of a mixture, as checkpoints carry them (proprio: the state's, for OFT)."""
    stats = {n: dataset_statistics(open_dataset(data_root, n), n, proprio) for n, _ in resolve_mixture(data_mix)}
    return {name: {**s, "action": {**s["action"], "mask": ACTION_MASK}} for name, s in stats.items()}


def save_dataset_statistics(norm_stats: dict, path) -> None:
    """The run directory's dataset_statistics.json (indent 2), as the original's save_dataset_statistics."""
    Path(path).write_text(json.dumps(norm_stats, indent=2))


# Images: TF's decoder and resizer, because exact agreement with the original needs them (golden README)

def decode_and_resize(image_bytes, size: int):
    """JPEG/PNG bytes -> uint8 (size, size, 3): tf decode (libjpeg fast IDCT), Lanczos-3 with antialias, round, clip."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)

    def resize():
        image_f = tf.image.resize(image, (size, size), method="lanczos3", antialias=True)  # also when enlarging
        return tf.cast(tf.clip_by_value(tf.round(image_f), 0, 255), tf.uint8)

    # Already size x size (the demo): Lanczos at scale 1 has weights 1 and ~1e-7, so round() gives the input back
    return tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image, resize)


def augment_image(image, seed):
    """The original's train-time augmentation (dlimp augment_image with OpenVLA's kwargs), seeded and stateless:
    each op gets seed = stateless_uniform([2], previous seed) and its output is clipped to [0, 1]."""
    x = tf.image.convert_image_dtype(image, tf.float32)
    seed = tf.convert_to_tensor(seed, tf.int32)
    for op in (random_resized_crop,
               lambda x, s: tf.image.stateless_random_brightness(x, BRIGHTNESS, seed=s),
               lambda x, s: tf.image.stateless_random_contrast(x, *CONTRAST, seed=s),
               lambda x, s: tf.image.stateless_random_saturation(x, *SATURATION, seed=s),
               lambda x, s: tf.image.stateless_random_hue(x, HUE, seed=s)):
        seed = tf.random.stateless_uniform([2], seed, maxval=tf.int32.max, dtype=tf.int32)
        x = tf.clip_by_value(op(x, seed), 0.0, 1.0)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)


def random_resized_crop(x, seed):
    """Crop of area CROP_SCALE and aspect CROP_RATIO, resized back bilinearly. One seed draws scale, ratio and *both*
    offsets, so the top and left offsets are equal: the crop always sits on the diagonal (the original's quirk)."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    scale = tf.random.stateless_uniform([1], seed, *CROP_SCALE)
    ratio = tf.exp(tf.random.stateless_uniform([1], seed, float(np.log(CROP_RATIO[0])), float(np.log(CROP_RATIO[1]))))
    ch, cw = tf.clip_by_value(tf.sqrt(scale / ratio), 0, 1), tf.clip_by_value(tf.sqrt(scale * ratio), 0, 1)
    top, left = (tf.random.stateless_uniform([1], seed, 0, 1 - c) for c in (ch, cw))
    box = tf.stack([top, left, top + ch, left + cw], axis=1)  # (1, 4) normalized y1, x1, y2, x2
    return tf.image.crop_and_resize(x[None], box, [0], tf.stack([h, w]))[0]


# The training stream

class LockedTokenizer:
    """The decode threads share one HF tokenizer, which must not run in two threads at once (shared padding state)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lock = tokenizer, threading.Lock()

    def __call__(self, text: str):
        with self.lock:
            return self.tokenizer(text)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


class RLDSDataset(torch.utils.data.IterableDataset):
    """Frames of a mixture as model inputs: {pixel_values, input_ids, labels, dataset_name}.

    train=True: this rank's slice of each dataset's train split, repeated forever, datasets sampled by weight,
    shuffled through a buffer of `shuffle_buffer_size` encoded frames; deterministic given (seed, rank).
    train=False: one pass over the validation split (or `split`), datasets one after another, no augmentation.
    Augmentation runs only when train and image_aug (OpenVLA pretraining: off; its LoRA fine-tuning: on).
    state_dict() is the number of frames yielded; load_state_dict() continues the same stream after re-reading (but
    not decoding) the frames before it. Use DataLoader(num_workers=0): TF decodes with its own threads.
    OFT (openvla-oft's pipeline): chunk > 1 makes each frame's action the next `chunk` actions (frames whose chunk
    would run past the episode's end are dropped, as its chunk_act_obs), wrist adds the wrist camera to pixel_values
    (B, 12, S, S), proprio normalizes the state with its own statistics; each example also has "actions" (chunk, 7).
    """

    def __init__(self, data_root, data_mix: str, tokenizer, image_size: int = 224, image_norm=OPENVLA_IMAGE_NORM,
                 train: bool = True, image_aug: bool = False, shuffle_buffer_size: int = 256_000, seed: int = 7,
                 rank: int = 0, world: int = 1, split: str | None = None, chunk: int = 1, wrist: bool = False,
                 proprio: bool = False):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        self.mixture = resolve_mixture(data_mix)  # fails on unknown / unsupported names before any reading
        self.names = [name for name, _ in self.mixture]
        self.builders = [open_dataset(data_root, name) for name in self.names]
        self.norm_stats = load_norm_stats(data_root, data_mix, proprio)
        self.chunk, self.wrist, self.proprio = chunk, wrist, proprio
        for name in self.names:
            missing = [k for k, on in (("wrist", wrist), ("proprio", proprio)) if on and not getattr(DATASETS[name], k)]
            if missing:
                raise DataError(f"{name}: its oxe.Layout has no {' and no '.join(missing)}; train without, or add it")
        self.tokenizer, self.action_tokenizer = tokenizer, ActionTokenizer(tokenizer.vocab_size)
        self._prompts = LockedTokenizer(tokenizer)
        self.image_size, self.image_norm, self.train = image_size, image_norm, train
        self.image_aug, self.shuffle_buffer_size = image_aug, shuffle_buffer_size
        self.seed, self.rank, self.world = seed, rank, world
        self.splits = [split or split_names(b)[0 if train else 1] for b in self.builders]
        # weight x num_transitions, normalized; an epoch is set by the weight-1.0 datasets (rlds/dataset.py dataset_len)
        sizes = np.array([self.norm_stats[n]["num_transitions"] for n in self.names], np.float64)
        weights = np.array([w for _, w in self.mixture]) * sizes
        self.weights = weights / weights.sum()
        primary = [i for i, (_, w) in enumerate(self.mixture) if w == 1.0] or range(len(self.names))
        self.dataset_length = int(max(sizes[i] / self.weights[i] for i in primary))
        self.position, self._start = 0, 0
        image_fn = lambda b, s: augment_image(decode_and_resize(b, image_size), s)  # noqa: E731
        image_bytes = tf.TensorSpec([], tf.string)
        self._augment = tf.function(image_fn, input_signature=[image_bytes, tf.TensorSpec([2], tf.int32)])
        self._decode = tf.function(lambda b: decode_and_resize(b, image_size), input_signature=[image_bytes])

    def _episodes(self, i: int):
        """(where, episode) of this rank's slice (tfds even_splits) of dataset i; forever, seeded, when training."""
        split = tfds.even_splits(self.splits[i], n=self.world)[self.rank] if self.world > 1 else self.splits[i]
        n_split = self.builders[i].info.splits[split].num_examples
        seed = int(np.random.SeedSequence([self.seed, self.rank, i]).generate_state(1)[0])
        shuffle_seed = seed if self.train else None
        labeled = skipped = 0
        for where, ep in read_episodes(self.builders[i], self.names[i], split, shuffle_seed, repeat=self.train):
            if any(len(s) for s in ep["instruction"]):  # skip_unlabeled: episodes without any instruction
                labeled += 1
                yield where, ep
            else:
                skipped += 1
                if not labeled and skipped >= n_split:
                    break  # a whole pass without a labeled episode: repeating would loop forever
        if not labeled:
            raise DataError(f"{self.names[i]}: split {split!r} of {self.builders[i].data_dir} has no labeled "
                            f"episodes for rank {self.rank} of {self.world}")

    def _frames(self, i: int):
        """(i, [camera bytes], instruction bytes, normalized action or chunk, proprio, where) of frames keep passes."""
        stats, keep = self.norm_stats[self.names[i]], DATASETS[self.names[i]].keep
        short = 0  # episodes in a row too short for one chunk: a whole split of them would loop forever
        for where, ep in self._episodes(i):
            short = short + 1 if len(ep["action"]) < self.chunk else 0
            if short > stats["num_trajectories"]:
                raise DataError(f"{self.names[i]}: no episode has the {self.chunk} steps one action chunk needs")
            action = normalize_actions(ep["action"], stats["action"]).astype(np.float32)  # gripper passes through
            proprio = normalize_actions(ep["proprio"], stats["proprio"]) if self.proprio else ep["proprio"]
            cameras = (ep["image"], ep["wrist_image"]) if self.wrist else (ep["image"],)
            steps = np.flatnonzero(keep(action)) if keep else np.arange(len(action))
            for t in steps[steps + self.chunk <= len(action)]:
                chunk = action[t] if self.chunk == 1 else action[t:t + self.chunk]
                yield i, [c[t] for c in cameras], ep["instruction"][t], chunk, proprio[t], where

    def _stream(self, rng):
        """Encoded frames in training order with their augmentation seeds: everything random happens here."""
        if self.train:
            frames, cdf = [self._frames(i) for i in range(len(self.names))], np.cumsum(self.weights)
            mixed = (next(frames[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)])
                     for _ in itertools.count())  # the original's sample_from_datasets, frame by frame
        else:
            mixed = itertools.chain.from_iterable(self._frames(i) for i in range(len(self.names)))
        buffer = []
        for frame in mixed:  # tf.data's shuffle: fill the buffer, then each output frees a random slot for the input
            if len(buffer) < self.shuffle_buffer_size:
                buffer.append(frame)
                continue
            if buffer:  # shuffle_buffer_size 0: no shuffling
                j = int(rng.integers(len(buffer)))
                buffer[j], frame = frame, buffer[j]
            yield frame, rng.integers(0, 2**31 - 1, size=2, dtype=np.int32)
        rng.shuffle(buffer)  # a finite (evaluation) stream ends by emptying the buffer
        for frame in buffer:
            yield frame, rng.integers(0, 2**31 - 1, size=2, dtype=np.int32)

    def frames(self):
        """Decoded frames {image uint8 (H, W, 3), action, proprio (raw), instruction, dataset_name}."""
        return self._in_threads(self._decode_frame)

    def __iter__(self):
        # the threads also tokenize and build pixel_values, which would otherwise bottleneck the consumer's thread
        return self._in_threads(lambda frame, seed: self.example(self._decode_frame(frame, seed)))

    def _in_threads(self, work):
        """work(frame, seed) over the stream from the saved position, in DECODE_THREADS threads, results in order."""
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("RLDSDataset needs DataLoader(num_workers=0): TF decodes in its own threads, and "
                               "state_dict() counts the frames of a single iterator")
        stream = self._stream(np.random.default_rng([self.seed, self.rank]))
        for _ in itertools.islice(stream, self._start):
            pass  # fast-forward: read and shuffle the frames before the saved position, but decode none
        self.position = self._start
        # the stream (and its random numbers) advances on this thread only; decoding overlaps with the consumer
        with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
            ahead = collections.deque(pool.submit(work, *x) for x in itertools.islice(stream, DECODE_AHEAD))
            while ahead:
                out = ahead.popleft().result()
                for x in itertools.islice(stream, 1):
                    ahead.append(pool.submit(work, *x))
                self.position += 1
                yield out

    def _decode_frame(self, frame: tuple, seed) -> dict:
        i, cameras, instruction, action, proprio, where = frame
        def decode(image_bytes):  # with augmentation: the same crop and jitter on each camera
            if not len(image_bytes):
                return np.zeros((self.image_size, self.image_size, 3), np.uint8)  # a padding camera, as the original
            aug = self.train and self.image_aug
            return (self._augment(image_bytes, seed) if aug else self._decode(image_bytes)).numpy()
        try:
            images = [decode(image_bytes) for image_bytes in cameras]
        except tf.errors.InvalidArgumentError as e:
            raise DataError(f"{where}: cannot decode an image: {e.message.splitlines()[0]}") from None
        return {"image": images[0], "action": action, "proprio": proprio, "instruction": instruction.decode(),
                "dataset_name": self.names[i], **({"wrist_image": images[1]} if self.wrist else {})}

    def example(self, frame: dict) -> dict:
        """A decoded frame -> model inputs (tokenizer.py builds the ids and labels)."""
        action = frame["action"]  # (7,), or (chunk, 7): tokenized flat, a chunk * 7 action-token answer (OFT)
        ids, labels = training_example(self._prompts, self.action_tokenizer, frame["instruction"], np.ravel(action))
        images = [frame["image"]] + ([frame["wrist_image"]] if self.wrist else [])
        return {"pixel_values": torch.cat([to_pixel_values(im, self.image_norm) for im in images]),
                "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "dataset_name": frame["dataset_name"],
                "proprio": torch.from_numpy(np.asarray(frame["proprio"], np.float32)),
                "actions": torch.from_numpy(action.reshape(-1, ACTION_DIM))}

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "rank": self.rank, "world": self.world,
                "mixture": self.mixture}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world", "mixture"):
            if json.loads(json.dumps(state[key])) != json.loads(json.dumps(mine[key])):
                raise ValueError(f"data state was saved with {key}={state[key]!r}, this dataset has {mine[key]!r}; "
                                 f"the stream can only resume with the same seed, rank, world and mixture")
        self._start = self.position = int(state["position"])


def collate(examples: list[dict], pad_token_id: int = PAD_TOKEN_ID, max_length: int = MAX_TEXT_TOKENS) -> dict:
    """Right-pad input_ids with <PAD> and labels with -100, truncate to 2048, mask = ids != <PAD>."""
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad([e["input_ids"] for e in examples], batch_first=True, padding_value=pad_token_id)[:, :max_length]
    labels = pad([e["labels"] for e in examples], batch_first=True, padding_value=IGNORE_INDEX)[:, :max_length]
    # numpy's single-threaded copy, not torch.stack: torch's OpenMP threads would spin against TF's decode threads
    pixel_values = torch.from_numpy(np.stack([e["pixel_values"].numpy() for e in examples]))
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": input_ids.ne(pad_token_id),
             "labels": labels, "dataset_names": [e["dataset_name"] for e in examples]}
    if len({e["proprio"].shape for e in examples}) == 1:  # (B, P) raw states, when the datasets' state sizes agree
        batch["proprio"] = torch.stack([e["proprio"] for e in examples])
    if "actions" in examples[0]:
        batch["actions"] = torch.stack([e["actions"] for e in examples])  # (B, chunk, 7) normalized
    return batch


# Writing RLDS datasets (the demo, tests, your own conversions): a tfds builder over in-memory episodes

def write_rlds(data_dir, name: str, features: dict, splits: dict, version: str = "1.0.0") -> Path:
    """Write {split: [episode, ...]} as <data_dir>/<name>/<version>/ in the Open X-Embodiment layout, as the
    rlds_dataset_builder template does; `features` is the tfds FeaturesDict content, each episode matches it."""

    class RldsWriter(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(episodes) for split, episodes in splits.items()}

        def _generate_examples(self, episodes):
            yield from enumerate(episodes)

    RldsWriter.name = name
    builder = RldsWriter(data_dir=str(data_dir))
    builder.download_and_prepare()
    for empty in ("downloads/extracted", "downloads"):  # tfds leaves an empty download cache behind
        if (Path(data_dir) / empty).is_dir() and not any((Path(data_dir) / empty).iterdir()):
            (Path(data_dir) / empty).rmdir()
    return Path(builder.data_dir)
