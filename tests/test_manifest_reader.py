"""The layering rule for the model description: manifest.json is parsed only in ldm_deploy/artifact.py.

Every other module reads the typed `Artifact` / `ComponentSpec` / `ModelInfo`; the file is written only by
ldm_deploy/export/manifest.py (`build_manifest`, `write_manifest`, `editable_manifest`). The scan is over the
source with `ast`, so it sees code, not comments or error messages, and it tells a reintroduced reader
(`json.loads((folder / "manifest.json").read_text())`, `artifact.manifest["components"]`) from unrelated
JSON (`json.loads((folder / "unet" / "config.json").read_text())`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("ldm_deploy", "training", "scripts")
READER = "ldm_deploy/artifact.py"
WRITER = "ldm_deploy/export/manifest.py"


def _names_manifest(node: ast.AST) -> bool:
    """The expression mentions the manifest file: the literal "manifest.json" or the MANIFEST constant."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and n.value == "manifest.json":
            return True
        if isinstance(n, ast.Name) and n.id == "MANIFEST" or isinstance(n, ast.Attribute) and n.attr == "MANIFEST":
            return True
    return False


def violations(source: str, rel: str) -> list[str]:
    """What in `source` (the file `rel`) reads the manifest around `Artifact`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if rel == READER:
            continue
        # json.load(s) of anything naming the manifest file
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "loads") \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "json" \
                and any(_names_manifest(a) for a in node.args):
            found.append(f"{where}: json.{node.func.attr} of the manifest")
        # a path to the manifest file (read, opened or tested for existence): Artifact / is_artifact do that
        if rel != WRITER and isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) \
                and _names_manifest(node.right):
            found.append(f"{where}: a path to the manifest file")
        # the raw manifest dict of an opened Artifact: the writer's alone (editable_manifest)
        if rel != WRITER and isinstance(node, ast.Attribute) and node.attr == "manifest" \
                and isinstance(node.ctx, ast.Load):
            found.append(f"{where}: the raw `.manifest` dict")
    return found


def _sources():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_manifest_is_parsed_only_in_artifact_py():
    found = [v for rel, text in _sources() for v in violations(text, rel)]
    assert not found, "read the typed Artifact (ldm_deploy/artifact.py) instead:\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    'm = json.loads((Path(a) / "manifest.json").read_text(encoding="utf-8"))',
    'm = json.loads(open(os.path.join(a, "manifest.json")).read())',
    'unet = json.loads((root / MANIFEST).read_text())["components"]["unet"]',
    'ok = (folder / "manifest.json").is_file()',
    'variants = artifact.manifest["components"]["unet"]["variants"]',
    'source = art.manifest.get("source")',
])
def test_a_reintroduced_reader_is_caught(code):
    assert violations(code, "ldm_deploy/runtime/somewhere.py")
    assert not violations(code, READER)   # artifact.py may


@pytest.mark.parametrize("code", [
    'cfg = json.loads((folder / "unet" / "config.json").read_text())',
    'index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))',
    'raise LdmError("never edit manifest.json by hand")',
    'spec = artifact.component("unet").variants',
    'manifest = build_manifest(tmp, source=source)\nmanifest["loras"] = records',
])
def test_unrelated_json_and_typed_reads_pass(code):
    assert not violations(code, "ldm_deploy/runtime/somewhere.py")


def test_the_writer_may_write_but_not_parse():
    assert not violations('write_json(Path(folder) / MANIFEST, manifest)', WRITER)
    assert violations('m = json.loads((folder / MANIFEST).read_text())', WRITER)
