"""ldm-train on the tiny config: every stage runs, a killed run resumes IDENTICALLY, the result loads.

One uninterrupted run (A) of all stages, and one run (B) in which the VAE, text-encoder and U-Net
stages are each killed after step 3 (their last checkpoint is step 2) and resumed with --resume.
B's per-step losses and final weights must equal A's exactly.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_deploy.compare import assert_close
from ldm_deploy.errors import LdmError, UsageError
from training import trainer as trainer_mod
from training.batching import BatchOrder
from training.config import load_config
from training.distributed import DistEnv
from training.rng import rng_state, set_rng_state
from training.stages import run_stage

STAGES = ("vae", "text-encoder", "unet")


class Killed(Exception):
    """Stands in for SIGKILL: the step raises, nothing after it runs."""


def _cfg(out: Path, *extra: str):
    return load_config("tiny", [f"out={out}", *extra])


def _losses(out: Path, stage: str) -> list[tuple[int, float]]:
    with open(out / "logs" / f"{stage.replace('-', '_')}.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    a, b = root / "a", root / "b"
    reports = {s: run_stage(s, _cfg(a)) for s in ("tokenizer", *STAGES)}

    run_stage("tokenizer", _cfg(b))
    real_step = trainer_mod.Trainer._step
    for stage in STAGES:
        def dying_step(self, step, _real=real_step):
            if step == 2:                       # steps 1-2 done and checkpointed at 2; die inside step 3
                raise Killed()
            return _real(self, step)

        trainer_mod.Trainer._step = dying_step
        try:
            with pytest.raises(Killed):
                run_stage(stage, _cfg(b))
        finally:
            trainer_mod.Trainer._step = real_step
        assert json.loads((b / "checkpoints" / stage.replace("-", "_") / "latest.json").read_text())["step"] == 2
        run_stage(stage, _cfg(b), resume=True)
    return a, b, reports


def test_every_stage_ran_and_reported(runs):
    a, _, reports = runs
    assert reports["tokenizer"]["vocab_size"] > 514
    assert np.isfinite(reports["vae"]["psnr_db"]) and reports["vae"]["scaling_factor"] > 0
    roundtrip = reports["vae"]["roundtrip_analyser"]["all"]
    assert roundtrip["images"] == 4 and 0 <= roundtrip["colour"] <= 1 and 0 <= roundtrip["shape"] <= 1
    for stage in STAGES:
        losses = _losses(a, stage)
        assert [s for s, _ in losses] == [1, 2, 3, 4]
        assert all(np.isfinite(v) for _, v in losses)
        assert (a / "logs" / f"{stage.replace('-', '_')}.png").is_file()
    assert (a / "samples" / "unet_0000004.png").is_file()
    for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "tokenizer/vocab.json"):
        assert (a / "model" / name).is_file(), name
    vae_cfg = json.loads((a / "model" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(reports["vae"]["scaling_factor"])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_repeats_the_uninterrupted_losses(runs, stage):
    a, b, _ = runs
    assert _losses(b, stage) == _losses(a, stage)


def test_resumed_model_equals_uninterrupted(runs):
    from safetensors.torch import load_file

    a, b, _ = runs
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        sa = load_file(a / "model" / part / f"{name}.safetensors")
        sb = load_file(b / "model" / part / f"{name}.safetensors")
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} differs after resume"


def test_result_loads_in_load_components_and_diffusers(runs):
    from diffusers import StableDiffusionPipeline

    from training.checkpoint import load_components

    a, _, _ = runs
    ours = load_components(a / "model")
    pipe = StableDiffusionPipeline.from_pretrained(a / "model", safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    z = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ids = torch.from_numpy(np.asarray(pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=77,
                                                     return_tensors="np")["input_ids"])).long()
    with torch.no_grad():
        ctx_ref = pipe.text_encoder(ids)[0]
        ctx = ours.text_encoder(ids)[0]
        assert_close(ctx.numpy(), ctx_ref.numpy(), atol=1e-5, name="text encoder")
        t = torch.tensor([10.0, 900.0])
        assert_close(ours.unet(z, t, ctx).numpy(), pipe.unet(z, t, ctx_ref).sample.numpy(), atol=1e-4, name="unet")
        assert_close(ours.vae.decode(z).numpy(), pipe.vae.decode(z).sample.numpy(), atol=1e-4, name="vae")


def test_config_rejects_unknown_keys_and_applies_overrides(tmp_path):
    cfg = load_config("tiny", ["unet.steps=7", "unet.lr=3e-4", "data.kind=shapes"])
    assert cfg.unet.steps == 7 and cfg.unet.lr == 3e-4
    with pytest.raises(LdmError, match="unknown key.*stepz"):
        load_config("tiny", ["unet.stepz=7"])
    with pytest.raises(UsageError):
        load_config("tiny", ["unet.steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae:\n  kl_wieght: 1\n")
    with pytest.raises(LdmError, match="kl_wieght"):
        load_config(bad)


def test_batch_order_shards_global_batches_over_ranks():
    """Ranks x micro-batches partition each global batch; the order depends only on (seed, step)."""
    n, gb, world, accum = 10, 8, 2, 2
    per_step = []
    for step in range(4):
        got = []
        for rank in range(world):
            env = DistEnv(rank=rank, world=world)
            order = BatchOrder(n, gb, seed=3, env=env, accum=accum)
            for micro in range(accum):
                got += order.indices(step, micro)
        assert len(got) == gb
        per_step.append(got)
    single = BatchOrder(n, gb, seed=3, env=DistEnv())
    flat = [i for s in range(4) for i in single.indices(s, 0)]
    assert sorted(flat[:n]) == list(range(n))                     # the first epoch is a permutation
    assert sorted(i for s in per_step for i in s) == sorted(flat)  # sharding covers the same samples
    with pytest.raises(LdmError, match="divisible"):
        BatchOrder(n, 6, seed=0, env=DistEnv(world=4))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    state = rng_state()
    torch.save(state, tmp_path / "s.pt")
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_ema_follows_diffusers_warmup_rule():
    from training.ema import EMA

    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    start = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)                                  # decay_0 = min(0.9, 1/10) = 0.1
    assert_close(ema.shadow["weight"].numpy(), (0.1 * start + 0.9 * (start + 1)).numpy(), atol=1e-6)
    with ema.applied(m):
        assert torch.equal(m.weight, ema.shadow["weight"])
    assert torch.equal(m.weight, start + 1)


def test_same_command_runs_under_torchrun_with_gloo(tmp_path):
    """2 CPU processes (DDP over gloo): rank 0 logs and saves; --resume continues the sharded run."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "LDM_TRAIN_DEVICE": "cpu"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "training.cli", "vae", "--config", "tiny", "--out", str(tmp_path), "--set", "data.train_size=16"]
    first = subprocess.run([*base, "--steps", "2"], env=env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([*base, "--steps", "4", "--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    assert [s for s, _ in _losses(tmp_path, "vae")] == [1, 2, 3, 4]
    state = json.loads((tmp_path / "checkpoints" / "vae" / "step_0000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"]["position"] == 0   # 4 steps x 4 = 16 samples


def test_eval_scores_heldout_prompts_and_writes_a_report(runs):
    from training.stages.evaluate import evaluate

    a, _, _ = runs
    report = evaluate(_cfg(a))
    assert set(report["accuracy"]) == {"colour", "shape", "position", "size", "background", "all"}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert np.isfinite(report["vae_psnr_db"])
    saved = json.loads((a / "eval" / "report.json").read_text())
    assert len(saved["per_prompt"]) == 4 and (a / "eval" / "samples.png").is_file()


def test_given_vae_and_text_encoder_are_reused_unchanged(runs, tmp_path):
    from safetensors.torch import load_file

    a, _, _ = runs
    cfg = _cfg(tmp_path, f"vae.path={a / 'model'}", f"text_encoder.path={a / 'model'}")
    run_stage("vae", cfg)
    run_stage("text-encoder", cfg)
    for part, name in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        given = load_file(a / "model" / part / f"{name}.safetensors")
        copied = load_file(tmp_path / "stages" / part / f"{name}.safetensors")
        assert given.keys() == copied.keys() and all(torch.equal(given[k], copied[k]) for k in given)


def test_periodic_sample_grids_use_ema_and_keep_training_identical(runs, tmp_path):
    a, _, _ = runs
    cfg = _cfg(tmp_path, "unet.sample_every=2", f"tokenizer.path={a / 'model' / 'tokenizer'}")
    for stage in ("tokenizer", "vae", "text-encoder"):
        run_stage(stage, _cfg(tmp_path, f"tokenizer.path={a / 'model' / 'tokenizer'}",
                              f"vae.path={a / 'stages' / 'vae'}", f"text_encoder.path={a / 'stages' / 'text_encoder'}"))
    run_stage("unet", cfg)
    assert (tmp_path / "samples" / "unet_0000002.png").is_file()
    assert _losses(tmp_path, "unet") == _losses(a, "unet")        # sampling never disturbs training


def test_disk_latent_cache_is_keyed_by_vae_and_dataset(runs, tmp_path):
    from training.latents import cache_key, cached_latents
    from training.stages.images import load_images
    from training.stages.parts import frozen, load_part

    a, _, _ = runs
    cfg = _cfg(a, "unet.cache_latents=disk")
    vae_dir = a / "stages" / "vae"
    vae = frozen(load_part("vae", vae_dir))
    images = load_images(cfg, "train")
    mean, std = cached_latents(cfg, vae, vae_dir, images, torch.device("cpu"))
    files = list((a / "cache").glob("latents-*.safetensors"))
    assert len(files) == 1 and cache_key(vae_dir, cfg, len(images)) in files[0].name
    again = cached_latents(cfg, None, vae_dir, images, torch.device("cpu"))     # no VAE needed: read back
    assert torch.equal(again[0], mean) and torch.equal(again[1], std)
    assert cache_key(vae_dir, _cfg(a, "data.seed=1"), len(images)) != cache_key(vae_dir, cfg, len(images))


def test_grad_accumulation_takes_the_same_step_as_one_batch(tmp_path):
    """grad_accum=2 splits a global batch into two micro-batches and averages their gradients: with a
    loss that uses no noise, the weights after two steps equal those of grad_accum=1 on the same batches."""
    import torch

    from training.config import StageConfig
    from training.trainer import Trainer

    xs = torch.linspace(-1, 1, 16).reshape(16, 1)
    ys = 3 * xs - 0.5

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(1, 1)

        def forward(self, batch, gen):
            x, y = batch
            return ((self.net(x) - y) ** 2).mean(), {}

    def fetch(indices):
        return xs[indices], ys[indices]

    weights, logged = [], []
    initial = torch.cat([p.detach().flatten() for p in Regression().net.parameters()])
    for accum in (1, 2):
        objective = Regression()
        cfg = StageConfig(steps=2, batch_size=8, grad_accum=accum, lr=0.1, warmup_steps=0, grad_clip=0.0,
                          save_every=100, log_every=1, precision="fp32")
        Trainer("reg", objective, {"net": objective.net}, fetch, 16, cfg, out=tmp_path / f"a{accum}", seed=0).fit()
        weights.append(torch.cat([p.detach().flatten() for p in objective.net.parameters()]))
        logged.append(_losses(tmp_path / f"a{accum}", "reg"))
    assert not torch.equal(weights[0], initial), "the steps changed nothing"
    # AdamW is blind to a constant gradient scale, so the logged loss (summed the same way) checks the 1/accum
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-6)
    assert [s for s, _ in logged[1]] == [s for s, _ in logged[0]] == [1, 2]
    assert [v for _, v in logged[1]] == pytest.approx([v for _, v in logged[0]], rel=1e-6)
