"""ONNX Runtime CUDA fused variants of SDXL artifacts (`export --ort-cuda`), on CPU with the tiny SDXL folders:
the variants are written and recorded, carry the fusions, keep the plain graphs' IO (the U-Net with CFG folded
in, text_embeds / time_ids still taking both halves' rows), and what ORT CPU can run of them matches the plain
graphs: the fused text encoders (their contrib ops have CPU kernels), and the SDXL U-Net with our attention
fusion and the CFG fold (the rest of the U-Net's fusions, GroupNorm / NhwcConv, have CUDA kernels only) through
SDXLPipeline. The CUDA side is tests/runtime/test_ort_cuda_sdxl_gpu.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.compare import assert_close
from ldm_deploy.export.config import ExportConfig, Range
from ldm_deploy.export.exporter import export_model
from ldm_deploy.export.ort_optimize import FILE_NAME, VARIANT
from tests.export.test_ort_optimize import assert_loadable
from tests.runtime.test_ort_cuda_runner import cpu_bound  # noqa: F401 (fixture)
from tests.runtime.tiny_sdxl import sdxl_folders  # noqa: F401 (fixture)

pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow   # two tiny SDXL exports with the fused variants (~1.5 min on 2 cores)

HAS_ONNXSLIM = importlib.util.find_spec("onnxslim") is not None
SIZE = 32
CONFIG = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(SIZE, SIZE, SIZE),
                      width=Range(SIZE, SIZE, SIZE), measure_runtime=False, optimize=HAS_ONNXSLIM, ort_cuda=True)
BASE = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
REFINER = ("text_encoder_2", "unet", "vae_decoder")
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"


@pytest.fixture(scope="module")
def fused(sdxl_folders, tmp_path_factory) -> dict[str, Path]:
    """{"base": fp32 base artifact, "refiner": fp16 refiner artifact (its VAE fp32, as SDXL's)}, both --ort-cuda."""
    from ldm_deploy.export.ort_optimize import add_ort_cuda_variants

    root = tmp_path_factory.mktemp("sdxl-ort-cuda")
    base, refiner = sdxl_folders
    out = {"base": export_model(base, root / "base", CONFIG.replace(components=BASE)).path,
           "refiner": export_model(refiner, root / "refiner", CONFIG.replace(components=REFINER, precision="fp16")).path}
    for art in out.values():
        # --ort-cuda leaves text_encoder_2 plain (ort_optimize.DEFAULT_COMPONENTS: its fused graph failed on an
        # H100); its variant is still made on request from an fp32 graph (the fp32 base here), and tested on CPU
        assert VARIANT not in Artifact.open(art).manifest["components"]["text_encoder_2"].get("variants", {})
    assert set(add_ort_cuda_variants(out["base"], ["text_encoder_2"])) == {"text_encoder_2"}
    return out


def _with_variant(manifest: dict) -> list[str]:
    return [name for name, entry in manifest.items() if VARIANT in entry.get("variants", {})]


def _names(items) -> list[str]:
    return [i["name"] for i in items]


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_every_component_gets_a_recorded_variant(fused, which):
    art = Artifact.open(fused[which], verify=True)      # the variants' hashes are in the manifest
    m = art.manifest
    assert list(art.components) == list(BASE if which == "base" else REFINER)
    assert _with_variant(m["components"]) == [c for c in art.components if which == "base" or c != "text_encoder_2"]
    for name in _with_variant(m["components"]):
        entry = m["components"][name]
        v = entry["variants"][VARIANT]
        assert v["file"] == f"{name}/{FILE_NAME}" and m["files"][v["file"]]
        # SDXL's VAE stays fp32 in an fp16 export (it overflows fp16), and so does its fused variant
        assert v["precision"] == ("fp32" if which == "base" or name == "vae_decoder" else "fp16")
        assert v["cfg_folded"] is (name == "unet")
        extra = ["guidance_scale", "guidance_rescale"] if name == "unet" else []
        assert _names(v["inputs"]) == _names(entry["inputs"]) + extra
        # outputs as the plain graph declares them (the optimizer's renamed dims restored): the runner sizes
        # its IO-binding buffers from these
        want = [(o["name"], o["shape"]) for o in entry["outputs"]]
        got = [(o["name"], o["shape"]) for o in v["outputs"]]
        if name == "unet":   # B guided rows out of the 2B-row U-Net
            want = [(n, ["batch", *s[1:]]) for n, s in want]
        assert got == want, name
    assert "overflows in fp16" in m["sdxl"]["vae_precision_reason"]


def test_unet_variant_keeps_both_halves_conditioning(fused):
    """text_embeds and time_ids take the 2B [uncond; cond] rows as the context does; time_ids (up to 1024,
    sinusoid-embedded) stay float32 into an fp32 path in the fp16 graph, like the timestep."""
    import onnx

    for which, n_ids in (("base", 6), ("refiner", 5)):
        v = Artifact.open(fused[which]).manifest["components"]["unet"]["variants"][VARIANT]
        ins = {i["name"]: (i["dtype"], i["shape"]) for i in v["inputs"]}
        half = "float32" if which == "base" else "float16"
        assert ins["sample"] == ("float32", ["batch", 4, SIZE // 8, SIZE // 8])      # B latents, static size
        assert ins["timestep"] == ("float32", ["batch"])
        assert ins["encoder_hidden_states"][0] == half and ins["encoder_hidden_states"][1][0] == "unet_batch"
        assert ins["text_embeds"] == (half, ["unet_batch", 32])
        assert ins["time_ids"] == ("float32", ["unet_batch", n_ids])
        assert v["outputs"][0]["dtype"] == "float32"
    graph = onnx.load(str(fused["refiner"] / "unet" / FILE_NAME)).graph
    readers = [n for n in graph.node if any(i in ("time_ids", "timestep") for i in n.input)]
    to16 = [n.name for n in readers if n.op_type == "Cast"
            and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)]
    assert readers and not to16, f"time_ids / timestep cast to fp16 right at the input: {to16}"


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_variants_carry_the_fusions(fused, which):
    manifest = Artifact.open(fused[which]).manifest["components"]
    unet = manifest["unet"]["variants"][VARIANT]
    for op in ("MultiHeadAttention", "GroupNorm", "NhwcConv", "SkipLayerNormalization"):
        assert unet["fused_ops"].get(op, 0) > 0, f"unet: {op} not fused: {unet['fused_ops']}"
    # the tiny U-Net's GEGLU width / channels are outside the CUDA kernels' sizes: declined and recorded
    assert set(unet["declined_fusions"]) == {"BiasSplitGelu", "BiasAdd"}
    vae = manifest["vae_decoder"]["variants"][VARIANT]["fused_ops"]
    assert vae.get("GroupNorm", 0) > 0 and vae.get("NhwcConv", 0) > 0
    for name in ("text_encoder", "text_encoder_2"):
        if name in _with_variant(manifest):
            fused_ops = manifest[name]["variants"][VARIANT]["fused_ops"]
            assert fused_ops.get("SkipLayerNormalization", 0) > 0, f"{name}: {fused_ops}"
    for name in _with_variant(manifest):
        assert_loadable(fused[which] / manifest[name]["variants"][VARIANT]["file"])


def test_fused_text_encoders_match_the_plain_graphs_on_cpu(fused):
    """CLIPTextModel and CLIPTextModelWithProjection fused (SkipLayerNormalization, QuickGelu / BiasGelu: CPU
    kernels exist): the penultimate hidden state AND the pooled projection equal the plain graphs'."""
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(0, 49408, (2, 77)).astype(np.int32)
    cpu = ["CPUExecutionProvider"]
    for name in ("text_encoder", "text_encoder_2"):
        plain = ort.InferenceSession(str(fused["base"] / name / "model.onnx"), providers=cpu)
        fast = ort.InferenceSession(str(fused["base"] / name / FILE_NAME), providers=cpu)
        names = [o.name for o in plain.get_outputs()]
        assert [o.name for o in fast.get_outputs()] == names
        want = plain.run(names, {"input_ids": ids})
        got = fast.run(names, {"input_ids": ids})
        for out, a, b in zip(names, got, want):
            # float32 through reordered sums (fused LayerNorm / GELU): ~1e-6 relative to |b| ~ 1-10
            assert_close(a, b, atol=1e-4, rtol=1e-5, name=f"{name} {out}")


def _cpu_folded_unet(artifact: Path, dst: Path) -> tuple[Path, dict]:
    """The plain fp32 SDXL U-Net with the fused variant's attention fusion and CFG fold, the parts of it ORT
    CPU runs (GroupNorm / NhwcConv are CUDA-only): (path, manifest-style entry)."""
    import onnx

    from ldm_deploy.export import manifest as mf
    from ldm_deploy.export.attention_fusion import fuse_attention
    from ldm_deploy.export.cfg_fold import fold_cfg

    model = onnx.load(str(artifact / "unet" / "model.onnx"))
    assert fuse_attention(model) > 0
    fold_cfg(model)
    onnx.save(model, str(dst))
    ins, outs = mf.graph_io(dst)
    return dst, {"file": str(dst), "external_data": None, "precision": "fp32", "inputs": ins, "outputs": outs}


@pytest.fixture(scope="module")
def cpu_folded(fused, tmp_path_factory) -> tuple[Path, dict]:
    return _cpu_folded_unet(fused["base"], tmp_path_factory.mktemp("cpu-folded") / "unet.onnx")


def _sdxl_rows(rng, width: int) -> dict:
    """2 rows [uncond; cond] whose halves differ in every conditioning input (a negative prompt's embeddings,
    negative micro-conditioning), with the latents and timestep repeated as the pipeline feeds them."""
    return {"sample": np.concatenate([rng.standard_normal((1, 4, 4, 4), np.float32)] * 2),
            "timestep": np.array([700.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, width), np.float32),
            "text_embeds": rng.standard_normal((2, 32), np.float32),
            "time_ids": np.array([[512, 768, 8, 4, 32, 32], [1024, 1024, 0, 0, 1024, 1024]], np.float32)}


@pytest.mark.parametrize("guidance,rescale", [(5.0, 0.0), (7.5, 0.7)])
def test_folded_sdxl_unet_matches_plain_cfg_on_cpu(fused, cpu_folded, guidance, rescale):
    """The fold with SDXL's extra inputs: guided rows equal guidance.guide on the plain 2B-row output, and
    each half's text_embeds / time_ids reach its own rows."""
    import onnxruntime as ort

    from ldm_deploy.export.cfg_fold import folded_inputs, reference_cfg

    cpu = ["CPUExecutionProvider"]
    plain = ort.InferenceSession(str(fused["base"] / "unet" / "model.onnx"), providers=cpu)
    folded = ort.InferenceSession(str(cpu_folded[0]), providers=cpu)
    rows = _sdxl_rows(np.random.default_rng(1), 64)
    pred = plain.run(None, rows)[0]
    want = reference_cfg(pred, 1, guidance, rescale)
    got = folded.run(None, folded_inputs(rows, guidance, rescale))[0]
    # fp32, the same U-Net up to the attention fusion (~1e-6) amplified by g (<= 7.5) and the rescale
    assert_close(got, want, atol=1e-4, rtol=1e-5, name=f"folded SDXL U-Net g={guidance} phi={rescale}")
    swapped = dict(rows, time_ids=rows["time_ids"][::-1].copy())   # the halves' micro-conditioning matters
    assert not np.allclose(folded.run(None, folded_inputs(swapped, guidance, rescale))[0], got, atol=1e-3)


def test_sdxl_pipeline_over_a_folded_unet_matches_plain(fused, cpu_folded, monkeypatch):
    """SDXLPipeline picks the folded denoiser for a U-Net taking guidance_scale and feeds it the 2B text_embeds /
    time_ids rows (B rows twice without CFG): the same latents as over the plain U-Net, with a negative prompt,
    with SDXL's zero negative, and without CFG."""
    from ldm_deploy.runtime.pipeline import FoldedCfgDenoiser, Pipeline
    from ldm_deploy.runtime.runners.ort import OrtRunner, SessionFromArtifact
    from ldm_deploy.runtime.sdxl import SDXLPipeline

    art = Artifact.open(fused["base"])
    path, entry = cpu_folded
    plain = Pipeline.from_artifact(fused["base"], backend="ort-cpu")
    folded_unet = OrtRunner(SessionFromArtifact(art, "unet", graph=("cpu-folded", path, entry))())
    ours = SDXLPipeline(plain.tokenizers, {**plain.runners, "unet": folded_unet}, art.info)
    latents = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    seen = []
    original = FoldedCfgDenoiser.__call__

    def spy(self, x, t):
        seen.append({k: v.shape for k, v in self.conditioning.items() if k in ("text_embeds", "time_ids")})
        return original(self, x, t)

    monkeypatch.setattr(FoldedCfgDenoiser, "__call__", spy)   # records what the real denoiser feeds
    for kw in (dict(negative_prompt=NEGATIVE, guidance=5.0), dict(guidance=6.0, original_size=(64, 48)),
               dict(guidance=1.0)):
        want = plain(PROMPT, steps=4, latents=latents, decode=False, **kw).latents
        got = ours(PROMPT, steps=4, latents=latents, decode=False, **kw).latents
        # fp32: per step ~1e-6 relative (attention fusion), 4 Euler steps
        assert_close(got, want, atol=1e-4, rtol=1e-5, name=f"SDXL latents over the folded U-Net {kw}")
    assert seen and all(s == {"text_embeds": (2, 32), "time_ids": (2, 6)} for s in seen), seen


def test_bound_runner_sizes_the_fused_text_encoder_outputs(fused, cpu_bound):
    """OrtCudaRunner (IO binding, CUDA graph on; CPU buffers here) picks the fused text_encoder_2 and sizes both
    outputs from the manifest before the first run (a CUDA graph captures their addresses), then returns what
    the plain graph does."""
    from ldm_deploy.runtime.runners.base import open_runner

    runner = cpu_bound(fused["base"], "text_encoder_2", enable_cuda_graph=True)     # variant "auto"
    assert runner.variant == VARIANT and runner.model_path.name == FILE_NAME
    ids = np.random.default_rng(3).integers(0, 49408, (2, 77)).astype(np.int32)
    key = (("input_ids", ids.shape),)
    assert runner._output_shapes(key, {"input_ids": ids}) == {"penultimate_hidden_state": (2, 77, 32),
                                                             "text_embeds": (2, 32)}
    want = open_runner("ort-cpu", fused["base"], "text_encoder_2")({"input_ids": ids})
    got = runner({"input_ids": ids})
    for name, value in want.items():
        assert_close(got[name], value, atol=1e-4, rtol=1e-5, name=f"bound fused text_encoder_2 {name}")


def test_add_variants_afterwards_on_an_sdxl_artifact(fused, tmp_path):
    """add_ort_cuda_variants (an artifact exported without --ort-cuda) covers text_encoder_2 too, with the plain
    graph's output dims, and rewrites the manifest consistently."""
    import shutil

    from ldm_deploy.export.ort_optimize import add_ort_cuda_variants

    art = shutil.copytree(fused["base"], tmp_path / "base")
    stats = add_ort_cuda_variants(art, ["text_encoder_2", "unet"], fold_guidance=False)
    assert set(stats) == {"text_encoder_2", "unet"}
    m = Artifact.open(art, verify=True).manifest["components"]        # the rewritten hashes hold
    te2 = m["text_encoder_2"]["variants"][VARIANT]
    assert [(o["name"], o["shape"]) for o in te2["outputs"]] == [(o["name"], o["shape"])
                                                                 for o in m["text_encoder_2"]["outputs"]]
    unet = m["unet"]["variants"][VARIANT]      # not folded: the plain 2B-row contract, text_embeds / time_ids kept
    assert not unet["cfg_folded"] and _names(unet["inputs"]) == _names(m["unet"]["inputs"])
