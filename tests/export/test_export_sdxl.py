"""SDXL export: both text encoders (penultimate hidden states, pooled projection), the U-Net with
text_embeds / time_ids and the 2B batch, an fp32 VAE by default; `validate` passes per component."""
from __future__ import annotations

import pytest

from ldm_deploy.artifact import Artifact
from ldm_deploy.errors import UsageError
from ldm_deploy.export.config import ExportConfig, Range
from ldm_deploy.export.exporter import export_model
from ldm_deploy.export.validate import validate
from tests.runtime.tiny_sdxl import sdxl_folders  # noqa: F401 (fixture)

pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow   # two tiny SDXL exports (~1 min on 2 cores) set up the module

CONFIG = ExportConfig(name="tiny-sdxl", batch=Range(1, 1, 2), height=Range(32, 32, 48), width=Range(32, 32, 32),
                      measure_runtime=False)


@pytest.fixture(scope="module")
def base_artifact(sdxl_folders, tmp_path_factory):
    return export_model(sdxl_folders[0], tmp_path_factory.mktemp("sdxl-onnx") / "base", CONFIG).path


def _io(spec):
    return {t.name: (t.dtype, list(t.shape)) for t in spec.inputs}, {t.name: list(t.shape) for t in spec.outputs}


def test_sdxl_base_artifact_layout(base_artifact):
    art = Artifact.open(base_artifact)
    assert list(art.components) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    ins, outs = _io(art.component("unet"))
    assert ins["encoder_hidden_states"] == ("float32", ["unet_batch", 77, 64])   # 32 + 32, concatenated
    assert ins["text_embeds"] == ("float32", ["unet_batch", 32])
    assert ins["time_ids"] == ("float32", ["unet_batch", 6])
    assert art.component("unet").batch_multiplier == 2
    assert art.component("unet").profile["time_ids"] == {"min": [2, 6], "opt": [2, 6], "max": [4, 6]}
    assert _io(art.component("text_encoder"))[1] == {"penultimate_hidden_state": ["batch", 77, 32]}
    assert _io(art.component("text_encoder_2"))[1] == {"penultimate_hidden_state": ["batch", 77, 32],
                                                        "text_embeds": ["batch", 32]}
    m = art.manifest
    assert m["sdxl"]["time_ids"] == 6 and m["sdxl"]["pooled_dim"] == 32
    assert m["sdxl"]["force_zeros_for_empty_prompt"] is True and m["sdxl"]["requires_aesthetics_score"] is False
    assert m["sdxl"]["tokenizer_2"]["pad_token"] == "!" and m["tokenizer"]["pad_token"] == "<|endoftext|>"
    assert (art.path / "tokenizer_2" / "vocab.json").is_file()
    assert art.component("vae_decoder").precision == "fp32" and "overflows in fp16" in m["sdxl"]["vae_precision_reason"]
    assert m["scaling_factor"] == 0.13025 and "text_encoder_2" in m["model"]


def test_sdxl_text_encoders_argmax_is_not_over_integers(base_artifact):
    """transformers' pooled-token `input_ids.to(int).argmax(-1)` reaches the graph as an integer ArgMax, which
    ONNX Runtime's CUDA provider has no kernel for: the node fell back to the CPU and CUDA-graph capture of
    text_encoder_2 was refused on an H100. The exporter feeds it a float64 Cast (onnx_export.float_argmax);
    float64, not float32, so the fp16 conversion (which rewrites float32 Casts to float16) leaves it exact; the
    ties are broken before the reduction (x * 77 + ramp, tests/export/test_float_argmax.py).
    The pooled output's values are checked against PyTorch by validate (the test below)."""
    import onnx

    art = Artifact.open(base_artifact)
    argmax = []
    for component in ("text_encoder", "text_encoder_2"):
        model = onnx.load(str(art.path / art.component(component).file), load_external_data=False)
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type in ("ArgMax", "ArgMin"):
                key = producers[node.input[0]]
                assert key.op_type == "Add" and producers[key.input[0]].op_type == "Mul", (component, key)
                feeder = producers[producers[key.input[0]].input[0]]
                assert feeder.op_type == "Cast" and feeder.attribute[0].i == onnx.TensorProto.DOUBLE, (component, feeder)
                argmax.append(component)
    assert argmax == ["text_encoder_2"]      # the pooled projection's token; text_encoder has no pooled output


def test_sdxl_base_validates_per_component(sdxl_folders, base_artifact):
    report = validate(sdxl_folders[0], base_artifact)
    assert report.passed, report.table()
    assert {c.component for c in report.checks} == {"text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                    "vae_encoder"}
    assert {c.output for c in report.checks if c.component == "text_encoder_2"} == {"penultimate_hidden_state",
                                                                                   "text_embeds"}


def test_sdxl_refiner_exports_and_validates(sdxl_folders, tmp_path):
    art = Artifact.open(export_model(sdxl_folders[1], tmp_path / "refiner", CONFIG.replace(
        height=Range(32, 32, 32))).path)
    assert list(art.components) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert _io(art.component("unet"))[0]["time_ids"] == ("float32", ["unet_batch", 5])
    assert art.manifest["sdxl"]["requires_aesthetics_score"] is True
    assert art.manifest["tokenizer"]["dir"] == "tokenizer_2"      # the refiner's only tokenizer
    report = validate(sdxl_folders[1], art.path)
    assert report.passed, report.table()


def test_sdxl_fp16_vae_needs_an_fp16_safe_vae(sdxl_folders, tmp_path):
    with pytest.raises(UsageError, match="overflows in fp16"):
        export_model(sdxl_folders[0], tmp_path / "x", CONFIG.replace(vae_precision="fp16"))
    assert not (tmp_path / "x").exists()


def test_sdxl_config_resolution(sdxl_folders):
    from ldm_deploy.export.sdxl import resolve_config

    base, refiner = sdxl_folders
    assert resolve_config(ExportConfig(), base).components == ("text_encoder", "text_encoder_2", "unet",
                                                               "vae_decoder", "vae_encoder")
    assert resolve_config(ExportConfig(), refiner).components[0] == "text_encoder_2"
    assert resolve_config(ExportConfig(components=("unet",)), base).components == ("unet",)   # asked for: kept
    safe = resolve_config(ExportConfig(vae_precision="fp16", vae_fp16_safe=True), base)     # an fp16-fix VAE
    assert safe.component_precision("vae_decoder") == "fp16"
    # ort_cuda variants are made for SDXL too now (tests/export/test_ort_cuda_sdxl.py), with both text encoders
    assert resolve_config(ExportConfig(ort_cuda=True), base).components[:2] == ("text_encoder", "text_encoder_2")
    assert "vae_fp16_safe" not in ExportConfig().key()        # SD artifacts exported before the key stay cached
