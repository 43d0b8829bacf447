"""HTTP policy server: POST an image and an instruction to /act, get the robot action back.

A drop-in for the original OpenVLA deploy.py (REFERENCE.md section 8): its json_numpy clients work unchanged. Built on
the standard library's ThreadingHTTPServer; one model worker batches concurrent requests through predict_actions.

    python serve.py                                                  # the demo checkpoint `python train.py` wrote
    python serve.py --config.checkpoint ../shared/fixtures/openvla-tiny --config.port 8000
    python serve.py --config.checkpoint checkpoints/openvla-7b --config.token "$TOKEN" --config.host 0.0.0.0

A client (the original's; "unnorm_key" may be left out when the checkpoint has statistics for one dataset only):

    import json_numpy, numpy as np, requests; json_numpy.patch()
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    action = requests.post("http://127.0.0.1:8000/act",
                           json={"image": image, "instruction": "pick up the cup", "unnorm_key": "bridge_orig"}).json()

Request forms (the answer comes back in the form its client reads):
    {"image": <json_numpy uint8 (H, W, 3)>, "instruction": str, "unnorm_key": str}  -> json_numpy float64 (action_dim,)
    {"encoded": json_numpy.dumps(that same dict)}                                   -> a JSON string holding the above
    {"image": [[[r, g, b], ...], ...] (ints 0..255), ...}                            -> a plain JSON list of floats
    {"image": "<base64 PNG or JPEG, optionally a data: URL>", ...}                  -> a plain JSON list of floats
Errors are 4xx (5xx for the server's own failures) with {"error": what was wrong, "expected": what would work}.
GET /health reports the model, device, dtype, unnorm keys, uptime and requests served; GET / prints a usage text.
"""

import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import numpy as np

from tokenizer import resolve_unnorm_key

log = logging.getLogger("serve")


@dataclass
class ServeConfig:
    checkpoint: str = "checkpoints/demo"
    """OpenVLA-layout checkpoint directory (what train.py and finetune.py write, or a downloaded openvla-7b)."""
    host: str = "127.0.0.1"
    """Interface to listen on. The default reaches this machine only; 0.0.0.0 exposes the robot to the network."""
    port: int = 8000
    """TCP port; 0 picks a free one (the chosen port is logged)."""
    device: str = "auto"
    """cuda, cuda:N or cpu; auto = cuda when available, else cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; auto = bfloat16 on cuda (as the original deploy.py), float32 on cpu."""
    max_batch_size: int = 16
    """Most requests the model worker runs in one batched forward; 1 serves one request at a time."""
    max_wait_ms: float = 25.0
    """How long a batch is held open for others to join (never for a lone client): long enough for a burst of
    clients that just got their answers to send again, else batches split into a lone one and the rest."""
    max_pending: int = 256
    """Requests waiting for the model beyond this get 503, so a flood cannot queue unbounded work."""
    max_body_bytes: int = 16 * 2**20
    """Largest request body; a 1920x1080 image is 8 MiB as json_numpy and about 20 MiB as nested lists."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (H * W) accepted; the model resizes to 224x224 anyway."""
    max_instruction_bytes: int = 1024
    """Longest instruction in UTF-8 bytes: <= 1025 tokens even with byte fallback, so prompt + 256 patches < 2048."""
    token: str = ""
    """Bearer token every request but GET / must carry; if empty, $NANOVLA_TOKEN (keeps it out of `ps`); both empty: none."""


class HTTPError(Exception):
    """A request the server refuses: status code, what was wrong, and what it expects instead."""

    def __init__(self, status: int, error: str, expected: str = "", headers: dict | None = None):
        super().__init__(error)
        self.status, self.error, self.expected, self.headers = status, error, expected, headers or {}


REQUEST_SHAPE = 'a JSON object {"image": uint8 (H, W, 3), "instruction": str, "unnorm_key": str (optional)}; see GET /'
IMAGE_FORMS = "json_numpy uint8 array (H, W, 3), nested lists of ints 0..255 (H, W, 3), or a base64 PNG/JPEG string"
ROUTES = {"/": ("GET",), "/health": ("GET",), "/act": ("POST",)}


# ----------------------------------------------------------------------------------------------------------------
# Request parsing: bytes -> (image, instruction, unnorm_key, form). Everything here raises HTTPError 400, never more.


