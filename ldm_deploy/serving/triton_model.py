"""The Triton Python-backend model over `BatchSampler` (what REPO/ldm/1/model.py imports).

Triton's dynamic batcher hands `execute` the requests it gathered (up to max_batch_size, waiting at most
max_queue_delay); each is parsed against the contract (a malformed one is answered at once with its one-line
error and never enters a batch), then BatchSampler runs them grouped by (steps, guidance, scheduler, size).
Every response goes out through the request's response sender as soon as it is ready: a cancelled or timed-out
request is answered at the next step, not when its batch ends. Outputs besides `image`: `seed` (the seed used,
drawn by the server when the request had none) and `batch_size` (rows of the pipeline call it ran in).

The artifact is referenced by path and checked at load against the sha256 of its manifest recorded in
config.pbtxt (a replaced artifact refuses to load instead of serving other weights under the same name); so
is every LoRA file of the `lora` input (`serve --lora NAME=FILE`), read once at load. GPU
instances (KIND_GPU) run their runners on the instance's device (`model_instance_device_id`).
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from ldm_deploy.errors import LdmError

log = logging.getLogger("ldm_deploy")


def runner_options(backend: str, device_id: int, extra: dict | None = None) -> dict:
    """Runner options for a model instance on `device_id` (ort-cuda: device_id; tensorrt: device)."""
    opts = dict(extra or {})
    if backend == "ort-cuda":
        opts.setdefault("device_id", device_id)
    elif backend == "tensorrt":
        opts.setdefault("device", device_id)
    return opts


def open_sampler(params: dict, device_id: int = 0):
    """The BatchSampler a model instance serves, from config.pbtxt's parameters; checks the artifact hash."""
    from ldm_deploy.artifact import MANIFEST, manifest_sha256
    from ldm_deploy.runtime.pipeline import Pipeline
    from ldm_deploy.serving.batcher import BatchSampler

    artifact = params["artifact"]
    expected = params.get("artifact_sha256")
    actual = manifest_sha256(artifact)
    if actual is None:
        raise LdmError(f"the model repository names the artifact {artifact}, which has no {MANIFEST}",
                       hint="rewrite the repository with `ldm-deploy triton-repo ARTIFACT --out REPO`")
    if expected and actual != expected:
        raise LdmError(f"the artifact at {artifact} changed since the model repository was written "
                       f"(manifest sha256 {actual[:12]}, repository expects {expected[:12]})",
                       hint="rewrite the repository with `ldm-deploy triton-repo ARTIFACT --out REPO`")
    backend = params.get("backend", "ort-cpu")
    opts = runner_options(backend, device_id, json.loads(params.get("runner_options") or "{}"))
    loras = lora_files(params)
    pipe = Pipeline.from_artifact(artifact, backend=backend, verify=params.get("verify", "1") != "0", **opts)
    return BatchSampler(pipe, max_batch=int(params.get("max_batch") or 0) or None, loras=loras)


def lora_files(params: dict) -> dict[str, str]:
    """name -> path of the repository's LoRA files, each checked against the sha256 recorded with it."""
    from ldm_deploy.fileio import sha256_file

    out = {}
    for name, entry in json.loads(params.get("loras") or "{}").items():
        path = entry["path"]
        try:
            actual = sha256_file(path)
        except OSError as e:
            raise LdmError(f"LoRA {name!r}: cannot read {path}: {e.strerror or e}",
                           hint="rewrite the repository with `ldm-deploy triton-repo ARTIFACT --lora NAME=FILE`") from None
        if actual != entry.get("sha256"):
            raise LdmError(f"LoRA {name!r}: {path} changed since the model repository was written (sha256 "
                           f"{actual[:12]}, repository expects {str(entry.get('sha256'))[:12]})",
                           hint="rewrite the repository with `ldm-deploy triton-repo ARTIFACT --lora NAME=FILE`")
        out[name] = path
    return out


def _log_to_triton(pb_utils) -> None:
    """Send the `ldm_deploy` logger's INFO and above to Triton's own log (pb_utils.Logger), once."""
    if any(getattr(h, "_ldm_triton", False) for h in log.handlers):
        return

    class TritonLog(logging.Handler):
        _ldm_triton = True

        def emit(self, record):
            level = "log_error" if record.levelno >= logging.ERROR else (
                "log_warn" if record.levelno >= logging.WARNING else "log_info")
            getattr(pb_utils.Logger, level)(self.format(record))

    log.addHandler(TritonLog())
    log.setLevel(logging.INFO)
    log.propagate = False


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils  # noqa: PLC0415 (exists only inside Triton's stub)

        self.pb = pb_utils
        _log_to_triton(pb_utils)
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        device_id = int(args.get("model_instance_device_id") or 0) if args.get("model_instance_kind") == "GPU" else 0
        self.sampler = open_sampler(params, device_id)
        self.timeout_s = float(params.get("request_timeout_s") or 0) or None
        self.seed_source = np.random.default_rng()
        log.info(f"ldm: {params['artifact']} on {params.get('backend')} (device {device_id}), "
                 f"batches up to {self.sampler.max_batch}"
                 + (f", LoRAs {', '.join(self.sampler.loras)}" if self.sampler.loras else ""))

    def _error(self, sender, err: LdmError, code_name: str) -> None:
        pb = self.pb
        code = getattr(pb.TritonError, code_name, None)
        error = pb.TritonError(str(err), code) if code is not None else pb.TritonError(str(err))
        sender.send(pb.InferenceResponse(error=error), flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send(self, job) -> None:
        from ldm_deploy.serving.batcher import Cancelled, TimedOut

        pb = self.pb
        sender = job.context
        if job.error is not None:
            code = ("CANCELLED" if isinstance(job.error, Cancelled) else "UNAVAILABLE" if isinstance(job.error, TimedOut)
                    else "INVALID_ARG" if getattr(job.error, "exit_code", 1) == 2 else "INTERNAL")
            self._error(sender, job.error, code)
            return
        try:
            outputs = [pb.Tensor("image", job.image[None]),                                 # (1, H, W, 3)
                       pb.Tensor("seed", np.array([[job.request.seed]], np.int64)),
                       pb.Tensor("batch_size", np.array([[job.batch_size]], np.int32))]
            response = pb.InferenceResponse(output_tensors=outputs)
        except Exception as e:   # never leave a request without its one response
            self._error(sender, LdmError(f"could not build the response: {type(e).__name__}: {e}"), "INTERNAL")
            raise
        sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        from ldm_deploy.serving.batcher import Job
        from ldm_deploy.serving.contract import RequestError, parse_request

        start = time.monotonic()
        jobs = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                tensors = {t.name(): t.as_numpy() for t in request.inputs()}
                parsed = parse_request(self.sampler.limits, tensors, self.seed_source)
            except RequestError as e:
                self._error(sender, e, "INVALID_ARG")
                continue
            timeouts = [t for t in (self.timeout_s, request.timeout() / 1e6 if request.timeout() else None) if t]
            jobs.append(Job(parsed, cancelled=request.is_cancelled, context=sender,
                            deadline=start + min(timeouts) if timeouts else None))
        try:
            self.sampler.run(jobs, on_done=self._send)
        finally:   # whatever happened, every request gets its one response
            for job in jobs:
                if not job.done:
                    job.done = True
                    self._error(job.context, LdmError("the request was not completed (see the server log)"), "INTERNAL")
        return None

    def finalize(self):
        sampler, self.sampler = getattr(self, "sampler", None), None
        if sampler is not None:
            sampler.pipe.close()   # the instance's sessions / engines and device buffers, now
