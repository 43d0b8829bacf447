"""Measured figures, each printed as a ratio against a baseline measured in the same run, with the machine.

    python bench.py {infer,serve,data,train,finetune}   # --help: what each measures; --config.skip-mid: tiny only
"""

import base64
import http.client
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import json_numpy
import numpy as np
import torch
import tyro
from PIL import Image

import oft
from model import CONFIGS, VLA, KVCache, LlamaConfig

ROOT = Path(__file__).resolve().parent
FIXTURE = ROOT.parent / "shared" / "fixtures" / "openvla-tiny"


def machine() -> str:
    names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]  # Linux
    cpu = names[0] if names else platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}"


def timeit(*fns, reps: int) -> list[float]:
    """Median seconds per call of each fn (after a warm-up call each), timed alternately: other load hits all alike."""
    [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def proc_status(field: str, pid="self") -> int:
    """Bytes of VmRSS or VmHWM (the peak; getrusage's survives fork + exec: a child's is its parent's) of a process."""
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith(field)) * 1024


def fresh_process(code: str, *args: str) -> dict | None:
    """Run code in a fresh Python process (peak memory is per process) -> its last line's JSON or None (error shown)."""
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    return print(out.stderr[-3000:]) if out.returncode else json.loads(out.stdout.strip().splitlines()[-1])


def report(name: str, value: float, unit: str, baseline_name: str, baseline: float):
    print(f"  {name:<44} {value:10.4f} {unit:<8} baseline {baseline_name}: {baseline:.4f} {unit}  "
          f"ratio {value / baseline:.3f}x")


# ---- infer -----------------------------------------------------------------------------------------------------------

@dataclass
class InferConfig:
    reps: int = 5  # timed repetitions per figure (median reported); the mid config uses max(1, reps // 3)
    skip_mid: bool = False  # skip the mid config (real-size ViTs + ~1B LLM: seconds per action on a 2-core CPU)
    skip_memory: bool = False  # skip the 1.1 GB checkpoint's load time and peak RSS (writes it to a temp dir)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


@torch.inference_mode()
def module_floor(vla, pixel_values, prompt_ids, n_tokens):
    """The work predict_action cannot avoid, calling the modules directly: vision + projector once, one prefill,
    n_tokens - 1 cached one-token steps (the last token needs no further step)."""
    llm, cfg = vla.language_model, vla.config.llm
    x = vla.embed(pixel_values, torch.tensor([prompt_ids], device=pixel_values.device))
    L = x.shape[1]
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads or cfg.num_attention_heads, L + n_tokens,
                    cfg.hidden_size // cfg.num_attention_heads, x.dtype, x.device)
    pos = torch.arange(L, device=x.device)[None]
    token = llm.lm_head(llm.model(x, pos, None, cache)[:, -1]).argmax(-1)
    for step in range(n_tokens - 1):
        h = llm.model(llm.model.embed_tokens(token)[:, None], pos[:, -1:] + 1 + step, None, cache)
        token = llm.lm_head(h[:, -1]).argmax(-1)
    return token.item()


def bench_predict(name, vla, reps, device, frame=(224, 224)):
    """frame: the camera image's (H, W); predict_action pays PIL's resize (and the prompt's tokenization, the
    decode), which the floor (modules only) does not include."""
    image = np.random.default_rng(0).integers(0, 256, (*frame, 3), dtype=np.uint8)
    key, instruction = sorted(vla.norm_stats)[0], "pick up the cup"
    pixel_values = vla.preprocess([image]).to(device=device, dtype=next(vla.parameters()).dtype)
    prompt = vla.prompt_ids(instruction)
    floor, full = timeit(lambda: module_floor(vla, pixel_values, prompt, 7),
                         lambda: vla.predict_action(image, instruction, key), reps=reps)
    report(f"{name}: predict_action, {frame[1]}x{frame[0]} frame", full * 1e3, "ms", "module floor", floor * 1e3)


def bench_batch(name, vla, reps, batch=8):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch)]
    texts = [f"pick up the {w} cup" for w in ["red", "blue", "green", "big", "small", "left", "right", "tall"]][:batch]
    key = sorted(vla.norm_stats)[0]
    sequential, batched = timeit(lambda: [vla.predict_action(i, t, key) for i, t in zip(images, texts)],
                                 lambda: vla.predict_actions(images, texts, key), reps=reps)
    report(f"{name}: actions/s at batch {batch}", batch / batched, "act/s", f"{batch} sequential calls",
           batch / sequential)


