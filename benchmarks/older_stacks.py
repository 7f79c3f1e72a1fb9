"""Do the files this tool writes load in the older stacks users still run?

Creates (once) a virtual environment with pinned older releases (transformers 4.4x, diffusers
0.3x and the peft of their time, torch 2.13.0 from the local wheel folder when it has it) and, in
it, loads the files the current stack wrote, given as paths:

- a trained pipeline folder (`--pipeline`): `StableDiffusionPipeline.from_pretrained`, then
  every text-encoder / UNet / VAE weight is compared with the file it came from, because
  transformers reports keys it did not find as a warning and initialises them at random;
- LoRA files (`--lora`, a diffusers/peft or kohya `.safetensors`, or a LoRA run's folder),
  applied to `--base` with `pipe.load_lora_weights`: the adapters each component got are
  counted against the file's keys, and one small image is made with and without the LoRA.

It trains nothing. Not part of the test suite (it needs PyPI once to build the environment).

    python benchmarks/older_stacks.py --base tiny-sd --pipeline out/model \\
        --lora out/lora --lora out/lora/lora.safetensors
    python benchmarks/older_stacks.py --selftest   # writes tiny files with this stack first

Prints one line per file (`ok` or what failed) and writes a JSON report with `--report`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PINS = {"transformers": "4.46.3", "diffusers": "0.32.2", "peft": "0.13.2",
        "huggingface_hub": "0.26.5", "accelerate": "1.1.1"}
TORCH = "torch==2.13.0"
WHEELS = Path("/opt/wheels")  # a local torch wheel saves a 200 MB download

# Runs inside the old environment: imports only what that environment has.
CHILD = textwrap.dedent('''
    import json, sys, warnings
    from pathlib import Path
    import numpy as np, torch
    import diffusers, transformers, peft
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    args = json.loads(sys.argv[1])
    report = {"versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__},
              "files": []}

    notes = set()

    def load(folder):
        """The pipeline; a tokenizer folder the old slow CLIPTokenizer cannot read (transformers
        5 writes only tokenizer.json) is noted, and the fast tokenizer used instead, so the
        weights are still checked."""
        try:
            return StableDiffusionPipeline.from_pretrained(folder)
        except Exception as error:
            from transformers import CLIPTokenizerFast
            tokenizer = CLIPTokenizerFast.from_pretrained(str(Path(folder) / "tokenizer"))
            notes.add(f"{folder}/tokenizer: the slow CLIPTokenizer model_index.json names fails "
                      f"({type(error).__name__}: {str(error).strip()[:80]}); CLIPTokenizerFast "
                      "loads it")
            # from_pretrained refuses a tokenizer of another class than model_index.json's.
            from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel
            folder = Path(folder)
            return StableDiffusionPipeline(
                vae=AutoencoderKL.from_pretrained(folder / "vae"),
                text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
                tokenizer=tokenizer, unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
                scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def image(pipe):
        return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    def check_pipeline(folder):
        pipe = load(folder)
        mismatched = []
        for name in ("text_encoder", "unet", "vae"):
            files = sorted((Path(folder) / name).glob("*.safetensors"))
            stored = {}
            for file in files:
                stored.update(load_file(str(file)))
            live = getattr(pipe, name).state_dict()
            for key, value in live.items():
                candidates = [key, key.removeprefix("text_model.")]
                found = next((stored[k] for k in candidates if k in stored), None)
                if found is None or not torch.equal(found.to(value.dtype), value):
                    mismatched.append(f"{name}.{key}")
        image(pipe)
        if mismatched:
            raise RuntimeError(f"{len(mismatched)} weights not loaded from the files "
                               f"(e.g. {mismatched[:3]})")
        return "loaded; every weight equals its file; sampled"

    def check_lora(base, lora):
        path = Path(lora)
        pipe = load(base)
        before = image(pipe)
        if path.is_dir():
            pipe.load_lora_weights(str(path), weight_name="pytorch_lora_weights.safetensors")
            path = path / "pytorch_lora_weights.safetensors"
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
        wants_te = any(k.startswith(("text_encoder", "lora_te")) for k in keys)
        adapters = pipe.get_list_adapters()
        if "unet" not in adapters:
            raise RuntimeError("no adapter reached the UNet")
        if wants_te and "text_encoder" not in adapters:
            raise RuntimeError("the file has text-encoder weights but none were loaded")
        layers = sum(1 for n, _ in pipe.text_encoder.named_modules() if n.endswith("lora_A"))
        if wants_te and layers == 0:
            raise RuntimeError("no LoRA layer in the text encoder")
        after = image(pipe)
        if np.abs(after - before).max() < 1e-4:
            raise RuntimeError("the LoRA changes nothing")
        return f"loaded (adapters on {sorted(adapters)}); sampled, differs from the base"

    for kind, target in args["files"]:
        entry = {"kind": kind, "path": target}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                entry["result"] = (check_pipeline(target) if kind == "pipeline"
                                   else check_lora(args["base"], target))
            entry["ok"] = True
        except Exception as error:  # the report names whatever the old stack raised
            entry["ok"], entry["result"] = False, f"{type(error).__name__}: {str(error)[:400]}"
        report["files"].append(entry)
    report["notes"] = sorted(notes)
    print("REPORT " + json.dumps(report))
''')


def ensure_venv(venv: Path) -> Path:
    """The old environment's python, built once (pip from PyPI; torch from WHEELS if there)."""
    python = venv / "bin" / "python"
    marker = venv / "pins.json"
    wanted = json.dumps({**PINS, "torch": TORCH}, sort_keys=True)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    find_links = ["--find-links", str(WHEELS)] if WHEELS.is_dir() else []
    subprocess.run([str(python), "-m", "pip", "install", "-q", *find_links, TORCH,
                    *(f"{name}=={version}" for name, version in PINS.items()),
                    "safetensors", "numpy<2.3", "pillow"], check=True)
    marker.write_text(wanted)
    return python


