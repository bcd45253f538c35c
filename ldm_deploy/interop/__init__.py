"""Interop with the ONNX Stable Diffusion folders that exist outside ldm-deploy.

    layout.py     recognise an Optimum / Hub "onnx" folder (no onnx, no torch: every command may ask)
    adapt.py      the nodes added around each foreign graph so it meets our artifact contract
    importer.py   `ldm-deploy import`: folder -> verified artifact (onnx, numpy; no torch)
    check.py      `validate` of an imported artifact: adapted graphs against the original ones on ORT
    to_optimum.py `ldm-deploy export --layout optimum`: our artifact -> an Optimum / diffusers ONNX folder

docs/interop.md describes both directions.
"""
