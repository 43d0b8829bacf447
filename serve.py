"""HTTP policy server: POST an image and an instruction to /act, get the robot action back.

A drop-in for openvla's `vla-scripts/deploy.py` (its json_numpy clients work unchanged); one model worker batches.

    python serve.py --config.checkpoint checkpoints/openvla-7b --config.token "$TOKEN" --config.host 0.0.0.0

A client (`import json_numpy; json_numpy.patch()` first; "unnorm_key" may go if the checkpoint knows one dataset):
    requests.post("http://127.0.0.1:8000/act", json={"image": np.zeros((256, 256, 3), np.uint8),
                  "instruction": "pick up the cup", "unnorm_key": "bridge_orig"}).json()
Request forms (the answer comes back in the form its client reads):
    {"image": <json_numpy uint8 (H, W, 3)>, "instruction": str, "unnorm_key": str}  -> json_numpy float64 (action_dim,)
    {"encoded": json_numpy.dumps(that same dict)}                                   -> a JSON string holding the above
    {"image": [[[r, g, b], ...], ...] (ints 0..255), ...}                            -> a plain JSON list of floats
    {"image": "<base64 PNG or JPEG, optionally a data: URL>", ...}                  -> a plain JSON list of floats
Errors: 4xx (5xx: the server's own) with {"error": what was wrong, "expected": what would work}. GET /health: 503
{"status": "loading"} until the model is ready, then 200 with its device, dtype, unnorm keys and request counts.
"""

import base64
import contextlib
import hmac
import io
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

import json_numpy
import numpy as np
from PIL import Image

from tokenizer import resolve_unnorm_key

log = logging.getLogger("serve")


@dataclass
class ServeConfig:
    checkpoint: str = "checkpoints/demo"  # OpenVLA-layout checkpoint directory (train.py's, finetune.py's, openvla-7b)
    host: str = "127.0.0.1"  # The default reaches this machine only; 0.0.0.0 exposes the robot to the network.
    port: int = 8000  # TCP port; 0 picks a free one (the chosen port is logged).
    device: str = "auto"  # cuda, cuda:N or cpu; auto = cuda when available, else cpu.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto = bfloat16 on cuda, float32 on cpu.
    max_batch_size: int = 16  # Most requests the model worker runs in one batched forward; 1 = one at a time.
    max_wait_ms: float = 25.0  # How long a forming batch waits for small requests being decoded (never for none).
    max_connections: int = 64  # Open connections beyond this get 503 at once: each holds a thread.
    max_body_bytes: int = 16 * 2**20  # Largest request body; a 1920x1080 image is 8 MiB as json_numpy.
    max_decode_bytes: int = 16 * 2**20  # Bodies over 1/16 of this share it, decoding in turn; smaller ones go at once.
    max_image_pixels: int = 1920 * 1080  # Largest image (H * W), sized to cameras; the model resizes anyway.
    max_list_pixels: int = 256 * 256  # Largest nested-list image: its parse holds the interpreter ~1 us/pixel.
    max_instruction_bytes: int = 1024  # In UTF-8: <= 1025 tokens with byte fallback, so prompt + 256 patches < 2048.
    request_timeout_s: float = 10.0  # Deadline for a request's line, headers and body (and an idle connection).
    unnorm_key: str = ""  # Statistics for requests that name none (OFT's clients never send one).
    center_crop: bool = True  # OFT models: the central 90% crop (as OFT's deploy.py; False if trained without crops).
    token: str = ""  # Bearer token every request but GET / must carry; if empty, $NANOVLA_TOKEN (keeps it out of ps).


class HTTPError(Exception):  # a refused request: status, what was wrong, and what would work instead
    def __init__(self, status: int, error: str, expected: str = "", headers: dict | None = None):
        super().__init__(error)
        self.status, self.headers, self.fields = status, headers or {}, (status, error, expected, headers)
        self.body = json.dumps({"error": error, "expected": expected} if expected else {"error": error}).encode()

    def __reduce__(self):  # raised in the decoder process, re-raised in the request's thread
        return HTTPError, self.fields


class Offload(Exception):  # a big body or image: the whole body parses in the decoder process (PolicyServer.offload)
    pass


