"""Send one request to the served `ldm` model (tritonclient HTTP or gRPC): `ldm-deploy client`'s engine.

    image, info = request_image("localhost:8000", "a red circle", seed=7, steps=25)   # uint8 (H, W, 3)

`url` is host:port (an http:// or grpc:// scheme picks the protocol; plain host:port is HTTP). Only the
inputs given are sent: the server fills the rest with the contract's defaults (ldm_deploy.serving.contract).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.serving.repository import MODEL_NAME

_NP = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32}


def _split(url: str) -> tuple[str, str]:
    for scheme in ("http", "grpc"):
        if url.startswith(f"{scheme}://"):
            return scheme, url[len(scheme) + 3:].rstrip("/")
    if "://" in url:
        raise UsageError(f"URL {url} has a scheme other than http:// or grpc://")
    return "http", url.rstrip("/")


def request_tensors(prompt: str, **values: Any) -> list[tuple[str, str, np.ndarray]]:
    """[(name, triton dtype, array of shape (1, 1))] for the inputs given (None values are left out)."""
    from ldm_deploy.serving.contract import INPUTS

    dtypes = {i.name: i.triton_dtype for i in INPUTS}
    out = []
    for name, value in {"prompt": prompt, **values}.items():
        if value is None:
            continue
        if name not in dtypes:
            raise UsageError(f"unknown input {name!r}; the model takes {', '.join(dtypes)}")
        dtype = dtypes[name]
        data = value.encode("utf-8") if dtype == "BYTES" else value
        out.append((name, dtype, np.array([[data]], dtype=_NP[dtype])))
    return out


def request_image(url: str, prompt: str, *, timeout_s: float | None = None, **values: Any) -> tuple[np.ndarray, dict]:
    """One request -> (uint8 image (H, W, 3), {"seed", "batch_size"}); LdmError with the server's message."""
    scheme, address = _split(url)
    try:
        if scheme == "http":
            import tritonclient.http as tc
        else:
            import tritonclient.grpc as tc
        from tritonclient.utils import InferenceServerException
    except ImportError as e:
        raise LdmError(f"tritonclient is not installed: {e}", hint="pip install 'ldm-deploy[serve]'") from None
    inputs = []
    for name, dtype, array in request_tensors(prompt, **values):
        t = tc.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    outputs = [tc.InferRequestedOutput(name) for name in ("image", "seed", "batch_size")]
    try:
        client = (tc.InferenceServerClient(address, network_timeout=timeout_s or 600.0, connection_timeout=10.0)
                  if scheme == "http" else tc.InferenceServerClient(address))
        kwargs = {"timeout": int(timeout_s * 1e6)} if timeout_s else {}
        if scheme == "grpc" and timeout_s:
            kwargs["client_timeout"] = timeout_s
        try:
            result = client.infer(MODEL_NAME, inputs, outputs=outputs, **kwargs)
        finally:
            client.close()
    except InferenceServerException as e:
        raise LdmError(f"the server at {url} answered: {e.message()}") from None
    except (ConnectionError, OSError) as e:
        raise LdmError(f"cannot reach a Triton server at {url}: {e}",
                       hint="start one with `ldm-deploy serve ARTIFACT` or check the host:port") from None
    image = result.as_numpy("image")[0]
    return image, {key: int(result.as_numpy(key).reshape(-1)[0]) for key in ("seed", "batch_size")}
