"""The diffusers / peft side of tests/interop/test_lora_diffusers.py; runs in the optimum venv.

transformers 4.57 there accepts peft 0.21.2 (the main venv's transformers 5.25 refuses it), so diffusers 0.39
can load, fuse and run text-encoder LoRAs. The tests call this script in a subprocess:

    python tests/interop/lora_side.py --family sd1|sdxl --out DIR --inputs IN.npz --cases CASES.json
        DIR/model               a tiny diffusers folder (tests/runtime/tiny_model.py / tiny_sdxl.py sizes), saved
                                by this diffusers
        DIR/loras/peft.safetensors        U-Net + text encoder(s) adapters injected by peft (`add_adapter`,
                                r=4, lora_alpha 8 / 2 / 6: alpha != r), written by diffusers' `save_lora_weights`
                                with each component's adapter metadata: `unet.*` / `text_encoder.*` /
                                `text_encoder_2.*` `.lora_A/.lora_B.weight`
        DIR/loras/base_layer.safetensors  the same tensors under nested-wrapper names (`<module>.base_layer.lora_A
                                .weight`, no metadata: alpha = r); diffusers cannot load these names, so its
                                reference is the `peft` file at alpha = r (the `peft_alpha_r` case below)
        DIR/loras/kohya.safetensors       another peft adapter pair (r=2; U-Net 3x3 convs too: LoCon) converted by
                                diffusers' own `convert_state_dict_to_kohya` (lora_unet_* / lora_te1_* / lora_te2_*,
                                SD1's text encoder renamed lora_te_ as kohya's sd-scripts writes it), its alphas
                                (which the converter sets to r) set to the adapter's lora_alpha (3)
        DIR/reference.npz       per case of CASES ({name: [[file, scale], ...]}), diffusers with each file loaded by
                                `load_lora_weights` and fused by `fuse_lora(lora_scale=scale)`, in order:
                                `<case>/<component output>` on IN's ids and U-Net feeds, `<case>/images` (uint8)
                                from IN's latents (SD1: DDIM, SDXL: Euler; 4 steps)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red circle on a blue square", "a green triangle"]
NEGATIVE, STEPS = "blurry", 4
GUIDANCE = {"sd1": 7.5, "sdxl": 5.0}
SCHEDULER = {"sd1": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler"}
ENCODERS = {"sd1": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
UNET_TARGETS = {"sd1": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"],
                "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]}
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# (rank, lora_alpha) per component of the `peft` file; the kohya file: r=2, alpha 3 everywhere
PEFT_RANKS = {"unet": (4, 8), "text_encoder": (4, 2), "text_encoder_2": (4, 6)}


def _pipeline_class(family):
    import diffusers

    return diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline


def make_folder(family: str, folder: Path) -> Path:
    if family == "sdxl":
        from tests.runtime.tiny_sdxl import make_tiny_sdxl

        return make_tiny_sdxl(folder)
    from tests.runtime.tiny_model import make_tiny_folder

    return make_tiny_folder(folder)


def make_loras(family: str, model: Path, out: Path) -> None:
    import torch

    from tests.lora_files import peft_adapter
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cls = _pipeline_class(family)
    layers, meta, kohya_in = {}, {}, {}
    for seed_base, which in ((10, "peft"), (20, "kohya")):
        pipe = cls.from_pretrained(str(model))
        for i, component in enumerate(("unet", *ENCODERS[family])):
            targets = UNET_TARGETS[family] if component == "unet" else TE_TARGETS
            if which == "peft":
                r, alpha = PEFT_RANKS[component]
            else:
                r, alpha = 2, 3
                # the text encoder: every Linear, as kohya's sd-scripts trains it. (diffusers 0.39 drops a kohya
                # file's q/k/v_proj LoRA with a warning when it has mlp keys but no out_proj: it then infers the
                # "new diffusers" key type, whose mapping lacks to_q_lora; ldm-deploy reads such a file whole)
                targets = ["to_q", "to_v", "conv2"] if component == "unet" else TE_TARGETS
            sd, config = peft_adapter(getattr(pipe, component), r, alpha, targets, seed_base + i)
            if which == "peft":
                layers[f"{component}_lora_layers"] = sd
                meta[f"{component}_lora_adapter_metadata"] = config.to_dict()
            else:
                kohya_in.update({f"{component}.{k}": v for k, v in sd.items()})
    cls.save_lora_weights(str(out / "peft"), **layers, **meta)
    (out / "peft" / "pytorch_lora_weights.safetensors").rename(out / "peft.safetensors")
    (out / "peft").rmdir()

    from safetensors.torch import load_file

    plain = load_file(str(out / "peft.safetensors"))
    save_file({k.replace(".lora_A.", ".base_layer.lora_A.").replace(".lora_B.", ".base_layer.lora_B."): v
               for k, v in plain.items()}, str(out / "base_layer.safetensors"))

    kohya = convert_state_dict_to_kohya(kohya_in)
    kohya = {k: (torch.tensor(3.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    if family == "sd1":
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    save_file(kohya, str(out / "kohya.safetensors"))


def _peft_alpha_r(loras: Path) -> Path:
    """The `peft` file without its metadata (alpha = r): what diffusers reads for the base_layer file's tensors."""
    from safetensors.torch import load_file, save_file

    path = loras / "peft_alpha_r.safetensors"
    save_file(load_file(str(loras / "peft.safetensors")), str(path))
    return path