REQUEST_SHAPE = 'a JSON object {"image": uint8 (H, W, 3), "instruction": str, "unnorm_key": str (optional)}; see GET /'
IMAGE_FORMS = "json_numpy uint8 array (H, W, 3), nested lists of ints 0..255 (H, W, 3), or a base64 PNG/JPEG string"
ROUTES = {"/": ("GET", "HEAD"), "/health": ("GET", "HEAD"), "/act": ("POST",)}
RETRY = {"Retry-After": "1"}
SMALL_PIXELS, SMALL_LIST = 640 * 480, 64 * 64  # PNG/JPEG and nested-list pixels that decode in a few ms; more: offload


def big_body(n_bytes: int, config: ServeConfig) -> bool:  # shares the decode budget (admit) and parses offloaded
    return n_bytes > config.max_decode_bytes // 16


def bad(error: str, expected: str = REQUEST_SHAPE) -> HTTPError:  # every failure of request parsing is a 400
    return HTTPError(400, error, expected)


def numpy_hook(obj: dict):
    """json_numpy's object hook, once dtype and shape are checked: an object dtype would mean unpickling."""
    if "__numpy__" not in obj:
        return obj
    descr, shape, kind = obj.get("dtype"), obj.get("shape"), "?"
    with contextlib.suppress(TypeError, ValueError):
        kind = np.dtype(descr).kind if isinstance(descr, str) else "?"
    if kind not in "biuf":
        raise bad(f"json_numpy dtype {str(descr)[:50]!r} is not a plain numeric dtype", "'|u1' (uint8) for images")
    if not isinstance(shape, list) or len(shape) > 64 or not all(type(n) is int and n >= 0 for n in shape):
        raise bad(f"bad json_numpy shape {str(shape)[:100]}", "a list of at most 64 non-negative ints")
    try:
        return json_numpy.object_hook(obj)
    except (ValueError, TypeError, OverflowError, IndexError) as e:  # bad base64, a size that disagrees, huge shapes
        raise bad(f"json_numpy array does not decode: {str(e)[:200]}", "base64 bytes of 'shape' x 'dtype'") from None


def load_json(text, what: str):
    try:
        return json.loads(text, object_hook=numpy_hook)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON; RecursionError deep nesting
        raise bad(f"{what} is not valid JSON") from None


def decode_image(value, max_pixels: int, offload=False) -> tuple[np.ndarray, str]:
    """Any accepted image form -> (uint8 (H, W, 3) array, form: the answer's encoding); Offload for a big PNG/JPEG."""
    if isinstance(value, (np.ndarray, np.generic)):  # json_numpy, already decoded by numpy_hook
        image, form = value, "json_numpy"
        if image.dtype != np.uint8:
            raise bad(f"image dtype is {image.dtype}", f"uint8 pixels 0..255; {IMAGE_FORMS}")
    elif isinstance(value, list):
        try:
            image, form = np.array(value), "plain"
        except (ValueError, TypeError):  # ragged lists
            raise bad("image is not a rectangular nested list", IMAGE_FORMS) from None
        if image.dtype.kind not in "iu" or image.size == 0 or image.min() < 0 or image.max() > 255:
            raise bad(f"image holds {image.dtype} values, not ints 0..255", IMAGE_FORMS)
        image = image.astype(np.uint8)
    elif isinstance(value, str):  # a base64 PNG or JPEG, optionally a data: URL
        try:
            img = Image.open(io.BytesIO(base64.b64decode(value.split(",")[-1], validate=True)))  # the header only
        except Exception:  # PIL raises many exception types on hostile files: any failure is the file's
            raise bad("image string is not a base64 PNG or JPEG", IMAGE_FORMS) from None
        if img.format not in ("PNG", "JPEG") or img.width * img.height > max_pixels:  # before decoding any pixel
            raise bad(f"image file is a {img.height}x{img.width} {img.format}", f"a PNG or JPEG of <= {max_pixels} px")
        if offload and img.width * img.height > SMALL_PIXELS:
            raise Offload
        try:
            image, form = np.asarray(img.convert("RGB")), "plain"  # as deploy.py's Image.fromarray(...).convert()
        except Exception:
            raise bad("image file is truncated or corrupt", "a complete PNG or JPEG") from None
    else:
        raise bad(f"field 'image' must be an array, a list or a string, not {type(value).__name__}", IMAGE_FORMS)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise bad(f"image has shape {tuple(image.shape)}", f"(H, W, 3) RGB; {IMAGE_FORMS}")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise bad(f"image is {image.shape[0]}x{image.shape[1]} pixels", f"at most {max_pixels} pixels")
    return image, form