def decode_numpy(obj: dict) -> np.ndarray:
    """A json_numpy object {"__numpy__": base64 bytes, "dtype": descr, "shape": [...]}, decoded by hand.

    json_numpy.loads would also work, but writing it out lets us refuse object and structured dtypes before numpy
    sees them: the bytes only ever become plain numbers, nothing is unpickled or executed.
    """
    data, descr, shape = obj.get("__numpy__"), obj.get("dtype"), obj.get("shape")
    if not isinstance(data, str) or not isinstance(descr, str) or not isinstance(shape, list):
        raise HTTPError(400, "malformed json_numpy array", '{"__numpy__": base64 str, "dtype": str, "shape": [ints]}')
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise HTTPError(400, f"unknown dtype {descr!r} in json_numpy array", "a numeric dtype such as '|u1'") from None
    if dtype.kind not in "biuf":  # 'O' (Python objects) and 'V' (structured) would need more than raw bytes
        raise HTTPError(400, f"dtype {descr!r} is not a plain numeric dtype", "uint8 ('|u1') for images")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise HTTPError(400, f"bad shape {shape} in json_numpy array", "a list of non-negative ints")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "json_numpy '__numpy__' is not valid base64", "standard base64 of the array bytes") from None
    if len(raw) != math.prod(shape) * dtype.itemsize:  # Python ints: a forged huge shape cannot overflow
        raise HTTPError(400, f"json_numpy array has {len(raw)} bytes, not what shape {shape} x {dtype} needs",
                        "shape and dtype matching the data")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_image(value, max_pixels: int) -> tuple[np.ndarray, str]:
    """Any of the accepted image forms -> (uint8 (H, W, 3) array, form), where form picks the answer's encoding."""
    if isinstance(value, dict) and "__numpy__" in value:
        image, form = decode_numpy(value), "json_numpy"
        if image.dtype != np.uint8:
            raise HTTPError(400, f"image dtype is {image.dtype}", f"uint8 pixels 0..255; {IMAGE_FORMS}")
    elif isinstance(value, list):
        try:
            image, form = np.array(value), "plain"
        except (ValueError, TypeError):  # ragged lists
            raise HTTPError(400, "image is not a rectangular nested list", IMAGE_FORMS) from None
        if image.dtype.kind not in "iu" or image.size == 0 or image.min() < 0 or image.max() > 255:
            raise HTTPError(400, f"image holds {image.dtype} values, not ints 0..255", IMAGE_FORMS)
        image = image.astype(np.uint8)
    elif isinstance(value, str):
        image, form = decode_image_file(value, max_pixels), "plain"
    else:
        raise HTTPError(400, f"field 'image' must be an array, a list or a string, not {type(value).__name__}", IMAGE_FORMS)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise HTTPError(400, f"image has shape {tuple(image.shape)}", f"(H, W, 3) RGB; {IMAGE_FORMS}")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise HTTPError(400, f"image is {image.shape[0]}x{image.shape[1]} pixels", f"at most {max_pixels} pixels")
    return image, form


def decode_image_file(text: str, max_pixels: int) -> np.ndarray:
    """A base64 PNG or JPEG (optionally a data: URL) -> uint8 (H, W, 3), checking its size before decoding pixels."""
    from PIL import Image

    if text.startswith("data:"):
        text = text.partition(",")[2]
    # PIL raises many exception types on hostile files (OSError, SyntaxError, DecompressionBombError, ...), so the
    # two calls that parse the untrusted bytes catch Exception: any failure there is the file's fault, a 400.
    try:
        img = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))  # reads the header only
    except Exception:
        raise HTTPError(400, "image string is not a base64 PNG or JPEG", IMAGE_FORMS) from None
    if img.format not in ("PNG", "JPEG"):
        raise HTTPError(400, f"image file is {img.format}", "a base64 PNG or JPEG")
    if img.width * img.height > max_pixels:  # a small file can declare a huge image ("decompression bomb")
        raise HTTPError(400, f"image is {img.height}x{img.width} pixels", f"at most {max_pixels} pixels")
    try:
        return np.asarray(img.convert("RGB"))  # as deploy.py: Image.fromarray(image).convert("RGB")
    except Exception:
        raise HTTPError(400, "image file is truncated or corrupt", "a complete PNG or JPEG") from None


