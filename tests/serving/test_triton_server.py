"""A real Triton Inference Server (pytriton's bundled tritonserver 2.51, CPU, Python backend) serving the shipped
demo artifact through `ldm-deploy serve`: health and metrics, byte-identity with `ldm-deploy generate`, batching of
concurrent requests, a full queue, timeouts, gRPC cancellation inside a batch, malformed requests, SIGTERM.

The server runs from the serving environment (.venv-serve: numpy < 2, made by `make serve-venv`, which
`make test` makes first); the tests skip, naming that command, where it is missing. Loopback only, free ports,
every wait bounded.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVE_VENV = Path(os.environ.get("LDM_DEPLOY_SERVE_VENV", ROOT / ".venv-serve"))
SERVE = SERVE_VENV / "bin" / "ldm-deploy"
DEMO_MODEL = ROOT / "models" / "shapes-demo"
QUEUE = 8            # the fixture server's max_queue_size
PROMPTS = ["a large red circle in the center on a white background",
           "a medium blue square at the top left on a yellow background",
           "a small purple triangle at the bottom right on a white background",
           "a large yellow star on the left on a blue background"]

pytestmark = [pytest.mark.slow,   # the demo export (~20-60 s) and a server start; each test is seconds
              pytest.mark.skipif(not SERVE.is_file(), reason=f"no serving environment at {SERVE_VENV}: "
                                 "run `make serve-venv` (numpy<2, ldm-deploy[serve])")]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(check, what: str, limit_s: float = 120.0, every_s: float = 0.05):
    """Poll `check()` until it returns a true value; fail naming `what` after `limit_s` (a safety bound only)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"gave up waiting for {what} after {limit_s:.0f} s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception:
        return 0


