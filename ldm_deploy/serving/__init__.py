"""Serving: the request contract, request batching and the Triton Inference Server model (docs/serving.md).

    contract.py     named input tensors -> a checked Request (one RequestError per malformed request)
    batcher.py      BatchSampler: requests batched by settings, one seed per row, cancellation and timeouts
    repository.py   write a Triton model repository (config.pbtxt + a model.py shim) for an artifact
    triton_model.py the Python-backend model the shim imports
    server.py       run tritonserver on a temporary repository (`ldm-deploy serve`)
    client.py       send one request (`ldm-deploy client`)

Framework-agnostic and torch-free: contract and batcher need numpy only, and are tested without a server.
"""