def parse_act(body: bytes, norm_stats: dict, config: ServeConfig):
    """POST /act body -> (image, instruction, unnorm_key, form) with every field checked."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON; RecursionError deep nesting
        raise HTTPError(400, "body is not valid JSON", REQUEST_SHAPE) from None
    encoded = isinstance(payload, dict) and "encoded" in payload
    if encoded:  # deploy.py's double-encoded form: {"encoded": "<json_numpy text of the request>"}
        if not isinstance(payload["encoded"], str):
            raise HTTPError(400, "field 'encoded' must be a string", '{"encoded": json_numpy.dumps(request)}')
        try:
            payload = json.loads(payload["encoded"])
        except (ValueError, RecursionError):
            raise HTTPError(400, "field 'encoded' is not valid JSON", '{"encoded": json_numpy.dumps(request)}') from None
    if not isinstance(payload, dict):
        raise HTTPError(400, f"body is a JSON {type(payload).__name__}, not an object", REQUEST_SHAPE)
    for name in ("image", "instruction"):
        if name not in payload:
            raise HTTPError(400, f"missing field '{name}'", REQUEST_SHAPE)

    instruction = payload["instruction"]
    if not isinstance(instruction, str):
        raise HTTPError(400, f"field 'instruction' must be a string, not {type(instruction).__name__}", "e.g. 'pick up the cup'")
    try:
        n_bytes = len(instruction.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates such as "\ud800" survive JSON parsing but not UTF-8
        raise HTTPError(400, "instruction is not valid Unicode", "a UTF-8 string") from None
    if not instruction.strip():
        raise HTTPError(400, "instruction is empty", "a task such as 'pick up the cup'")
    if n_bytes > config.max_instruction_bytes:
        raise HTTPError(400, f"instruction is {n_bytes} bytes", f"at most {config.max_instruction_bytes} UTF-8 bytes")

    unnorm_key = payload.get("unnorm_key")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise HTTPError(400, f"field 'unnorm_key' must be a string, not {type(unnorm_key).__name__}", f"one of {sorted(norm_stats)}")
    try:
        unnorm_key = resolve_unnorm_key(norm_stats, unnorm_key)
    except ValueError as e:
        raise HTTPError(400, str(e), f"unnorm_key one of {sorted(norm_stats)}") from None

    image, form = decode_image(payload["image"], config.max_image_pixels)
    return image, instruction, unnorm_key, "encoded" if encoded else form


def encode_action(action: np.ndarray, form: str) -> bytes:
    """The answer in the form its client reads: json_numpy for json_numpy clients, a plain list otherwise."""
    a = np.ascontiguousarray(action, dtype="<f8")
    as_numpy = {"__numpy__": base64.b64encode(a.tobytes()).decode(), "dtype": "<f8", "shape": list(a.shape)}
    if form == "json_numpy":
        return json.dumps(as_numpy).encode()
    if form == "encoded":  # deploy.py answered JSONResponse(json_numpy.dumps(action)): a JSON string
        return json.dumps(json.dumps(as_numpy)).encode()
    return json.dumps(a.tolist()).encode()  # repr floats: the float64 values round-trip exactly


# ----------------------------------------------------------------------------------------------------------------
# The model worker: one thread owns the model; request threads hand it jobs and wait.


@dataclass(eq=False)
class Job:
    image: np.ndarray
    instruction: str
    unnorm_key: str
    done: threading.Event
    action: np.ndarray | None = None
    error: str = ""
    batch_size: int = 0


class Batcher:
    """Collects concurrent requests into batches of up to max_batch_size for one predict_actions call each.

    The worker takes the first waiting job, then waits at most max_wait_ms for more; requests that arrive while the
    model runs queue up and form the next batch, so under load batches fill without waiting at all. A lone client
    never waits: the batch is held open only when other requests are being read, are queued, or shared the last batch.
    """

    def __init__(self, load, max_batch_size: int, max_wait_ms: float, max_pending: int):
        """load() -> the model, called on the worker thread; returns once it is loaded (or re-raises its error)."""
        self.vla, self.max_batch_size, self.max_wait_s, self.max_pending = None, max_batch_size, max_wait_ms / 1e3, max_pending
        self.jobs: queue.Queue = queue.Queue()
        self.n_batches = 0  # forwards run; requests / n_batches = mean batch size (in /health)
        self.n_arriving, self.lock = 0, threading.Lock()  # requests being read and parsed, not yet queued
        self.loaded, self.load_error = threading.Event(), None
        self.thread = threading.Thread(target=self.run, args=(load,), name="model-worker", daemon=True)
        self.thread.start()
        self.loaded.wait()
        if self.load_error is not None:
            raise self.load_error

    @contextlib.contextmanager
    def arriving(self):
        """Wraps reading and parsing a request, so the worker knows one more may join the batch it is forming."""
        with self.lock:
            self.n_arriving += 1
        try:
            yield
        finally:
            with self.lock:
                self.n_arriving -= 1

    def submit(self, image, instruction: str, unnorm_key: str) -> Job:
        """Blocks until the model answered; the returned job holds the action or the model's error."""
        if self.jobs.qsize() >= self.max_pending:
            raise HTTPError(503, f"{self.max_pending} requests already waiting", "retry shortly", {"Retry-After": "1"})
        job = Job(image, instruction, unnorm_key, threading.Event())
        self.jobs.put(job)
        job.done.wait()
        return job

    def close(self):
        """Finishes the jobs already queued, then stops the worker."""
        self.jobs.put(None)
        self.thread.join()

    def run(self, load):
        # Every torch op of the server runs on this one thread, loading and warm-up included. Each thread that runs
        # torch ops on CPU gets its own OpenMP thread team, and once a process has more OpenMP threads than cores,
        # libgomp stops spinning between parallel regions and puts threads to sleep instead: the tiny model's
        # predict_action took 34 ms that way instead of 12 ms (HTTP threads only parse; they never touch torch).
        try:
            self.vla = load()
        except BaseException as e:  # noqa: BLE001 (handed to the constructor, which re-raises it on its thread)
            self.load_error = e
            return
        finally:
            self.loaded.set()
        stop, last_size = False, 1
        while not stop:
            job = self.jobs.get()
            if job is None:
                return
            wait = self.max_wait_s if last_size > 1 or self.jobs.qsize() or self.n_arriving else 0.0
            batch, deadline = [job], time.monotonic() + wait
            while len(batch) < self.max_batch_size:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self.run_batch(batch)
            self.n_batches, last_size = self.n_batches + 1, len(batch)
            for job in batch:
                job.batch_size = len(batch)
                job.done.set()

    def run_batch(self, batch: list[Job]):
        import torch

        try:
            with torch.inference_mode():
                actions = self.vla.predict_actions(
                    [j.image for j in batch], [j.instruction for j in batch], unnorm_key=[j.unnorm_key for j in batch]
                )
            for job, action in zip(batch, actions, strict=True):
                job.action = np.asarray(action, dtype=np.float64)
        except Exception as e:  # the server keeps serving: the requests get 500, the traceback goes to the log
            if len(batch) > 1:  # retry one by one, so a request that breaks the model fails alone
                log.warning("batch of %d failed (%s: %s); retrying one at a time", len(batch), type(e).__name__, e)
                for job in batch:
                    self.run_batch([job])
                return
            log.exception("model failed on instruction %r", batch[0].instruction)
            batch[0].error = f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# HTTP