def bench_oft(name, vla, reps, batch):
    """OFT's chunk of 8 from one bidirectional forward (action head + proprio token, the same weights otherwise) vs
    OpenVLA's 7 autoregressive tokens per action: actions/s of predict_actions at this batch."""
    rng, D, key = np.random.default_rng(2), vla.config.llm.hidden_size, sorted(vla.norm_stats)[0]
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch)]
    texts, states = ["pick up the cup"] * batch, [np.zeros(7)] * batch  # the fixture's stats: 7-dim proprio
    dtype, device = next(vla.parameters()).dtype, next(vla.parameters()).device
    heads = [oft.L1RegressionActionHead(D, D, 7), oft.ProprioProjector(D, 7)]
    heads = [h.to(device=device, dtype=dtype).eval() for h in heads]

    def run(use_heads):
        vla.action_head, vla.proprio_projector = heads if use_heads else (None, None)
        return vla.predict_actions(images, texts, key, states if use_heads else None)
    tokens, chunks = timeit(lambda: run(False), lambda: run(True), reps=reps)
    run(False)  # the model as it came
    report(f"{name}: OFT actions/s at batch {batch}", batch * oft.CHUNK / chunks, "act/s", "autoregressive",
           batch / tokens)


LOAD_PROBE = """
import glob, json, sys, time, torch
hwm = lambda: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM"))) * 1024
base, t = hwm(), time.perf_counter()
if sys.argv[2] == "plain":
    from safetensors.torch import load_file
    files = sorted(glob.glob(sys.argv[1] + "/*.safetensors"))  # load_file maps lazily; clone reads, as a load must
    tensors = [{k: t.clone() for k, t in load_file(f).items()} for f in files]
else:
    from model import VLA
    vla = VLA.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"s": time.perf_counter() - t, "grown": hwm() - base}))
"""


def bench_load(name, path, reps):
    """VLA.from_pretrained (config, tokenizer, strict checks, bf16 weights) vs safetensors' load_file of the same
    shards, each the first load in a fresh process, alternated; bf16 both, so neither converts dtypes."""
    runs = {"plain": [], "ours": []}
    for _ in range(reps + 1):  # the first pair warms the page cache
        for how in runs:
            runs[how].append(fresh_process(LOAD_PROBE, str(path), how))
    plain, ours = (statistics.median(r["s"] for r in runs[how][1:]) for how in ("plain", "ours"))
    report(f"{name}: from_pretrained, first in a process", ours * 1e3, "ms", "plain safetensors load", plain * 1e3)
    return max(r["grown"] for r in runs["ours"])


