"""The one strict config loader (ldm_deploy/configfile.py): key paths, allowed keys, types, bounds."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ldm_deploy.configfile import bounds, load, read_mapping, to_plain
from ldm_deploy.errors import LdmError, UsageError


@dataclass(frozen=True)
class Inner:
    steps: int = field(default=10, metadata=bounds(1, 100))
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    name: str | None = None


@dataclass(frozen=True)
class Outer:
    seed: int = 0
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)
    extra: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_frozen_dataclasses_and_converts():
    cfg = load(Outer, {"seed": 3, "sizes": [4, 8], "inner": {"steps": 5, "lr": "3e-4", "betas": [0.5, 0.6]}})
    assert cfg == Outer(seed=3, sizes=(4, 8), inner=Inner(steps=5, lr=3e-4, betas=(0.5, 0.6)))
    assert load(Outer, None) == Outer() and load(Outer, to_plain(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"inner": {"stepz": 1}}, r"^f\.yaml: unknown keys inner\.stepz \(allowed in inner: steps, lr, betas, name\)$"),
    ({"seeed": 1}, "unknown keys seeed .allowed: seed, flag"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"seed": True}, "seed must be an integer, got True"),
    ({"flag": "yes"}, "flag must be true or false"),
    ({"sizes": 3}, "sizes must be a list"),
    ({"sizes": [1, "x"]}, r"sizes\[1\] must be an integer"),
    ({"inner": 7}, "inner must be a mapping"),
    ({"inner": {"steps": 0}}, r"inner\.steps = 0 is outside 1\.\.100"),
    ({"inner": {"lr": "fast"}}, "inner.lr must be a number"),
    ({"inner": {"lr": float("nan")}}, "inner.lr must be a number"),
    ({"inner": {"betas": [0.9]}}, r"inner\.betas must be a list of 2 values"),
    ({"inner": {"name": 3}}, "inner.name must be a string"),
    ({"seed": None}, "seed must not be null"),
    ({"extra": [1]}, "extra must be a mapping"),
])
def test_refuses_with_the_key_path_in_one_line(data, message):
    with pytest.raises(LdmError, match=message) as e:
        load(Outer, data, "f.yaml")
    assert "\n" not in str(e.value) and type(e.value) is LdmError


def test_kind_and_error_class():
    with pytest.raises(UsageError, match="unknown bench spec keys stepz"):
        load(Inner, {"stepz": 1}, kind="bench spec", error=UsageError)


def test_read_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: 1\n")
    assert read_mapping(p) == {"a": 1}
    p.write_text("")
    assert read_mapping(p) == {}
    p.write_text('{"a": [1, 2]}')          # JSON is YAML
    assert read_mapping(p) == {"a": [1, 2]}
    p.write_text("- 1\n- 2\n")
    with pytest.raises(LdmError, match="must hold a mapping of keys to values, got a list"):
        read_mapping(p, "export config")
    p.write_text("a: [1\n")
    with pytest.raises(LdmError, match="cannot read export config .*c.yaml"):
        read_mapping(p, "export config")
    with pytest.raises(LdmError, match="cannot read"):
        read_mapping(tmp_path / "missing.yaml")
