"""Continue stage 1b of a world model's VAE: more decoder-only steps on renders of a new stream.

The encoder stays frozen, so every latent, and hence a UNet trained on them, stays valid: a
better decoder raises what every generation of that model can show without a new stage 2
(issue 18's fifth pass, BENCHMARKS.md). Resumable: rerun the same command after a stop.

    python benchmarks/continue_decoder.py --output_dir runs/decoder-D2 --steps 3000 --seed 2
    python benchmarks/vae_ceiling.py --vae runs/decoder-D2/vae

`OUTPUT_DIR/vae` is written in float32 when the steps are done; `OUTPUT_DIR/model` is the whole
base model (`--vae`'s model folder) with that VAE in it, in the bundled model's fp16, for
`dreambench_mini.py --base_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo",
                        help="The world model whose VAE continues (a folder or 'demo').")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=2,
                        help="Seed of the render and posterior-sample streams; a seed the "
                             "VAE has not been trained on gives new renders.")
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--report_seed", type=int, default=0,
                        help="Seed of the PSNR report's render stream: the seed of the VAE's "
                             "stage-1 run, so the figures compare (the bundled VAE's: 0).")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL

    from dreambooth import seeding
    from dreambooth.files import atomic_folder
    from dreambooth.models import resolve_model_path
    from dreambooth.world import pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path(args.model)
    output_dir = Path(args.output_dir)
    base_report = json.loads((model_dir / "vae" / "report.json").read_text())
    config = pretrain.PretrainConfig(output_dir=str(output_dir), seed=args.seed,
                                     decoder_steps=args.steps,
                                     decoder_learning_rate=args.learning_rate,
                                     **_architecture(model_dir))
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    stream = seeding.derive_seed(config.seed, seeding.PRETRAIN_DECODER_STREAM)
    dataset = pretrain.RenderBatches(seed=stream, batch_size=config.vae_batch_size,
                                     num_steps=config.decoder_steps,
                                     look_probability=config.decoder_look_probability)
    print(f"continuing the decoder of {model_dir / 'vae'} for {args.steps} steps "
          f"(seed {args.seed}, lr {args.learning_rate:g}); it had "
          f"{base_report.get('decoder_steps', 0)}")
    pretrain._fit(pretrain.VAEModule(vae, config, decoder_only=True), dataset,
                  stage_dir=output_dir / "stage1b-decoder", config=config,
                  total_steps=config.decoder_steps, callbacks=[])
    vae.to("cpu")
    # The same report stream as the base VAE's, so the PSNR figures compare.
    report = pretrain.vae_report(vae, args.report_seed)
    report.update(decoder_steps=base_report.get("decoder_steps", 0) + args.steps,
                  continued_from=str(model_dir / "vae"), continuation_seed=args.seed,
                  continuation_learning_rate=args.learning_rate,
                  before_psnr_db=base_report["psnr_db"],
                  stage1_psnr_db=base_report.get("stage1_psnr_db"))
    pretrain._save_vae(vae, output_dir / "vae", report)
    with atomic_folder(output_dir / "model") as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        shutil.rmtree(staging / "vae")
        vae.to(torch.float16).save_pretrained(staging / "vae", safe_serialization=True)
        (staging / "vae" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"PSNR {report['psnr_db']:.2f} dB (before: {base_report['psnr_db']:.2f} dB); "
          f"wrote {output_dir / 'vae'} and {output_dir / 'model'}")


def _architecture(model_dir: Path) -> dict:
    saved = json.loads((model_dir / "pretrain_config.json").read_text())
    keys = ("vae_channels", "latent_channels", "vae_batch_size", "decoder_look_probability",
            "kl_weight")
    return {key: tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
            for key in keys}


if __name__ == "__main__":
    main()
