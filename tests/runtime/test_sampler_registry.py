"""The sampler registry (`schedulers.SCHEDULERS`) is the one table: every row is complete and works, and the
CLI, the diffusers class map, the serving contract and the docs list exactly its samplers."""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ldm_deploy.cli import build_parser, main
from ldm_deploy.errors import LdmError, UsageError
from ldm_deploy.runtime import schedulers as sch
from ldm_deploy.runtime.schedulers import schedule as sched_mod

ROOT = Path(__file__).resolve().parents[2]
NAMES = tuple(sch.SCHEDULERS)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False}


# --- every row is complete and does what it says ----------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_row_builds_its_params_type_and_samples(name):
    entry = sch.SCHEDULERS[name]
    assert entry.name == name
    schedule = sch.make_schedule(name, SD15, 4)
    assert schedule.name == name and type(schedule.params) is entry.params      # the declared params, exactly
    # the sampler's signature is the contract: (model, x, schedule, *, rng, callback, **knobs)
    params = list(inspect.signature(entry.sample).parameters.values())
    assert [p.name for p in params[:3]] == ["model", "x", "schedule"]
    assert {"rng", "callback"} <= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    assert set(entry.knobs) == {p.name for p in params[3:]} - {"rng", "callback"}
    x = sch.start_latent(schedule, np.ones((1, 4, 2, 2), np.float32))
    out = sch.sample(name, lambda x_in, t: 0.1 * x_in, x, schedule, rng=np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32 and np.isfinite(out).all()


def test_every_diffusers_class_with_defaults_has_exactly_one_plain_row():
    plain = [e.class_name for e in sch.SCHEDULERS.values() if not e.overrides]
    assert sorted(plain) == sorted(set(plain)) == sorted(sched_mod.CLASS_DEFAULTS)


@pytest.mark.parametrize("broken, words", [
    (dict(sample=None), "lacks sample"),
    (dict(class_name=""), "lacks class_name"),
    (dict(build=None), "lacks build"),
    (dict(params=None), "lacks params"),
    (dict(params=dict), "params must be a SamplerParams type"),
    (dict(class_name="HeunDiscreteScheduler"), "no defaults in schedule.CLASS_DEFAULTS"),
    (dict(overrides={"karras": True}), "not scheduler config keys"),
])
def test_a_row_missing_a_piece_is_refused(broken, words):
    row = dict(name="new", sample=sch.SCHEDULERS["ddim"].sample, class_name="DDIMScheduler",
               build=sched_mod.vp_schedule, params=sched_mod.ClipParams)
    sch.Sampler(**row)                                                    # complete: accepted
    with pytest.raises(TypeError, match=words):
        sch.Sampler(**{**row, **broken})


def test_rows_are_frozen():
    with pytest.raises(AttributeError):
        sch.SCHEDULERS["ddim"].class_name = "DDPMScheduler"
    with pytest.raises(TypeError):
        sch.SCHEDULERS["dpmpp-2m-karras"].overrides["use_karras_sigmas"] = False


# --- the diffusers class map, both directions ---------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_diffusers_class_map_both_ways(name):
    entry = sch.SCHEDULERS[name]
    # name -> class: the schedule follows that class's defaults (the config says nothing but the class)
    assert sch.make_schedule(name, {"_class_name": entry.class_name}, 4).config.get("timestep_spacing", entry.class_name) \
        == sched_mod.CLASS_DEFAULTS[entry.class_name]["timestep_spacing"]
    # class (+ the row's overrides) -> name
    config = {"_class_name": entry.class_name, **entry.overrides}
    assert sch.default_name(config) == name == sch.resolve(None, config)
    assert sch.SCHEDULERS[sch.CLASS_TO_NAME[entry.class_name]].class_name == entry.class_name


def test_diffusers_has_every_class():
    diffusers = pytest.importorskip("diffusers")
    assert all(hasattr(diffusers, e.class_name) for e in sch.SCHEDULERS.values())


def test_one_name_check_for_every_entry_point():
    listing = f"choose one of: {', '.join(NAMES)}"
    for call in (lambda: sch.get_sampler("heun"), lambda: sch.resolve("heun", SD15),
                 lambda: sch.make_schedule("heun", SD15, 4),
                 lambda: sch.sample("heun", lambda x, t: x, np.zeros((1, 4, 2, 2), np.float32),
                                    sch.make_schedule("ddim", SD15, 4))):
        with pytest.raises(UsageError, match=re.escape(listing)):
            call()
    assert sch.resolve("euler", SD15) == "euler" and sch.resolve(None, SD15) == "pndm"
    with pytest.raises(LdmError, match=re.escape(", ".join(NAMES))):
        sch.resolve(None, dict(SD15, _class_name="HeunDiscreteScheduler"))


# --- the CLI, serving and the SDXL hand-off list --------------------------------------------------------

def _choices(parser, command: str, flag: str) -> tuple:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_cli_offers_every_sampler(capsys, monkeypatch):
    parser = build_parser()
    assert _choices(parser, "generate", "--scheduler") == NAMES
    assert _choices(parser, "client", "--scheduler") == NAMES
    monkeypatch.setenv("COLUMNS", "500")          # one line per flag: names are not wrapped at their hyphens
    assert main(["generate", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert f"sampler: {', '.join(NAMES)} (default: the artifact's)" in help_text


def test_serving_contract_offers_every_sampler():
    from ldm_deploy.serving.contract import Limits, parse_request

    pipe = SimpleNamespace(profiles=None, vae_scale_factor=8, scheduler_config=SD15)
    limits = Limits.from_pipeline(pipe)
    assert limits.schedulers == NAMES and limits.default_scheduler == "pndm"
    for name in NAMES:
        tensors = {"prompt": np.array([[b"x"]], object), "scheduler": np.array([[name.encode()]], object)}
        assert parse_request(limits, tensors, np.random.default_rng(0)).scheduler == name


def test_sdxl_handoff_samplers_are_registered():
    from ldm_deploy.runtime.sdxl import HANDOFF_SAMPLERS

    assert set(HANDOFF_SAMPLERS) <= set(NAMES)


# --- the docs ----------------------------------------------------------------------------------------------

def _section(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_readme_lists_every_sampler():
    section = _section("README.md", "## Schedulers")
    listed = section.split("\n\n", 1)[1].split(":", 1)[0]          # "ddim, ddpm, ...: pure numpy ..."
    assert tuple(n.strip() for n in listed.split(",")) == NAMES


def test_design_doc_lists_every_sampler():
    section = _section("docs/DESIGN.md", "## Schedulers")
    listed = re.search(r"`SCHEDULERS` \(([^)]*)\)", section.replace("\n", " ")).group(1)
    assert tuple(n.strip() for n in listed.split(",")) == NAMES


def test_schedulers_doc_has_one_table_row_per_sampler():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", (ROOT / "docs/schedulers.md").read_text(),
                                                            re.M)}
    assert tuple(rows) == NAMES
    for name, row in rows.items():
        entry = sch.SCHEDULERS[name]
        _, _, diffusers_class, _, knobs, _ = (c.strip() for c in row.split("|")[:6])
        assert diffusers_class.startswith(entry.class_name), row
        assert all(f"`{k}={v}`" in diffusers_class for k, v in entry.overrides.items()), row
        assert tuple(re.findall(r"`(\w+)`", knobs)) == entry.knobs, row
