"""What may import what (docs/DESIGN.md, "The map"), checked on the source: every `import` statement, at module
level or inside a function, of every module in ldm_deploy/. tests/runtime/test_torch_free.py checks the same
promise at run time (a generate with torch, onnx and `training` blocked); this test names the module and the line
that breaks a layer, before anything runs.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TORCH_SIDE = ("torch", "onnx", "training", "diffusers", "transformers", "onnxslim", "polygraphy")
TOOLS = ("ldm_deploy.export", "ldm_deploy.bench", "ldm_deploy.commands", "ldm_deploy.cli", "ldm_deploy.demo",
         "ldm_deploy.interop", "ldm_deploy.inspection")

# layer -> (modules in it, imports it must not make, imports it may make despite that)
RULES = {
    "core": (("ldm_deploy/errors.py", "ldm_deploy/fileio.py", "ldm_deploy/paths.py", "ldm_deploy/compare.py",
              "ldm_deploy/limits.py", "ldm_deploy/flops.py", "ldm_deploy/feeds.py", "ldm_deploy/configfile.py",
              "ldm_deploy/lora.py", "ldm_deploy/artifact.py"),
             (*TORCH_SIDE, "onnxruntime", *TOOLS, "ldm_deploy.runtime", "ldm_deploy.serving", "ldm_deploy.engine"),
             ("ldm_deploy.interop.layout",)),           # artifact.py: name an Optimum folder in its error (no onnx)
    "runtime": (("ldm_deploy/runtime/",),
                (*TORCH_SIDE, *TOOLS, "ldm_deploy.serving"),
                ()),
    "runtime without TensorRT": (("ldm_deploy/runtime/",),
                                 ("ldm_deploy.engine",),
                                 ("ldm_deploy.engine.sidecar", "ldm_deploy.engine.trt_api", "ldm_deploy.engine.refit")),
    "serving": (("ldm_deploy/serving/",),
                (*TORCH_SIDE, *TOOLS, "ldm_deploy.engine"),
                ()),
}


def _modules(prefixes) -> list[Path]:
    out = []
    for prefix in prefixes:
        path = ROOT / prefix
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(layer: str) -> list[str]:
    files, banned, allowed = RULES[layer]
    bad = []
    for path in _modules(files):
        imports = _imports(path)
        names = {name for _, name in imports}
        for line, name in imports:
            if _under(name, banned) and not _under(name, allowed) and not (
                    # `from ldm_deploy.engine import sidecar` names the module through its attribute form
                    any(_under(n, allowed) for n in names if n.startswith(name + "."))):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return sorted(set(bad))


@pytest.mark.parametrize("layer", list(RULES))
def test_layer_imports(layer):
    assert not violations(layer), f"the {layer} layer imports what it must not (docs/DESIGN.md, the map):\n" + \
        "\n".join(violations(layer))


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The scan can fail: a runtime module that imports torch inside a function, or the exporter, is reported."""
    fake = tmp_path / "ldm_deploy" / "runtime"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    import torch\n    from ldm_deploy.export import exporter\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = violations("runtime")
    assert any("bad.py:2 imports torch" in v for v in found) and any("ldm_deploy.export" in v for v in found), found