class Server:
    def __init__(self, artifact: Path, log_path: Path, *extra: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log_path = log_path
        cmd = [str(SERVE), "serve", str(artifact), "--backend", "ort-cpu", "--host", "127.0.0.1",
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               *extra]
        self.log_file = open(log_path, "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.proc.poll() is not None or http_status(self.url("/v2/health/ready")) == 200,
                 "the server to become ready")
        assert self.proc.poll() is None, self.log()
        # Triton brings its metrics listener up on its own: ready on HTTP does not mean /metrics answers yet
        wait_for(lambda: self.proc.poll() is not None
                 or http_status(f"http://127.0.0.1:{self.metrics}/metrics") == 200, "the metrics endpoint")
        assert self.proc.poll() is None, self.log()

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        m = re.search(rf'^{name}{{model="ldm",version="1"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else float("nan")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory) -> Path:
    """The shipped shapes model exported once (fp32, batch 1..4, 64..128 px)."""
    from ldm_deploy.export.config import load_config
    from ldm_deploy.export.exporter import export_model

    return export_model(DEMO_MODEL, tmp_path_factory.mktemp("serve") / "demo-onnx", load_config("demo")).path


@pytest.fixture(scope="module")
def pipe(demo_artifact):
    from ldm_deploy.runtime.pipeline import Pipeline

    return Pipeline.from_artifact(demo_artifact)


@pytest.fixture(scope="module")
def server(demo_artifact, tmp_path_factory):
    # a 400 ms batching window: requests sent together land in one batch even on a loaded CI machine
    s = Server(demo_artifact, tmp_path_factory.mktemp("serve") / "server.log", "--max-queue-size", str(QUEUE),
               "--queue-delay-ms", "400")
    yield s
    while _clients:
        _clients.pop().close()
    assert s.stop() == 0, s.log()[-2000:]


_clients: list = []


def http_client(server):
    """A client closed at module teardown (open keep-alive connections would hold Triton's shutdown)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}", network_timeout=300.0, concurrency=16)
    _clients.append(client)
    return client


def inputs(module, prompt, **values):
    from ldm_deploy.serving.client import request_tensors

    out = []
    for name, dtype, array in request_tensors(prompt, **values):
        t = module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def alone(pipe, prompt, seed, steps, size=64, guidance=5.0, scheduler=None):
    return pipe(prompt, steps=steps, guidance=guidance, seed=seed, height=size, width=size,
                scheduler=scheduler).images[0]


def test_health_endpoints_and_metrics(server):
    assert http_status(server.url("/v2/health/ready")) == 200
    assert http_status(server.url("/v2/health/live")) == 200
    assert http_status(server.url("/v2/models/ldm/ready")) == 200
    assert server.metric("nv_inference_pending_request_count") == 0
    assert server.metric("nv_inference_queue_duration_us") >= 0


def test_one_request_equals_generate_byte_for_byte(server, demo_artifact, tmp_path):
    from PIL import Image

    from ldm_deploy.cli import main

    served = tmp_path / "served.png"
    args = ["--prompt", PROMPTS[0], "--seed", "7", "--steps", "8", "--guidance", "5", "--scheduler", "euler-ancestral"]
    assert main(["client", server.url(), *args, "--out", str(served), "-q"]) == 0
    assert main(["generate", str(demo_artifact), *args, "--out", str(tmp_path / "gen.png"), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(served)), np.asarray(Image.open(tmp_path / "gen.png")))


def test_batching_full_queue_and_cancellation_inside_a_batch(server, pipe):
    """Four long requests run as one batch; one is cancelled over gRPC mid-loop and the other three finish
    with their images alone. Meanwhile eight short requests fill the queue, a ninth is rejected at once,
    and the eight then run as two batches of four, each image equal to its image alone."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    long_steps = 120
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    _clients.append(grpc)
    long_results: dict[int, tuple] = {}
    done = threading.Event()

    def on_long(i):
        def callback(result, error):
            long_results[i] = (result, error)
            if len(long_results) == 4:
                done.set()
        return callback

    calls = [grpc.async_infer("ldm", inputs(grpcclient, PROMPTS[i], seed=np.int64(20 + i), steps=np.int32(long_steps),
                                             guidance=np.float32(5.0), height=np.int32(64), width=np.int32(64)),
                              callback=on_long(i)) for i in range(4)]
    wait_for(lambda: f"batch of 4: {long_steps} steps" in server.log(), "the long batch to start")

    client = http_client(server)
    short = [client.async_infer("ldm", inputs(httpclient, PROMPTS[i % 4], seed=np.int64(100 + i), steps=np.int32(4),
                                              guidance=np.float32(5.0), height=np.int32(64), width=np.int32(64)))
             for i in range(QUEUE)]
    wait_for(lambda: server.metric("nv_inference_pending_request_count") == QUEUE, "eight queued requests")
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="queue size"):
        client.infer("ldm", inputs(httpclient, "one too many", steps=np.int32(4), height=np.int32(64),
                                   width=np.int32(64)))
    calls[2].cancel()
    assert done.wait(timeout=300)
    assert "CANCELLED" in str(long_results[2][1]) or "cancel" in str(long_results[2][1]).lower()
    stopped = re.search(r"request with seed 22: request cancelled by the client after (\d+) steps", server.log())
    assert stopped and int(stopped.group(1)) < long_steps       # ended at the step after the cancel, not the last
    for i in (0, 1, 3):
        result, error = long_results[i]
        assert error is None, error
        assert result.as_numpy("batch_size").item() == 4
        assert np.array_equal(result.as_numpy("image")[0], alone(pipe, PROMPTS[i], 20 + i, long_steps)), i

    results = [r.get_result() for r in short]
    assert sorted(r.as_numpy("batch_size").item() for r in results) == [4] * QUEUE
    for i, r in enumerate(results):
        assert np.array_equal(r.as_numpy("image")[0], alone(pipe, PROMPTS[i % 4], 100 + i, 4)), i
    assert http_status(server.url("/v2/health/ready")) == 200


def test_request_timeout(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = http_client(server)
    with pytest.raises(InferenceServerException, match=r"timed out after \d+ of 500 steps"):
        # 1.5 s (in µs): past the 0.4 s batching window, so the loop's deadline (not the queue's) ends it
        client.infer("ldm", inputs(httpclient, PROMPTS[0], steps=np.int32(500)), timeout=1_500_000)
    assert http_status(server.url("/v2/health/ready")) == 200


@pytest.mark.parametrize("values, words", [
    ({"prompt": None, "steps": np.int32(3)}, "input 'prompt' is missing"),
    ({"seed": np.float32(1.5)}, "expects 'INT64'"),
    ({"steps": np.int32(0)}, "input 'steps' is 0; it must be in [1, 500]"),
    ({"height": np.int32(256)}, "input 'height' is 256; the artifact's profile takes multiples of 8 in [64, 128]"),
    ({"prompt": "a" * (10 << 20)}, "input 'prompt' is 10485760 bytes; at most 16384"),
])
def test_malformed_requests_get_one_clear_error(server, values, words):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    values = {"prompt": "a red circle", **values}
    prompt = values.pop("prompt")
    tensors = inputs(httpclient, prompt or "x", **values)
    if prompt is None:
        tensors = [t for t in tensors if t.name() != "prompt"]
    if "seed" in values:   # a wrong datatype: send FP32 where the contract says INT64
        tensors = [t for t in tensors if t.name() != "seed"]
        t = httpclient.InferInput("seed", [1, 1], "FP32")
        t.set_data_from_numpy(np.array([[1.5]], np.float32))
        tensors.append(t)
    with pytest.raises(InferenceServerException) as e:
        http_client(server).infer("ldm", tensors)
    assert words in e.value.message() and "\n" not in e.value.message()
    assert http_status(server.url("/v2/health/ready")) == 200


def test_sigterm_stops_cleanly_and_leaves_no_shared_memory(demo_artifact, tmp_path):
    from ldm_deploy.serving.server import shm_regions

    s = Server(demo_artifact, tmp_path / "server.log")
    prefix = f"ldm-deploy-{s.proc.pid}-"
    assert shm_regions(prefix), "the Python backend should hold a shared-memory region while it runs"
    assert s.stop(signal.SIGTERM) == 0, s.log()
    assert shm_regions(prefix) == []


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_crashed_stub_leaves_no_shared_memory_after_stop(demo_artifact, tmp_path):
    """SIGKILL the Python backend's stub (a crash): its region stays in /dev/shm until `serve` stops and removes it."""
    from ldm_deploy.serving.server import shm_regions

    s = Server(demo_artifact, tmp_path / "server.log")
    prefix = f"ldm-deploy-{s.proc.pid}-"
    (triton,) = children(s.proc.pid)
    stubs = children(triton)
    assert stubs and shm_regions(prefix)
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
                         for pid in stubs), "the stub to die")
    assert shm_regions(prefix), "the killed stub's region is still there while the server runs"
    s.stop(signal.SIGTERM)
    assert shm_regions(prefix) == []


