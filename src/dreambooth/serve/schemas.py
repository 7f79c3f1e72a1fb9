"""Request bodies of the APIs `dreambooth serve` speaks, and their OpenAI-shaped errors.

Each class is one endpoint's body as its own clients send it: OpenAI's Images API (our extras
arrive through the client's `extra_body`), OpenRouter's chat completions with image output, and
AUTOMATIC1111's txt2img. Pydantic checks types and ranges; the server turns every failure into
`{"error": {"message", "type", "param", "code"}}` with the status OpenAI would use.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dreambooth.generate import SCHEDULERS

MAX_IMAGES = 10  # OpenAI's `n` range is 1-10
MAX_PROMPT_CHARS = 4000  # OpenAI's limit for dall-e-3; CLIP reads only the first 77 tokens
MAX_SEED = 2**32 - 1

# OpenAI's `quality` as a fraction of the model's own steps (`generate.default_steps`): for
# SD's 30, low 15 and high 50 (diffusers' SD default; 30 with PNDM/DPM++ is the usual sweet
# spot), for FLUX.1-schnell's 4, 2 and 7. An explicit `num_inference_steps` wins over `quality`.
QUALITY_STEP_FRACTIONS = {
    "low": 0.5, "medium": 1.0, "high": 5 / 3, "auto": 1.0, "standard": 1.0, "hd": 5 / 3,
}



def _not_bool(value: Any) -> Any:
    # Pydantic reads true/false as 1/0 in numeric fields; a boolean there is a client bug.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
Quality = Literal[tuple(QUALITY_STEP_FRACTIONS)]  # type: ignore[valid-type]


# A Python object's default repr, as some library messages carry it ("cannot identify image file
# <_io.BytesIO object at 0x7f...>"): it tells the client nothing and leaks server internals.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and `{"error": {...}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        message = _OBJECT_REPR.sub("", message)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the first invalid field, worded like OpenAI's own validation errors."""
    if not errors:
        return APIError(400, "invalid request body")
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = error.get("type", "")
    reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = error.get("ctx", {}).get("error", reason)
        message, code, param = f"The body is not valid JSON: {detail}", "invalid_json", None
    elif kind == "missing" and param is None:
        message, code = "The request body is empty; send a JSON object.", "invalid_body"
    elif kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    elif kind == "extra_forbidden":
        message, code = f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    elif param is None:
        message, code = f"Invalid request body: {reason}", "invalid_body"
    else:
        message, code = f"Invalid value for '{param}': {reason}", "invalid_value"
    more = len(errors) - 1
    if more:
        message += f" ({more} more problem{'s' if more > 1 else ''} in this request)"
    return APIError(400, message, param=param, code=code)


def parse(model: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """Validate `values` (e.g. multipart fields) as `model`, raising the OpenAI-shaped 400."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise validation_error(error.errors()) from error


Prompt = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("the prompt is empty; describe the image to generate")
    return value


PromptText = Annotated[str, AfterValidator(_not_blank)]
NegativePrompt = Field("", max_length=MAX_PROMPT_CHARS)


class Extras(BaseModel):
    """Our parameters beyond OpenAI's; clients pass them in `extra_body`."""

    negative_prompt: str = NegativePrompt
    seed: Int | None = Field(None, ge=0, le=MAX_SEED)  # image i uses seed + i; None: random
    num_inference_steps: Int | None = Field(None, ge=1)  # upper bound: the server's max_steps
    # None: the model's own; on FLUX.1-dev the distilled guidance its transformer takes.
    guidance_scale: Float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    scheduler: SchedulerName | None = None  # None: the model's own; SD 3/FLUX.1: euler, dpm++
    lora: str | None = None  # a LoRA name the server was started with (--lora NAME=PATH)
    lora_scale: Float = Field(1.0, ge=-10, le=10, allow_inf_nan=False)


class ImageGenerationRequest(Extras):
    """POST /v1/images/generations (OpenAI). Unknown fields are errors, so typos in `extra_body`
    do not pass silently; OpenAI fields without meaning here are accepted and have no effect."""

    model_config = ConfigDict(extra="forbid")

    prompt: PromptText = Prompt
    model: str | None = None  # None: the first model the server was started with
    n: Int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = None  # "WxH" or "auto" (the model's native size)
    quality: Quality | None = None
    response_format: Literal["b64_json", "url"] | None = None  # url: a data: URL
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: Int | None = Field(None, ge=0, le=100)
    background: Literal["auto", "opaque"] | None = None
    stream: Literal[False] | None = None
    partial_images: Literal[0] | None = None
    # Accepted for compatibility, no effect: no moderation or styles here, no user tracking.
    moderation: Literal["auto", "low"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: str | None = None
    safety_identifier: str | None = None


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of POST /v1/images/edits (multipart; `image` and `mask` are files)."""

    strength: Float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    input_fidelity: Literal["high", "low"] | None = None  # accepted, no effect


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(Extras):
    """POST /api/v1/chat/completions (OpenRouter) with `modalities` holding "image".

    The prompt is the text of the last user message. Text-generation knobs that chat clients
    send routinely (temperature, max_tokens, ...) are ignored rather than refused.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[str] | None = None
    n: Int = Field(1, ge=1, le=MAX_IMAGES)
    stream: bool = False
    size: str | None = None  # our extra: "WxH"


class A1111Settings(BaseModel):
    """AUTOMATIC1111's `override_settings`: the checkpoint is read, other settings ignored."""

    model_config = ConfigDict(extra="ignore")

    sd_model_checkpoint: str | None = None  # a model name this server serves


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img (AUTOMATIC1111). A1111's many other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: PromptText = Prompt
    negative_prompt: str = NegativePrompt
    steps: Int = Field(20, ge=1)
    cfg_scale: Float = Field(7.0, ge=0, le=50, allow_inf_nan=False)  # FLUX.1: 1 (no true CFG)
    # Forge's FLUX.1 guidance (the distilled guidance input); None: the model's own. Ignored by
    # models without distilled guidance, as Forge ignores it.
    distilled_cfg_scale: Float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    width: Int | None = None  # None: the model's native size
    height: Int | None = None
    seed: Int = Field(-1, ge=-1, le=MAX_SEED)  # -1: random
    sampler_name: str | None = None  # an A1111 name such as "Euler a"; None: the model's own
    batch_size: Int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: Int = Field(1, ge=1, le=MAX_IMAGES)
    override_settings: A1111Settings = Field(default_factory=A1111Settings)
    lora: str | None = None
    lora_scale: Float = Field(1.0, ge=-10, le=10, allow_inf_nan=False)