def selftest_files(root: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Train tiny runs with the current stack: a full fine-tune and a LoRA run (text encoder
    trained), and return (base, files to check)."""
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "src"),
                    str(Path(__file__).resolve().parents[1] / "tests")]
    from conftest import tiny_config, write_subject_photos
    from dreambooth.formats.lora_files import kohya_lora_file
    from dreambooth.tiny import save_tiny_pipeline
    from dreambooth.train.run import train

    base = save_tiny_pipeline(root / "base")
    photos = write_subject_photos(root / "photos")
    full = train(tiny_config(base, photos, root / "full", max_train_steps=2,
                             train_text_encoder=True))
    lora = train(tiny_config(base, photos, root / "lora", max_train_steps=2, use_lora=True,
                             rank=4, learning_rate=1e-2, train_text_encoder=True))
    return base, [("pipeline", str(full)), ("lora", str(lora)),
                  ("lora", str(kohya_lora_file(lora)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(".older-stacks-venv"))
    parser.add_argument("--base", help="base pipeline folder the LoRAs are applied to")
    parser.add_argument("--pipeline", action="append", default=[], help="trained pipeline folder")
    parser.add_argument("--lora", action="append", default=[], help="LoRA file or run folder")
    parser.add_argument("--selftest", action="store_true",
                        help="first write tiny files with the current stack and check those")
    parser.add_argument("--report", type=Path, help="write the JSON report here")
    args = parser.parse_args()
    files = [("pipeline", p) for p in args.pipeline] + [("lora", p) for p in args.lora]
    base = args.base
    workdir = tempfile.TemporaryDirectory()
    if args.selftest:
        base, files = selftest_files(Path(workdir.name))
    if not files or (any(kind == "lora" for kind, _ in files) and not base):
        parser.error("give --pipeline and/or --lora (with --base), or --selftest")
    python = ensure_venv(args.venv)
    done = subprocess.run([str(python), "-c", CHILD,
                           json.dumps({"base": str(base), "files": files})],
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    if done.returncode or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads(lines[-1].removeprefix("REPORT "))
    print("stack:", ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    for entry in report["files"]:
        print(f"{'ok  ' if entry['ok'] else 'FAIL'} {entry['kind']:8} {entry['path']}: "
              f"{entry['result']}")
    for note in report["notes"]:
        print("note:", note)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    return 0 if all(entry["ok"] for entry in report["files"]) else 1


if __name__ == "__main__":
    sys.exit(main())