# --- LoRA: `serve --lora NAME=FILE`, the `lora` request input ---------------------------------------------
@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A switchable tiny artifact, two kohya LoRA files, and a server started with both."""
    from tests.runtime.tiny_model import make_tiny_folder
    from tests.serving.lora_setup import export_switchable, write_kohya

    root = tmp_path_factory.mktemp("serve-lora")
    artifact = export_switchable(make_tiny_folder(root / "model"), root / "switch")
    files = {"a": write_kohya(artifact, root / "a.safetensors", 1), "b": write_kohya(artifact, root / "b.safetensors", 2)}
    s = Server(artifact, root / "server.log", "--lora", f"a={files['a']}", "--lora", f"b={files['b']}",
               "--queue-delay-ms", "400")
    yield s, artifact, files
    while _clients:
        _clients.pop().close()
    assert s.stop() == 0, s.log()[-2000:]


def test_lora_requests_never_share_a_batch_and_equal_generate(lora_setup, tmp_path):
    import tritonclient.http as httpclient
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    from ldm_deploy.cli import main
    from ldm_deploy.runtime.pipeline import Pipeline

    server, artifact, files = lora_setup
    client = http_client(server)
    sent = [("a red cube", 1, "a:0.7"), ("a blue ball", 2, "a:0.7"), ("a red cube", 3, "b"), ("a red cube", 4, None)]
    calls = [client.async_infer("ldm", inputs(httpclient, p, seed=np.int64(s), steps=np.int32(3),
                                              guidance=np.float32(5.0), lora=lora)) for p, s, lora in sent]
    results = [c.get_result() for c in calls]
    assert [r.as_numpy("batch_size").item() for r in results] == [2, 2, 1, 1]
    for (prompt, seed, lora), r in zip(sent, results):
        pipe = Pipeline.from_artifact(artifact)
        if lora:
            name, _, scale = lora.partition(":")
            pipe.set_loras([(files[name], float(scale or 1))])
        want = pipe(prompt, steps=3, guidance=5.0, seed=seed).images[0]
        assert np.array_equal(r.as_numpy("image")[0], want), lora

    args = ["--prompt", "a green cone", "--seed", "9", "--steps", "3", "--guidance", "5"]
    assert main(["client", server.url(), *args, "--lora", "b:0.5", "--out", str(tmp_path / "s.png"), "-q"]) == 0
    assert main(["generate", str(artifact), *args, "--lora", f"{files['b']}:0.5", "--out", str(tmp_path / "g.png"),
                 "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), np.asarray(Image.open(tmp_path / "g.png")))

    for lora, words in (("c", "names 'c', which this server was not started with; it has: a, b"),
                        ("a:inf", "the scale of 'a' is inf")):
        with pytest.raises(InferenceServerException) as e:
            client.infer("ldm", inputs(httpclient, "x", steps=np.int32(2), lora=lora))
        assert words in e.value.message() and "\n" not in e.value.message()
    assert http_status(server.url("/v2/health/ready")) == 200


def test_serve_refuses_lora_on_an_artifact_without_switchable_weights(demo_artifact, lora_setup):
    _, _, files = lora_setup
    proc = subprocess.run([str(SERVE), "serve", str(demo_artifact), "--lora", f"a={files['a']}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--lora needs an artifact exported with switchable weights" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sdxl_artifact_served_with_a_lora(tmp_path):
    """A tiny SDXL artifact (switchable, with a kohya lora_unet_ / lora_te2_ file) through a real server: the
    zero-negative default and a LoRA request, each equal to the pipeline alone (`generate`)."""
    pytest.importorskip("diffusers")
    import tritonclient.http as httpclient

    from ldm_deploy.export.config import ExportConfig, Range
    from ldm_deploy.runtime.pipeline import Pipeline
    from tests.runtime.tiny_sdxl import make_tiny_sdxl
    from tests.serving.lora_setup import export_switchable, write_kohya

    config = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(32, 32, 32), width=Range(32, 32, 32),
                          components=("text_encoder", "text_encoder_2", "unet", "vae_decoder"))
    artifact = export_switchable(make_tiny_sdxl(tmp_path / "base"), tmp_path / "onnx", config)
    lora = write_kohya(artifact, tmp_path / "x.safetensors", 4,
                       targets={"unet": ("attn2.to_k.weight",), "text_encoder_2": ("q_proj.weight",)})
    s = Server(artifact, tmp_path / "server.log", "--lora", f"x={lora}")
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{s.http}", network_timeout=300.0)
        try:
            got = [client.infer("ldm", inputs(httpclient, "a red circle", seed=np.int64(3), steps=np.int32(3),
                                              guidance=np.float32(5.0), **extra)).as_numpy("image")[0]
                   for extra in ({}, {"negative_prompt": "blurry", "lora": "x:0.8"})]
        finally:
            client.close()
    finally:
        assert s.stop() == 0, s.log()[-2000:]
    pipe = Pipeline.from_artifact(artifact)
    assert np.array_equal(got[0], pipe("a red circle", steps=3, guidance=5.0, seed=3).images[0])   # zero negative
    pipe.set_loras([(lora, 0.8)])
    assert np.array_equal(got[1], pipe("a red circle", "blurry", steps=3, guidance=5.0, seed=3).images[0])