def parse_act(body: bytes, norm_stats: dict, config: ServeConfig, size=0, offload=False):
    """POST /act body -> (image, instruction, unnorm_key, form, state), all checked, the image resized to size x size
    (OpenVLA; 0 keeps it, for OFT's own preparation). With offload, Offload for a big body or image."""
    if (n := body.count(b",")) > 3 * config.max_list_pixels + 64:  # counted before parsing: each list item costs
        raise bad(f"body holds {n} JSON items", f"nested-list images of <= {config.max_list_pixels} px; json_numpy")
    if offload and (big_body(len(body), config) or n > 3 * SMALL_LIST):
        raise Offload
    payload = load_json(body, "body")
    if encoded := isinstance(payload, dict) and "encoded" in payload:  # deploy.py's {"encoded": json_numpy text}
        if not isinstance(payload["encoded"], str):
            raise bad("field 'encoded' must be a string", '{"encoded": json_numpy.dumps(request)}')
        payload = load_json(payload["encoded"], "field 'encoded'")
    if not isinstance(payload, dict):
        raise bad(f"body is a JSON {type(payload).__name__}, not an object")
    oft_form = "full_image" in payload  # OFT's deploy.py: full_image, then every *wrist* key in order, and state
    if missing := [name for name in ("full_image" if oft_form else "image", "instruction") if name not in payload]:
        raise bad(f"missing field '{missing[0]}'")
    instruction, unnorm_key = payload["instruction"], payload.get("unnorm_key") or config.unnorm_key or None
    if not isinstance(instruction, str):
        raise bad(f"field 'instruction' must be a string, not {type(instruction).__name__}", "e.g. 'pick up the cup'")
    try:
        n_bytes = len(instruction.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates such as "\ud800" survive JSON parsing but not UTF-8
        raise bad("instruction is not valid Unicode", "a UTF-8 string") from None
    if not instruction.strip() or n_bytes > config.max_instruction_bytes:
        raise bad(f"instruction is {f'{n_bytes} bytes' if instruction.strip() else 'empty'}",
                  f"a task such as 'pick up the cup', of at most {config.max_instruction_bytes} UTF-8 bytes")
    if unnorm_key is not None and not isinstance(unnorm_key, str):
        raise bad(f"field 'unnorm_key' must be a string, not {type(unnorm_key).__name__}", f"{sorted(norm_stats)}")
    try:
        unnorm_key = resolve_unnorm_key(norm_stats, unnorm_key)
    except ValueError as e:
        raise bad(str(e), f"unnorm_key one of {sorted(norm_stats)}") from None
    keys = ["full_image"] + [k for k in payload if "wrist" in k] if oft_form else ["image"]
    images = [decode_image(payload[k], config.max_image_pixels, offload) for k in keys]
    image, form = ([im for im, _ in images], "json_numpy") if oft_form else images[0]
    if size and not oft_form:  # the model's own resize, here: off the model's thread
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    if (state := payload.get("state") if oft_form else None) is not None:
        state = np.asarray(state) if isinstance(state, (list, np.ndarray)) else np.array([])
        if state.ndim != 1 or state.size == 0 or state.dtype.kind not in "iuf" or not np.isfinite(state).all():
            raise bad(f"field 'state' is a {state.dtype} array of shape {state.shape}", "1-D finite numbers")
    return image, instruction, unnorm_key, "encoded" if encoded else form, state


def encode_action(action: np.ndarray, form: str) -> bytes:
    a = np.ascontiguousarray(action, dtype="<f8")
    if form == "plain":
        return json.dumps(a.tolist()).encode()  # repr floats: the float64 values round-trip exactly
    a = list(a) if a.ndim == 2 else a  # an OFT chunk: OFT's deploy.py answered a list of (action_dim,) arrays
    return json.dumps(json_numpy.dumps(a)).encode() if form == "encoded" else json_numpy.dumps(a).encode()


@dataclass(eq=False)
class Job:  # a parsed /act request: its HTTP thread hands it to the one model worker, which batches jobs
    image: np.ndarray
    instruction: str
    unnorm_key: str
    done: threading.Event
    proprio: np.ndarray | None = None  # OFT requests: the raw robot state
    action: np.ndarray | None = None
    error: str = ""
    batch_size: int = 0


class PolicyServer(ThreadingHTTPServer):
    """Binds at once (a busy port fails before loading); attach(load) loads on the model worker, which then batches."""

    daemon_threads = False  # server_close() then joins the request threads: requests in flight finish on shutdown
    request_queue_size = 128  # listen backlog; the default 5 drops connections from bursts of clients (1 s retries)

    def __init__(self, config: ServeConfig):
        self.config, self.vla, self.jobs, self.lock = config, None, queue.Queue(), threading.Lock()
        self.started, self.counts, self.n_batches = time.monotonic(), {"served": 0, "failed": 0}, 0
        self.connections, self.decoding, self.heavy_bytes, self.cond = set(), 0, 0, threading.Condition()
        self.worker, self.loaded, self.load_error = None, threading.Event(), None
        self.address_family = socket.AF_INET6 if ":" in config.host else socket.AF_INET  # "::1" or "::" too
        try:
            super().__init__((config.host, config.port), Handler)
        except OSError as e:
            raise SystemExit(f"cannot listen on {config.host}:{config.port} ({e}); try another --config.port") from None
        self.url, self.decoder = f"http://{config.host}:{self.server_address[1]}", self.new_decoder()

    def attach(self, load):
        self.worker = threading.Thread(target=self.run, args=(load,), name="model-worker", daemon=True)
        self.worker.start()
        self.loaded.wait()
        if self.load_error is not None:
            raise self.load_error
        return self

    def verify_request(self, request, client_address) -> bool:
        with self.lock:  # on the accepting thread, before a request thread exists: excess connections are refused
            if len(self.connections) < self.config.max_connections:
                self.connections.add(request)
                return True
        with contextlib.suppress(OSError):
            request.settimeout(1)
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
        return False

    def shutdown_request(self, request):
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    @contextlib.contextmanager
    def admit(self, n_bytes: int, deadline: float):
        """Bodies over 1/16 of max_decode_bytes are read and decoded within it (one alone always may; 503 if not
        admitted in time): memory stays bounded. Camera-sized ones go at once, so big ones cannot starve them."""
        heavy = n_bytes if big_body(n_bytes, self.config) else 0
        with self.cond:
            fits = lambda: not heavy or not self.heavy_bytes or self.heavy_bytes + heavy <= self.config.max_decode_bytes
            if not self.cond.wait_for(fits, timeout=max(0.0, deadline - time.monotonic())):
                raise HTTPError(503, "server busy decoding other requests", "retry shortly", RETRY)
            self.heavy_bytes, self.decoding = self.heavy_bytes + heavy, self.decoding + (not heavy)
        try:
            yield
        finally:
            with self.cond:
                self.heavy_bytes, self.decoding = self.heavy_bytes - heavy, self.decoding - (not heavy)
                self.cond.notify_all()

    def new_decoder(self):  # spawned: forking a process that runs threads can copy a held lock
        decoder = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=getattr(os, "nice", None),
                                      initargs=(19,))  # the lowest CPU priority: the model's threads come first
        decoder.submit(parse_act, b"{}", {}, self.config)  # starts it, importing this file there: not on a request
        return decoder

    def offload(self, body: bytes, size: int, deadline: float):
        """parse_act in the decoder process, one body at a time: a big parse holds the interpreter lock for tens of ms
        in C, which would stall each op of a forward beside it, and its CPU yields to the model there. 503 if late."""
        small, decoder = not big_body(len(body), self.config), self.decoder  # admit() counted a small one as decoding:
        with self.cond:  # no forming batch should wait for it
            self.decoding -= small
        try:
            future = decoder.submit(parse_act, body, self.vla.norm_stats, self.config, size)
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()  # not begun: never will be
            raise HTTPError(503, "server busy decoding other big requests", "retry shortly", RETRY) from None
        except BrokenProcessPool:  # the decoder died (killed, out of memory): one fresh one for the next requests
            with self.lock:
                self.decoder = self.new_decoder() if self.decoder is decoder else self.decoder
            raise HTTPError(503, "the decoder process restarted", "retry shortly", RETRY) from None
        finally:
            with self.cond:
                self.decoding += small

    def stop(self):
        """Stop accepting, end every connection's reading, answer the requests already read, stop the worker."""
        self.shutdown()  # returns once serve_forever has left its loop; call it from another thread
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RD)  # a blocked read returns end-of-file; answers can still be sent
        self.server_close()  # joins the request threads
        if self.worker is not None and self.worker.is_alive():
            self.jobs.put(None)  # after the jobs already queued
            self.worker.join()
        self.decoder.shutdown(cancel_futures=True)

    def run(self, load):  # every torch op runs on this thread: an OpenMP team per torch thread would oversubscribe
        try:
            self.vla = load()
        except BaseException as e:  # noqa: BLE001 (attach() re-raises it on its own thread)
            self.load_error = e
            return
        finally:
            self.loaded.set()
        while (job := self.jobs.get()) is not None:  # a batch waits only for small requests being decoded now
            wait = self.config.max_wait_ms / 1e3 if self.decoding else 0.0
            batch, deadline = [job], time.monotonic() + wait
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.config.max_batch_size and batch[-1] is not None:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            if batch[-1] is None:  # stop(), once this batch is answered
                self.jobs.put(batch.pop())
            self.run_batch(batch)
            self.n_batches += 1
            for job in batch:
                job.batch_size = len(batch)
                job.done.set()

    def run_batch(self, batch: list[Job]):
        import torch

        try:
            with torch.inference_mode():
                proprio = None if batch[0].proprio is None else [j.proprio for j in batch]
                actions = self.vla.predict_actions([j.image for j in batch], [j.instruction for j in batch],
                                                   [j.unnorm_key for j in batch], proprio, self.config.center_crop)
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


