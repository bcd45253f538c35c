"""`validate` of an imported artifact: each adapted graph, on each backend, against the ORIGINAL graph of
the Optimum / Hub folder on ONNX Runtime CPU, fed through that graph's own contract (int64 ids, scalar
timestep, latent_parameters split in numpy). This checks the added nodes, not the model: the original
graph is the reference. Random inputs at the profile's min/opt/max shapes, one timestep for all rows
(what the pipeline passes); tolerances as `ldm_deploy.export.validate.TOLERANCES`.

    report = validate_imported("sd15-optimum", "out/sd15"); print(report.table())
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ldm_deploy.artifact import Artifact
from ldm_deploy.compare import error_stats

_ORIGINAL_NAMES = {  # component -> our name -> the original graph's name
    "unet": {"noise_pred": "out_sample"},
    "vae_decoder": {"latent": "latent_sample", "image": "sample"},
    "vae_encoder": {"image": "sample"},
}
_NP = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float16)": np.float16,
       "tensor(float)": np.float32}


def validate_imported(onnx_folder, artifact_dir, backends=("ort-cpu",), *, components=None, seed: int = 0,
                      tolerances: dict | None = None):
    import onnxruntime as ort

    from ldm_deploy.export.validate import TOLERANCES, Check, ValidationReport
    from ldm_deploy.interop.importer import random_inputs, read_folder
    from ldm_deploy.runtime.runners.base import close_all, open_runner

    folder = read_folder(onnx_folder)
    artifact = Artifact.open(artifact_dir)
    tol = {**TOLERANCES, **(tolerances or {})}
    report = ValidationReport(Path(artifact_dir))
    if (artifact.source_path or Path("")).resolve() != folder.path.resolve():
        report.notes.append(f"note: {onnx_folder} is not the folder this artifact was imported from")
    report.notes.append(f"reference: the original graphs of {onnx_folder} on ONNX Runtime CPU")
    for name in list(components or artifact.components):
        spec = artifact.component(name)
        original = ort.InferenceSession(str(folder.path / name / "model.onnx"), providers=["CPUExecutionProvider"])
        runners = {b: open_runner(b, artifact, name) for b in backends}
        for i, case in enumerate(("min", "opt", "max")):
            shapes = {n: tuple(p[case]) for n, p in spec.profile.items()}
            inputs = random_inputs(_Typed(spec), shapes, folder, seed + i)
            expected = _original_outputs(name, original, inputs)
            for backend, runner in runners.items():
                actual = runner(inputs)
                for out in spec.output_names:
                    stats = error_stats(np.asarray(actual[out], np.float32), expected[out])
                    report.checks.append(Check(name, backend, case, "x".join(map(str, shapes[spec.inputs[0].name])),
                                               out, stats, tol[spec.precision]))
        close_all(runners)
    return report


class _Typed:
    """The artifact's inputs in the shape of an ORT session's get_inputs() (name, type)."""

    def __init__(self, spec):
        self._inputs = [type("I", (), {"name": t.name, "type": f"tensor({'float' if t.dtype == 'float32' else t.dtype})"})
                        for t in spec.inputs]

    def get_inputs(self):
        return self._inputs


def _original_outputs(component: str, sess, inputs: dict) -> dict[str, np.ndarray]:
    names = _ORIGINAL_NAMES.get(component, {})
    feed = {}
    for i in sess.get_inputs():
        ours = next(k for k in inputs if names.get(k, k) == i.name)
        a = inputs[ours]
        if i.name == "timestep":
            a = a[0] if len(i.shape) == 0 else a[:1] if i.shape == [1] else a
            if _NP.get(i.type) in (np.int32, np.int64):
                a = np.round(a)
        feed[i.name] = np.asarray(a).astype(_NP.get(i.type, np.float32))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    if component == "vae_encoder":
        mean, logvar = np.split(outs["latent_parameters"], 2, axis=1)
        return {"mean": mean, "logvar": np.clip(logvar, -30.0, 20.0)}
    return {k: outs[names.get(k, k)] for k in ("last_hidden_state", "pooler_output", "noise_pred", "image")
            if names.get(k, k) in outs}