def reference(family: str, model: Path, loras: Path, inputs: dict, case: list) -> dict[str, np.ndarray]:
    import diffusers
    import torch

    pipe = _pipeline_class(family).from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    for name, scale in case:
        path = _peft_alpha_r(loras) if name == "peft_alpha_r" else loras / f"{name}.safetensors"
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    out = {}
    ids = torch.from_numpy(inputs["input_ids"]).long()
    with torch.no_grad():
        for component in ENCODERS[family]:
            r = getattr(pipe, component)(ids, output_hidden_states=True)
            if family == "sd1":
                out[f"{component}/last_hidden_state"] = r.last_hidden_state.numpy()
            else:
                out[f"{component}/penultimate_hidden_state"] = r.hidden_states[-2].numpy()
                if component == "text_encoder_2":
                    out[f"{component}/text_embeds"] = r.text_embeds.numpy()
        t = {k: torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                        "time_ids") if k in inputs}
        extra = {"added_cond_kwargs": {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}} \
            if family == "sdxl" else {}
        out["unet/noise_pred"] = pipe.unet(t["sample"], t["timestep"], t["encoder_hidden_states"], **extra).sample.numpy()
        pipe.scheduler = getattr(diffusers, SCHEDULER[family]).from_config(pipe.scheduler.config)
        latents = inputs["latents"]
        prompts = PROMPTS[: latents.shape[0]]
        img = pipe(prompts, negative_prompt=[NEGATIVE] * len(prompts), num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE[family], latents=torch.from_numpy(latents), height=latents.shape[2] * 8,
                   width=latents.shape[3] * 8, output_type="np").images
    out["images"] = np.round(np.asarray(img) * 255).astype(np.uint8)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=("sd1", "sdxl"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--inputs", required=True)
    p.add_argument("--cases", required=True)
    a = p.parse_args()
    out = Path(a.out)
    inputs = dict(np.load(a.inputs))
    cases = json.loads(Path(a.cases).read_text())
    make_folder(a.family, out / "model")
    make_loras(a.family, out / "model", out / "loras")
    refs = {}
    for case, loras in cases.items():
        refs.update({f"{case}/{k}": v for k, v in reference(a.family, out / "model", out / "loras", inputs,
                                                            loras).items()})
    np.savez(out / "reference.npz", **refs)


if __name__ == "__main__":
    main()