class DeadlineReader(socket.SocketIO):  # reads share one deadline: a client trickling bytes cannot hold on past it
    deadline = float("inf")

    def readinto(self, b):
        self._sock.settimeout(max(1e-3, self.deadline - time.monotonic()))
        return super().readinto(b)


class Handler(BaseHTTPRequestHandler):
    server: PolicyServer
    protocol_version = "HTTP/1.1"  # keep-alive, and 100 Continue for clients that send `Expect: 100-continue`
    default_request_version = "HTTP/1.0"  # so even a malformed request line is answered with a status line

    def setup(self):
        super().setup()
        self.rfile.close()
        self.reader = DeadlineReader(self.connection, "rb")
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.deadline = time.monotonic() + self.server.config.request_timeout_s  # idle time counts too
        self.body_read, self.extra_headers = False, {}
        super().handle_one_request()

    def handle_expect_100(self):
        return True  # read_body sends the 100 once the headers passed their checks, so a rejection comes first

    def handle_request(self):
        start, self.batch_size = time.perf_counter(), 0
        try:
            status, body, ctype = self.route()
        except Exception as e:
            if not isinstance(e, HTTPError):  # a bug in this file: 500, logged, and the server keeps serving
                log.exception("internal error on %s %s", self.command, self.path)
                e = HTTPError(500, f"internal error: {type(e).__name__}: {e}")
            status, body, ctype, self.extra_headers = e.status, e.body, "application/json", e.headers
        unread = not self.body_read and any(map(self.headers.get, ("Content-Length", "Transfer-Encoding")))
        self.close_connection |= unread  # what is left of this request is not the next one
        self.send(status, body, ctype)
        if unread:  # closing with unread data sends a reset that can destroy our answer: read and drop the body
            with contextlib.suppress(HTTPError, OSError):
                remaining = 0 if self.headers.get("Expect", "").lower() == "100-continue" else self.content_length()
                while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 16))):
                    remaining -= len(chunk)
        if self.path.split("?")[0] == "/act":
            with self.server.lock:
                self.server.counts["served" if status == 200 else "failed"] += 1
        self.log_line(status, f" {1e3 * (time.perf_counter() - start):.1f}ms batch={self.batch_size}")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_request  # route() answers 405s

    def route(self) -> tuple[int, bytes, str]:
        path, server, token = self.path.split("?")[0], self.server, self.server.config.token
        if path not in ROUTES:
            raise HTTPError(404, f"no route {path[:100]}", "POST /act, GET /health or GET /")
        if self.command not in ROUTES[path]:
            allowed = ", ".join(ROUTES[path])
            raise HTTPError(405, f"{self.command} {path} is not allowed", f"{allowed} {path}", {"Allow": allowed})
        if path == "/":
            return 200, __doc__.encode(), "text/plain; charset=utf-8"
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")  # the scheme is case-insensitive
        if token and not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
            raise HTTPError(401, "missing or wrong bearer token", "header 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})  # compare_digest: constant time
        if path == "/health":
            return 200 if server.vla is not None else 503, json.dumps(self.health()).encode(), "application/json"
        if server.vla is None:
            raise HTTPError(503, "the model is still loading", "retry; GET /health says when it is ready", RETRY)
        length, deadline = self.content_length(), self.reader.deadline
        size = 0 if getattr(server.vla, "action_head", None) is not None else server.vla.config.vision[0].image_size
        with server.admit(length, deadline):  # images are decoded only once admitted
            try:
                parsed = parse_act(body := self.read_body(length), server.vla.norm_stats, server.config, size, True)
            except Offload:
                parsed = server.offload(body, size, deadline)
            image, instruction, unnorm_key, form, state = parsed
        if (state is None) != (getattr(server.vla, "proprio_projector", None) is None) or (
                state is not None and "proprio" not in server.vla.norm_stats[unnorm_key]):
            raise bad(f"field 'state' {'missing' if state is None else 'not usable'} for this model",
                      "'state' (raw robot state) exactly when the model has a proprio projector and its statistics")
        server.jobs.put(job := Job(image, instruction, unnorm_key, threading.Event(), state))
        job.done.wait()  # the model worker answers it, or sets its error
        self.batch_size = job.batch_size
        if job.error:
            raise HTTPError(500, f"model failed: {job.error}", "a valid request; the traceback is in the server log")
        return 200, encode_action(job.action, form), "application/json"

    def content_length(self) -> int:
        values, limit = self.headers.get_all("Content-Length") or [], self.server.config.max_body_bytes
        if not values:
            raise HTTPError(411, "missing Content-Length header", "a JSON body with its Content-Length")
        if len(set(values)) > 1 or not (values[0].isascii() and values[0].isdigit()):  # isdigit() alone accepts '²'
            raise bad(f"bad Content-Length {str(values[:4])[:100]}", "one Content-Length, a non-negative integer")
        if int(values[0]) > limit:
            raise HTTPError(413, f"body is {int(values[0])} bytes", f"at most {limit} bytes (--config.max-body-bytes)")
        return int(values[0])

    def read_body(self, length: int) -> bytes:
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        self.body_read = True
        with contextlib.suppress(TimeoutError):
            if len(body := self.rfile.read(length)) == length:
                return body
            self.close_connection = True  # what is left on this connection is not a request
            raise HTTPError(400, f"body ended after {len(body)} of {length} bytes", "as many bytes as Content-Length")
        self.close_connection = True
        raise HTTPError(408, f"body not received within {self.server.config.request_timeout_s} s", "the body, promptly")

    def health(self) -> dict:
        server, config = self.server, self.server.config  # the directory's name for anyone; its path with the token
        name = {"model": Path(config.checkpoint).name, **({"checkpoint": config.checkpoint} if config.token else {})}
        if server.vla is None:
            return {"status": "loading", **name}
        weight = next(server.vla.parameters())  # where and in what dtype the model actually lives
        return {"status": "ok", **name, "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
                "unnorm_keys": sorted(server.vla.norm_stats), "uptime_s": round(time.monotonic() - server.started, 1),
                **{f"requests_{k}": n for k, n in server.counts.items()}, "batches": server.n_batches}

    def send(self, status: int, body: bytes, ctype: str):
        self.connection.settimeout(self.server.config.request_timeout_s)  # the answer, too, has a deadline
        self.send_response(status)
        headers = {**self.extra_headers, "Content-Type": ctype, "Content-Length": str(len(body))}
        for name, value in (headers | ({"Connection": "close"} if self.close_connection else {})).items():
            self.send_header(name, value)
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client gave up waiting, or shutdown cut it off: nothing left to tell it
            log.info("%s went away before its %d answer", self.client_address[0], status)

    def send_error(self, code, message=None, explain=None):
        # http.server's own rejections (bad request line, long headers, no do_* method: 501 -> 405), in JSON too
        if code == 501:
            code, message = 405, f"method {self.command} not allowed"
        self.extra_headers, self.close_connection = {"Allow": "GET, POST"} if code == 405 else {}, True
        self.send(code, HTTPError(code, message or "bad request", "POST /act, GET /health or GET /").body,
                  "application/json")
        self.log_line(code)

    def log_line(self, status: int, extra: str = ""):  # one line per request; http.server's log_message is silenced
        what = f"{self.command} {getattr(self, 'path', '')[:100]}".encode("unicode_escape").decode()  # no raw ESC
        log.info("%s %s %d%s", self.client_address[0], what, status, extra)

    log_message = lambda self, format, *args: None  # noqa: E731


def load_policy(config: ServeConfig):
    """The model from config.checkpoint, warmed up."""
    import torch

    from model import VLA

    path = Path(config.checkpoint)
    if not path.is_dir():
        raise SystemExit(f"no checkpoint directory at {path}: train one with `python train.py` or pass "
                         "--config.checkpoint DIR (e.g. ../shared/fixtures/openvla-tiny or a downloaded openvla-7b)")
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--config.device {device}: no CUDA device visible; use --config.device cpu")
    dtype = getattr(torch, config.dtype if config.dtype != "auto" else "bfloat16" if device != "cpu" else "float32")
    try:
        vla = VLA.from_pretrained(path, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError) as e:  # model.py's messages say what is missing or wrong
        raise SystemExit(f"cannot load {path}: {e}") from None
    proprio = None if vla.proprio_projector is None else [np.zeros(vla.proprio_projector.fc1.in_features)]
    keys = [k for k in sorted(vla.norm_stats) if proprio is None or "proprio" in vla.norm_stats[k]]
    vla.predict_actions([np.zeros((224, 224, 3), dtype=np.uint8)], ["warm up"], config.unnorm_key or keys[0], proprio)
    log.info("loaded %s on %s in %s; unnorm keys: %s", path, device, dtype, ", ".join(sorted(vla.norm_stats)))
    return vla


def main(config: ServeConfig) -> dict:
    """Serve until SIGINT/SIGTERM; returns the final request counts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config.token = config.token or os.environ.get("NANOVLA_TOKEN", "")
    if min(config.max_batch_size, config.max_body_bytes, config.max_connections) < 1 or config.max_wait_ms < 0:
        raise SystemExit("--config.max-batch-size, -max-body-bytes, -max-connections must be >= 1, -max-wait-ms >= 0")
    server = PolicyServer(config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.token:
        log.warning("on %s without --config.token: anyone who reaches this port can move the robot", config.host)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the main thread then stops the server: answers in flight finish
        signal.signal(sig, lambda signum, frame: stopping.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()  # shutdown() needs another thread
    log.info("loading %s; GET %s/health says 503 until it is ready", config.checkpoint, server.url)
    try:
        server.attach(lambda: load_policy(config))  # on the model worker thread, with every other torch op
    except BaseException:
        server.stop()
        raise
    log.info("serving %s on %s (POST /act, GET /health, GET /)", config.checkpoint, server.url)
    while not stopping.wait(0.5):  # a timed wait lets the main thread run the signal handler promptly
        pass
    server.stop()
    log.info("stopped after %d requests served, %d failed", server.counts["served"], server.counts["failed"])
    return dict(server.counts)


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