def infer(config: InferConfig):
    """predict_action latency vs the module floor; batch-8 throughput vs sequential; load time and peak RSS."""
    print(f"machine: {machine()}\ntiny fixture (../shared/fixtures/openvla-tiny), fp32:")
    bench_load("tiny bf16", FIXTURE, config.reps)
    tiny = VLA.from_pretrained(FIXTURE, dtype=torch.float32, device=config.device)
    bench_predict("tiny fp32", tiny, config.reps, config.device)
    bench_predict("tiny fp32", tiny, config.reps, config.device, frame=(480, 640))  # the fixture's camera-sized case 2
    bench_batch("tiny fp32", tiny, config.reps)
    bench_oft("tiny fp32", tiny, config.reps, 1)
    if not config.skip_mid:
        reps = max(1, config.reps // 3)
        for dtype in (torch.float32, torch.bfloat16):
            tag = f"mid {str(dtype)[6:]}"
            print(f"mid config (real-size DINOv2-L + SigLIP-So400m, ~1B Llama-shaped LLM, random weights), {tag}:")
            mid = VLA.build("mid", dtype=dtype, device=config.device)
            mid.config.norm_stats = tiny.norm_stats
            bench_predict(tag, mid, reps, config.device)
            if dtype == torch.float32:
                bench_batch(tag, mid, 1)
                bench_oft(tag, mid, reps, 1)
                bench_oft(tag, mid, 1, 8)
            del mid
    if not config.skip_memory:
        # ~0.54B parameters in bf16 = ~1.07 GB: tiny ViTs, an 8-layer 2048-wide Llama
        cfg = replace(CONFIGS["tiny"], llm=LlamaConfig(32064, 2048, 5504, 8, 16))
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            VLA.build(cfg, dtype=torch.bfloat16).save_pretrained(Path(tmp) / "ckpt", max_shard_bytes=512 * 2**20)
            size = sum(f.stat().st_size for f in (Path(tmp) / "ckpt").glob("*.safetensors"))
            print(f"a {size / 1e9:.2f} GB bf16 checkpoint (3 shards), fresh processes:")
            grown = bench_load("1.1 GB bf16", Path(tmp) / "ckpt", max(1, config.reps // 2))
            report("peak RSS growth during from_pretrained", grown / 1e9, "GB", "checkpoint size", size / 1e9)


# ---- serve -----------------------------------------------------------------------------------------------------------

@dataclass
class ServeBenchConfig:
    clients: tuple[int, ...] = (1, 4, 16)  # concurrent clients, one measurement each (each sends again when answered)
    tiny_requests: tuple[int, ...] = (32, 64, 128)  # requests per measurement, tiny fixture, one per clients entry
    mid_requests: tuple[int, ...] = (3, 8, 16)  # the same on the mid config (seconds per forward on CPU)
    abusers: tuple[int, ...] = (4, 16)  # clients sending maximum-size bodies in a loop while a normal one is timed
    skip_mid: bool = False  # tiny fixture only (seconds)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def call(port: int, body: bytes | None = None, ok=(200,)) -> bytes:  # POST /act with body, GET /health without
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST" if body else "GET", "/act" if body else "/health", body)
    r = conn.getresponse()
    data, _ = r.read(), conn.close()
    assert r.status in ok, data[:200]  # a status outside ok: the measurement is wrong
    return data


def serve_load(port: int, n_clients: int, n_requests: int, bodies: list[bytes]) -> tuple[list[float], float]:
    """n_clients threads share n_requests POST /act, each waiting for its answer -> (latencies in s, wall s)."""
    def one(i):
        t = time.perf_counter()
        call(port, bodies[i % len(bodies)])
        return time.perf_counter() - t
    t = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        return list(pool.map(one, range(n_requests))), time.perf_counter() - t


def start_server(checkpoint, *flags: str):
    """`python serve.py` in its own process (here, two would mean two OpenMP teams) -> (proc, port, key, 8 bodies)."""
    cmd = [sys.executable, "serve.py", "--config.checkpoint", str(checkpoint), "--config.port", "0", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # until it logs its address
        if match := re.search(r" on http://127\.0\.0\.1:(\d+)", line):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining its log
            key, rng = json.loads(call(int(match[1])))["unnorm_keys"][0], np.random.default_rng(0)
            bodies = [json_numpy.dumps({"image": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "unnorm_key": key,
                                        "instruction": f"pick up cup {i}"}).encode() for i in range(8)]
            return proc, int(match[1]), key, bodies
    raise RuntimeError(f"serve.py did not start: {line}")


def bench_serving(name, checkpoint, dtype: str, config: ServeBenchConfig, requests: tuple[int, ...]):
    servers = {mode: start_server(checkpoint, "--config.dtype", dtype, "--config.device", config.device,
                                  "--config.max-batch-size", str(size))
               for mode, size in (("one-at-a-time", 1), ("batched", 16))}
    print(f"  {'clients':>7} {'mode':<14} {'requests':>8} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean batch':>10}")
    results = {}
    [serve_load(port, 1, 2, bodies) for _, port, _, bodies in servers.values()]  # warm-up: a fresh process's first
    for n_clients, n_requests in zip(config.clients, requests, strict=True):
        for mode, (_, port, _, bodies) in servers.items():  # interleaved: drift in machine load hits both alike
            batches = json.loads(call(port))["batches"]
            latencies, wall = serve_load(port, n_clients, n_requests, bodies)
            rate, p50, p99 = results[n_clients, mode] = (n_requests / wall, *np.percentile(latencies, [50, 99]) * 1e3)
            mean_batch = f"{n_requests / (json.loads(call(port))['batches'] - batches):>10.2f}"
            print(f"  {n_clients:>7} {mode:<14} {n_requests:>8} {rate:>9.3f} {p50:>9.1f} {p99:>9.1f} {mean_batch}")
    [proc.terminate() for proc, *_ in servers.values()]  # SIGTERM: serve.py finishes what is in flight
    for n_clients in config.clients:
        report(f"{name}: req/s, {n_clients} clients, batched", results[n_clients, "batched"][0], "req/s",
               "one-at-a-time", results[n_clients, "one-at-a-time"][0])
    for mode in servers:  # the first measurement: one client
        report(f"{name}: p99 latency, 1 client, {mode}", results[1, mode][2], "ms", "its p50", results[1, mode][1])


def bench_abuse(config: ServeBenchConfig):
    """A normal client's p50, and the server's peak RSS, while other clients send maximum-size bodies in a loop."""
    proc, port, key, bodies = start_server(FIXTURE, "--config.device", config.device)
    Image.new("RGB", (1920, 1080)).save(png := io.BytesIO(), format="PNG")  # 6 KB that decode to 6 MB
    big = {"json_numpy 1920x1080": np.zeros((1080, 1920, 3), np.uint8), "PNG 1920x1080": base64.b64encode(
        png.getvalue()).decode(), "nested lists 256x256": [[[0] * 3] * 256] * 256}  # the largest each form may send
    kids = lambda: open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()  # its decoder process
    peak = lambda: sum(proc_status("VmHWM", p) for p in [proc.pid, *kids()]) // 2**20  # summed peaks: a bound
    alone = np.median(serve_load(port, 1, 40, bodies)[0]) * 1e3
    print(f"  a normal client alone: p50 {alone:.1f} ms, server peak RSS {peak()} MB")
    for kind, image in big.items():
        body = json_numpy.dumps({"image": image, "instruction": "go", "unnorm_key": key}).encode()
        for n in config.abusers:
            stop, t = threading.Event(), time.perf_counter()
            with ThreadPoolExecutor(n) as pool:  # each sends its next body when answered (503s too), until stopped
                abusers = [pool.submit(lambda: [call(port, body, (200, 503)) for _ in iter(stop.is_set, True)])
                           for _ in range(n)]
                p50 = np.median(serve_load(port, 1, 20, bodies)[0]) * 1e3
                stop.set()
            answers = [b"error" not in data for a in abusers for data in a.result()]  # .result(): none of them failed
            report(f"p50, {n} clients sending {kind}", p50, "ms", "alone", alone)
            print(f"  {'':<44} server peak RSS {peak()} MB; the abusers got {sum(answers)} actions and "
                  f"{len(answers) - sum(answers)} 503s in {time.perf_counter() - t:.1f} s")
    proc.terminate()


def serve_bench(config: ServeBenchConfig):
    """serve.py's req/s and p50/p99, batched vs one-at-a-time; a normal client's latency among maximum-size bodies."""
    print(f"machine: {machine()}\nserve.py over 127.0.0.1, 256x256 json_numpy requests\ntiny fixture, float32:")
    bench_serving("tiny", FIXTURE, "float32", config, config.tiny_requests)
    print("tiny fixture, one normal client among clients sending maximum-size bodies:")
    bench_abuse(config)
    if not config.skip_mid:
        print("mid config (real-size DINOv2-L + SigLIP-So400m, ~1B Llama-shaped LLM, random weights), bfloat16:")
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:  # serve.py loads checkpoints: a random-weight one, 3.6 GB
            mid = VLA.build("mid", dtype=torch.bfloat16)
            mid.config.norm_stats = json.loads((FIXTURE / "config.json").read_text())["norm_stats"]
            mid.save_pretrained(Path(tmp) / "mid")
            del mid
            bench_serving("mid", Path(tmp) / "mid", "bfloat16", config, config.mid_requests)


# ---- data ------------------------------------------------------------------------------------------------------------

@dataclass
class DataBenchConfig:
    datasets: tuple[str, ...] = ("fractal20220817_data", "taco_play", "viola",  # shared/data/oxe/rlds, mixed with
                                 "furniture_bench_dataset_converted_externally_to_rlds", "droid")  # their OXE weights
    frames: int = 640  # frames timed per figure, after a warm-up batch that fills the shuffle buffer
    batch_size: int = 16
    rss_buffers: tuple[int, ...] = (1_000, 10_000, 100_000)  # shuffle buffers (frames) to measure RSS of, one rank each


def data_rss_probe(root: str, mix: str, buffer: int):
    """Run in a fresh process: RSS of one rank's stream before and after its shuffle buffer is full."""
    import data
    from tokenizer import build_text_tokenizer

    ds = data.RLDSDataset(root, mix, build_text_tokenizer(), shuffle_buffer_size=buffer)
    stream, before = ds._stream(np.random.default_rng(0)), proc_status("VmRSS") / 2**20
    next(stream)  # the first output comes once the buffer holds `buffer` encoded frames
    print(json.dumps({"before": before, "after": proc_status("VmRSS") / 2**20}))


def data_bench(config: DataBenchConfig):
    import data  # loads torch._dynamo before tensorflow (see data.py)
    import tensorflow_datasets as tfds
    from tokenizer import build_text_tokenizer

    root, weights = Path(tempfile.mkdtemp(prefix="nanovla_bench_")), dict(data.resolve_mixture("oxe_magic_soup_plus"))
    for name in config.datasets:  # file links: the statistics cache is written next to them
        src = next((ROOT.parent / "shared" / "data" / "oxe" / "rlds" / name).iterdir())
        shutil.copytree(src, root / name / src.name, copy_function=os.symlink)
    mix = ",".join(f"{n}:{weights[n]}" for n in config.datasets)
    print(f"machine: {machine()}\ndata.py at 224 px, batch {config.batch_size}, shuffle buffer 1000, mixture {mix}")
    print("  pipeline frames/s = batches out of DataLoader(RLDSDataset, collate): read, standardize, normalize, mix, "
          "shuffle, decode, resize to 224, [augment], tokenize, pixel_values, collate\n  raw tfds steps/s = "
          "tfds.as_numpy(builder.as_dataset('train')) of the same files, every feature decoded, nothing else")
    builders, t, steps = [data.open_dataset(root, n) for n in config.datasets], time.perf_counter(), 0
    while steps < config.frames:
        for builder in builders:
            steps += sum(sum(1 for _ in ep["steps"]) for ep in tfds.as_numpy(builder.as_dataset(split="train")))
    raw = steps / (time.perf_counter() - t)
    for aug in (False, True):
        ds = data.RLDSDataset(root, mix, build_text_tokenizer(), image_aug=aug, shuffle_buffer_size=1000)
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=config.batch_size, collate_fn=data.collate))
        next(loader)  # fills the shuffle buffer, traces the tf.functions
        t, frames = time.perf_counter(), 0
        while frames < config.frames:
            frames += len(next(loader)["input_ids"])
        report(f"{len(config.datasets)}-dataset mixture frames/s, augmentation {'on' if aug else 'off'}",
               frames / (time.perf_counter() - t), "frames/s", "raw tfds steps/s", raw)
    for buffer in config.rss_buffers:
        if r := fresh_process(f"import bench; bench.data_rss_probe({str(root)!r}, {mix!r}, {buffer})"):
            report(f"RSS growth per rank, shuffle buffer {buffer} frames (process {r['after']:.0f} MB)",
                   r["after"] - r["before"], "MB", "the original's decoded 224 px frames", buffer * 224**2 * 3 / 2**20)
    shutil.rmtree(root, ignore_errors=True)


# ---- train and finetune ----------------------------------------------------------------------------------------------

@dataclass
class TrainBenchConfig:
    steps: int = 3  # timed steps per setting (after one warm-up step); the median is reported
    model: str = "mid-train"  # the realistic size: mid-train (mid widths, fewer layers, ~500M params), openvla-7b (GPU)
    batch: int = 4  # per-device batch of that model (tiny runs the demo's 16)
    skip_mid: bool = False  # train: the tiny model only (the mid-train one takes a few minutes on a 2-core CPU)


def mid_train_config():
    """model.py's mid widths, depths cut to 6 / 6 / 4: fp32 weights + AdamW (16 B x ~500M parameters) fit in 24 GB."""
    mid = CONFIGS["mid"]
    return replace(mid, vision=[replace(v, depth=6) for v in mid.vision], llm=replace(mid.llm, num_hidden_layers=4))


def train_probe(model: str, batch: int, steps: int, checkpointing: bool, lora: bool, head: bool = False):
    """One setting in a fresh process (peak memory is per process): train.py's FSDP2 + bf16 step, or finetune.py's
    (bf16 base, r=32 adapters, no clipping), on a synthetic demo-shaped batch: 82 text tokens, the last 8 supervised
    (7 actions + EOS); head: OFT's instead (L1 head, proprio token, a chunk of 8 x 7 action tokens + EOS).
    Prints {samples_per_s, peak_gb, params, trained}."""
    import finetune
    import train

    _, world, device = train.setup_distributed()
    with torch.device("meta"):
        vla = VLA(mid_train_config() if model == "mid-train" else CONFIGS[model])
    unused = set(vla.unused_parameter_names())
    for name, p in vla.named_parameters():
        p.requires_grad_(not lora and name not in unused)
    if lora:
        finetune.add_lora(vla.to(torch.bfloat16), 32, 16.0, 0.0)
    added = oft.add_heads(vla, oft.CHUNK, 7, 8, seed=0) if head else {}
    train.shard(vla, train.init_device_mesh(device.type, (world,)), bf16=True, checkpointing=checkpointing)
    train.materialize(vla, device, lambda i, name, *rest: added.get(name, train.random_init(seed=0))(i, name, *rest))
    params = [p for p in vla.parameters() if p.requires_grad]
    opt, g, V = torch.optim.AdamW(params, lr=1e-5), torch.Generator().manual_seed(0), vla.config.llm.vocab_size
    pixel_values = torch.randn(batch, 6, 224, 224, generator=g).to(device)
    n = oft.CHUNK * 7 + 1 if head else 8
    input_ids = torch.randint(259, 31000, (batch, 74 + n), generator=g).to(device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -n:] = input_ids[:, -n:] = torch.randint(V - 64 - 256, V - 64, (batch, n), generator=g).to(device)
    labels[:, -1] = input_ids[:, -1] = 2  # EOS
    proprio, actions = torch.randn(batch, 8, generator=g).to(device), torch.randn(batch, oft.CHUNK, 7).to(device)

    def step():
        vla(pixel_values, input_ids, torch.ones_like(input_ids), labels, proprio, actions).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, math.inf if lora else 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, = timeit(step, reps=steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_status("VmHWM")
    print(json.dumps({"samples_per_s": batch / seconds, "peak_gb": peak / 2**30,
                      "params": sum(p.numel() for p in vla.parameters()), "trained": sum(p.numel() for p in params)}))


def run_probes(model, batch, steps, settings) -> list[dict] | None:
    """bench.train_probe(model, batch, steps, checkpointing, lora, head) per setting, each in a fresh process."""
    runs = [fresh_process(f"import bench; bench.train_probe({model!r}, {batch}, {steps}, *{s})") for s in settings]
    return None if None in runs else runs


def compare(name: str, run: dict, what: str, baseline: dict, baseline_name: str):
    """Two train_probe settings: samples/s and peak memory of one against the other."""
    report(f"{name}: samples/s, {what}", run["samples_per_s"], "samples/s", baseline_name, baseline["samples_per_s"])
    report(f"{name}: peak memory, {what}", run["peak_gb"], "GB", baseline_name, baseline["peak_gb"])


def train_bench(config: TrainBenchConfig):
    """Training samples/s and peak memory, FSDP2 + bf16, with activation checkpointing vs without (the baseline)."""
    print(f"bench train on {machine()}")
    for model, batch in [("tiny", 16)] + ([] if config.skip_mid else [(config.model, config.batch)]):
        if runs := run_probes(model, batch, config.steps, [(False, False), (True, False)]):
            (plain, ckpt), name = runs, f"{model} ({runs[0]['params'] / 1e6:.0f}M params, batch {batch})"
            compare(name, ckpt, "checkpointing on", plain, "checkpointing off")


def finetune_bench(config: TrainBenchConfig):
    """Step time and peak memory: LoRA vs full fine-tuning (checkpointing both), LoRA + OFT's L1 head vs LoRA alone."""
    print(f"bench finetune on {machine()}")
    if runs := run_probes(config.model, config.batch, config.steps, [(True, True), (True, False), (True, True, True)]):
        (lora, full, head), name = runs, f"{config.model} batch {config.batch}"
        name += f" (LoRA trains {lora['trained'] / 1e6:.1f}M, full {full['trained'] / 1e6:.0f}M)"
        compare(name, lora, "LoRA", full, "full fine-tuning")
        name = f"{config.model} batch {config.batch} (LoRA + OFT heads train {head['trained'] / 1e6:.1f}M)"
        compare(name, head, "LoRA + L1 head", lora, "LoRA alone")


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"infer": infer, "serve": serve_bench, "data": data_bench,
                                          "train": train_bench, "finetune": finetune_bench})
