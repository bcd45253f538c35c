from pathlib import Path

import pytest

from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.export.config import ExportConfig, Range, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "demo", "sd15", "sd21"])
def test_bundled_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name and cfg.opset >= 17
    assert load_config(ROOT / "export_configs" / f"{name}.yaml") == cfg


def test_bundled_profiles():
    assert load_config("sd15").height == Range(512, 512, 512) and load_config("sd15").batch.max == 4
    assert load_config("sd21").width == Range(768, 768, 768)
    assert load_config("sd15").precision == "fp16" and load_config("sd15").component_precision("vae_decoder") == "fp32"
    assert not load_config("demo").static_size and load_config("tiny").static_size


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("precision: fp16\nbatch_size: 3\n")
    with pytest.raises(LdmError, match="batch_size"):
        load_config(p)
    p.write_text("profiles:\n  depth: 3\n")
    with pytest.raises(LdmError, match="depth"):
        load_config(p)


def test_bad_values():
    with pytest.raises(UsageError, match="precision"):
        ExportConfig(precision="int8")
    with pytest.raises(UsageError, match="opset"):
        ExportConfig(opset=16)
    with pytest.raises(UsageError, match="opset >= 18"):
        ExportConfig(exporter="dynamo")
    with pytest.raises(UsageError, match="min <= opt <= max"):
        Range(4, 1, 2)
    with pytest.raises(UsageError, match="components"):
        ExportConfig(components=("unet", "safety_checker"))
    with pytest.raises(UsageError, match="fp16_keep_nodes"):
        ExportConfig(fp16_keep_nodes={"safety_checker": ["/x/Conv"]})


def test_keep_nodes_of_sdxls_second_text_encoder():
    """debug-precision --component text_encoder_2 writes its fix under that component's name."""
    cfg = ExportConfig.from_dict({"precision": "fp16", "fp16_keep_nodes": {"text_encoder_2": ["/text_model/Add"]}})
    assert cfg.fp16_keep_nodes == {"text_encoder_2": ("/text_model/Add",)}
    assert ExportConfig.from_dict(cfg.to_dict()) == cfg


def test_round_trip_and_key():
    cfg = ExportConfig.from_dict({"precision": "fp16", "profiles": {"batch": {"min": 1, "max": 2}, "height": 64,
                                                                    "width": 64}})
    assert cfg.batch == Range(1, 1, 2) and cfg.height == Range(64, 64, 64)
    again = ExportConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.key() == cfg.key()
    assert cfg.replace(name="other").key() == cfg.key()          # the name does not change the graphs
    assert cfg.replace(precision="fp32").key() != cfg.key()


def test_cfg_fold_key_only_shapes_the_ort_cuda_variant():
    """`ort_cuda_fold_cfg` changes the cache key only when ort-cuda variants are written; `--no-cfg-fold`
    reaches the config."""
    import json

    from ldm_deploy.cli import build_parser
    from ldm_deploy.export.config import load_config

    base = load_config("tiny")
    assert base.ort_cuda_fold_cfg is True
    assert base.key() == base.replace(ort_cuda_fold_cfg=False).key()          # no variants: same artifact
    fused = base.replace(ort_cuda=True)
    assert fused.key() != fused.replace(ort_cuda_fold_cfg=False).key()
    assert json.loads(fused.key())["ort_cuda_fold_cfg"] is True
    args = build_parser().parse_args(["export", "m", "--out", "o", "--ort-cuda", "--no-cfg-fold"])
    assert args.ort_cuda is True and args.ort_cuda_fold_cfg is False
    assert build_parser().parse_args(["export", "m", "--out", "o"]).ort_cuda_fold_cfg is None


def test_lora_switchable_combines_with_ort_cuda():
    """`--lora-switchable [all] --ort-cuda` is a valid export (the fused variant takes the weights as inputs:
    export/ort_lora.py, tests/export/test_ort_lora.py); the switchable weights still need the torchscript
    exporter, refused in one line otherwise."""
    from ldm_deploy.cli import build_parser

    args = build_parser().parse_args(["export", "m", "--out", "o", "--lora-switchable", "all", "--ort-cuda"])
    config = load_config("tiny").replace(lora_switchable=args.lora_switchable, ort_cuda=args.ort_cuda)
    assert config.lora_switchable == "all" and config.ort_cuda
    assert ExportConfig(lora_switchable="linear", ort_cuda=True).key() != ExportConfig(ort_cuda=True).key()
    with pytest.raises(UsageError, match="lora_switchable needs the torchscript exporter") as e:
        ExportConfig(lora_switchable="linear", ort_cuda=True, exporter="dynamo", opset=18)
    assert "\n" not in str(e.value)