class PolicyServer(ThreadingHTTPServer):
    """Binds at construction (a busy port fails before the model loads); attach(load) starts the model worker, which
    calls load() -> model on its own thread."""

    daemon_threads = False  # server_close() then joins the request threads: requests in flight finish on shutdown
    request_queue_size = 128  # listen backlog; the default 5 drops connections from bursts of clients (1 s retries)

    def __init__(self, config: ServeConfig):
        self.config, self.vla, self.batcher = config, None, None
        self.started, self.lock, self.counts = time.monotonic(), threading.Lock(), {"served": 0, "failed": 0}
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET  # "::1" or "::" too
        try:
            super().__init__((config.host, config.port), Handler)
        except OSError as e:
            raise SystemExit(f"cannot listen on {config.host}:{config.port} ({e}); pick another --config.port, "
                             "or 0 for any free one") from None

    def attach(self, load):
        self.batcher = Batcher(load, self.config.max_batch_size, self.config.max_wait_ms, self.config.max_pending)
        self.vla = self.batcher.vla
        return self

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server_address[1]}"

    def stop(self):
        """Graceful: stop accepting, let request threads finish (server_close joins them), then stop the worker."""
        self.shutdown()  # returns once serve_forever has left its loop; call it from another thread
        self.server_close()
        self.batcher.close()


