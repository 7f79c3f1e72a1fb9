"""SD 3.x and FLUX.1: the family layer, the flow-matching objective and training on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreambooth.families import FLOW_MATCHING_FAMILIES, UnknownArchitectureError, detect_family
from dreambooth.models import load_components, load_pipeline, pipeline_class
from dreambooth.tiny import build_tiny_pipeline, save_tiny_pipeline

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="session", params=FLOW_MATCHING_FAMILIES)
def flow_model(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, save_tiny_pipeline(tmp_path_factory.mktemp("models") / f"tiny-{family}",
                                      family=family)


def test_each_flow_family_is_detected_and_loads_as_its_diffusers_pipeline(flow_model):
    family, folder = flow_model
    assert detect_family(folder) == family
    assert pipeline_class(family).__name__ == PIPELINES[family]
    pipeline = load_pipeline(folder, device="cpu")
    assert type(pipeline).__name__ == PIPELINES[family]
    images = pipeline("a photo of sks dog", num_inference_steps=2, height=32, width=32,
                      max_sequence_length=16, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    components = load_components(folder)
    assert components.unet is None and components.denoiser is components.transformer
    assert components.prediction_type == "flow_matching"
    assert components.vae.config.latent_channels == 16


def test_tiny_flow_builds_are_seeded_and_the_t5_tokenizer_is_local():
    first, second = (build_tiny_pipeline(family="flux", seed=3) for _ in range(2))
    for a, b in zip(first.transformer.parameters(), second.transformer.parameters()):
        assert torch.equal(a, b)
    ids = first.tokenizer_2("a photo of sks dog", padding="max_length", max_length=8).input_ids
    assert len(ids) == 8 and ids[5] == first.tokenizer_2.eos_token_id
    assert first.tokenizer_2.unk_token_id not in ids


def test_a_transformer_pipeline_of_another_kind_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "X"]}))
    with pytest.raises(UnknownArchitectureError, match="PixArtAlphaPipeline"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(UnknownArchitectureError, match="text_encoder_2"):
        detect_family(tmp_path)