class Handler(BaseHTTPRequestHandler):
    server: PolicyServer
    timeout = 60  # seconds a client may stall mid-request before its thread gives up (slow-loris clients)

    def handle_request(self):
        start, self.batch_size, self.body_read, self.extra_headers = time.perf_counter(), 0, False, {}
        try:
            status, body, ctype = 200, *self.route()
        except HTTPError as e:
            status, body, ctype = e.status, self.error_body(e), "application/json"
            self.extra_headers = e.headers
        except Exception as e:  # a bug in this file: 500, logged, and the server keeps serving
            log.exception("internal error on %s %s", self.command, self.path)
            status, body, ctype = 500, self.error_body(HTTPError(500, f"internal error: {type(e).__name__}: {e}")), "application/json"
        self.send(status, body, ctype)
        self.discard_unread_body()
        if self.path.split("?")[0] == "/act":
            with self.server.lock:
                self.server.counts["served" if status == 200 else "failed"] += 1
        batch = f" batch={self.batch_size}" if self.batch_size else ""
        log.info("%s %s %s %d %.1fms%s", self.client_address[0], self.command, self.path[:100], status,
                 1e3 * (time.perf_counter() - start), batch)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_request  # route() answers 405s

    def route(self) -> tuple[bytes, str]:
        path = self.path.split("?")[0]
        if path not in ROUTES:
            raise HTTPError(404, f"no route {path}", "POST /act, GET /health or GET /")
        if self.command not in ROUTES[path]:
            allowed = ", ".join(ROUTES[path])
            raise HTTPError(405, f"{self.command} {path} is not allowed", f"{allowed} {path}", {"Allow": allowed})
        if path == "/":
            return __doc__.encode(), "text/plain; charset=utf-8"
        self.check_token()
        if path == "/health":
            return json.dumps(self.health()).encode(), "application/json"
        with self.server.batcher.arriving():
            image, instruction, unnorm_key, form = parse_act(self.read_body(), self.server.vla.norm_stats, self.server.config)
        job = self.server.batcher.submit(image, instruction, unnorm_key)
        self.batch_size = job.batch_size
        if job.error:
            raise HTTPError(500, f"model failed: {job.error}", "a valid request; the traceback is in the server log")
        return encode_action(job.action, form), "application/json"

    def check_token(self):
        token = self.server.config.token
        given = self.headers.get("Authorization", "")
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):  # constant-time compare
            raise HTTPError(401, "missing or wrong bearer token", "header 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})

    def read_body(self) -> bytes:
        length, limit = self.headers.get("Content-Length"), self.server.config.max_body_bytes
        if length is None:
            raise HTTPError(411, "missing Content-Length header", "a JSON body with its Content-Length")
        if not length.isdigit():
            raise HTTPError(400, f"bad Content-Length {length!r}", "a non-negative integer")
        if int(length) > limit:
            raise HTTPError(413, f"body is {int(length)} bytes", f"at most {limit} bytes (--config.max-body-bytes)")
        self.body_read = True
        return self.rfile.read(int(length))

    def discard_unread_body(self):
        # Closing a socket with unread data makes the kernel send a reset, which can destroy our answer before the
        # client reads it. So a rejected request's body is read and dropped (up to a bound) and the client sees its 4xx.
        length = self.headers.get("Content-Length", "")
        if self.body_read or not length.isdigit():
            return
        remaining = min(int(length), 4 * self.server.config.max_body_bytes)
        self.connection.settimeout(2)
        try:
            while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 16))):
                remaining -= len(chunk)
        except OSError:
            pass

    def health(self) -> dict:
        vla, server = self.server.vla, self.server
        with server.lock:
            counts = dict(server.counts)
        weight = next(vla.parameters())  # where and in what dtype the model actually lives
        return {
            "status": "ok", "model": server.config.checkpoint, "device": str(weight.device),
            "dtype": str(weight.dtype).removeprefix("torch."), "unnorm_keys": sorted(vla.norm_stats),
            "uptime_s": round(time.monotonic() - server.started, 1), "requests_served": counts["served"],
            "requests_failed": counts["failed"], "batches": server.batcher.n_batches,
            "max_batch_size": server.config.max_batch_size,
            "max_wait_ms": server.config.max_wait_ms,
        }

    def error_body(self, e: HTTPError) -> bytes:
        return json.dumps({"error": e.error, "expected": e.expected} if e.expected else {"error": e.error}).encode()

    def send(self, status: int, body: bytes, ctype: str):
        self.send_response(status)
        for name, value in getattr(self, "extra_headers", {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting; nothing left to tell it
            log.info("%s went away before its %d answer", self.client_address[0], status)

    def send_error(self, code, message=None, explain=None):
        # http.server calls this for what it rejects itself: a bad request line, overlong headers, and any method
        # without a do_* (501). Answer those in JSON too; an unknown method is the client's error, so 405.
        if code == 501:
            code, message = 405, f"method {self.command} not allowed"
        self.extra_headers = {"Allow": "GET, POST"} if code == 405 else {}
        self.send(code, self.error_body(HTTPError(code, message or "bad request", "POST /act, GET /health or GET /")),
                  "application/json")
        log.info("%s %s %s %d", self.client_address[0], self.command, getattr(self, "path", "")[:100], code)

    def log_message(self, format, *args):
        pass  # handle_request writes one line per request instead


# ----------------------------------------------------------------------------------------------------------------


def load_policy(config: ServeConfig):
    """The model from config.checkpoint, warmed up (first-call allocations and kernel selection happen here)."""
    import torch

    from model import VLA

    path = Path(config.checkpoint)
    if not path.is_dir():
        raise SystemExit(f"no checkpoint directory at {path}. Train the demo policy with `python train.py`, or pass "
                         "--config.checkpoint DIR (e.g. ../shared/fixtures/openvla-tiny, or a downloaded openvla-7b)")
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--config.device {device}: no CUDA device visible; use --config.device cpu")
    dtype = getattr(torch, config.dtype if config.dtype != "auto" else "bfloat16" if device != "cpu" else "float32")
    t0 = time.perf_counter()
    try:
        vla = VLA.from_pretrained(path, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as e:  # model.py's messages say what is missing or wrong
        raise SystemExit(f"cannot load {path}: {e}") from None
    t1 = time.perf_counter()
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    vla.predict_actions([image], ["warm up"], unnorm_key=sorted(vla.norm_stats)[0])
    log.info("loaded %s on %s in %s (%.1fs), warm-up %.2fs; unnorm keys: %s", path, device, str(dtype).removeprefix("torch."),
             t1 - t0, time.perf_counter() - t1, ", ".join(sorted(vla.norm_stats)))
    return vla


def main(config: ServeConfig) -> dict:
    """Serve until SIGINT/SIGTERM; returns the final request counts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config.token = config.token or os.environ.get("NANOVLA_TOKEN", "")
    if config.max_batch_size < 1 or config.max_wait_ms < 0 or config.max_body_bytes < 1:
        raise SystemExit("--config.max-batch-size must be >= 1, --config.max-wait-ms >= 0, --config.max-body-bytes >= 1")
    server = PolicyServer(config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        log.warning("listening on %s without --config.token: anyone who reaches this port can move the robot", config.host)
    server.attach(lambda: load_policy(config))  # on the model worker thread, with every other torch op

    stopping = threading.Event()

    def on_signal(signum, frame):
        log.info("%s: finishing requests in flight, then exiting (again to force)", signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # serve_forever runs in a thread because shutdown() must come from another thread than the one serving.
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("serving %s on %s (POST /act, GET /health, GET /)%s", config.checkpoint, server.url,
             " with a bearer token" if config.token else "")
    while not stopping.wait(0.5):  # a timed wait lets the main thread run the signal handler promptly
        pass
    server.stop()
    log.info("stopped after %d requests served, %d failed", server.counts["served"], server.counts["failed"])
    return dict(server.counts)


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
