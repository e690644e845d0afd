"""A project's settings: the "extra params" JSON Label Studio sends to /setup, as every process reads it.

    {"prompts": {"caption": "Describe <region1> briefly.", "classification": "... {choices}."},
     "controls": {"image": "...", "rectangle": "...", "question": "...", "answer": "..."},
     "train_every": 50,
     "train": {"stage": "lora", "steps": 400, "learning_rate": 3e-4, "replay_images": 400,
               "gate": {"metrics": {"caption": "cider_d"}, "held_out_tolerance": 0.0, "replay_tolerance": 0.01}}}

Every key is optional. The backend stores the settings of a project's last /setup in Redis; the worker
reads them there for pre-labeling and fine-tuning. The names under "controls" are checked against the
label config by backend.labeling.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt

from roi_contract.validation import ContractError, ContractModel, parse

DEFAULT_CAPTION_PROMPT = "Describe <region1> briefly."
DEFAULT_CLASSIFICATION_PROMPT = "What is <region1>? Answer with one of: {choices}."
TRAIN_STAGES = ("region", "projector", "lora", "full")
# What roi_model/text_metrics.py scores; the gate compares one of them per question kind.
GATE_METRICS = ("exact_match", "token_f1", "bleu4", "meteor", "rouge_l", "cider_d")
MAX_PROMPT_CHARS = 1000
MAX_EXTRA_PARAMS_CHARS = 20_000


def _mentions_region1(prompt: str) -> str:
    if "<region1>" not in prompt:
        raise ValueError("the prompt must mention <region1>, the box it is about")
    return prompt


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_mentions_region1)]


class Prompts(ContractModel):
    """Prompt templates. In the classification prompt "{choices}" becomes the allowed choices joined by ", "
    (plain replacement, so other braces stay as they are)."""

    caption: Prompt = DEFAULT_CAPTION_PROMPT
    classification: Prompt = DEFAULT_CLASSIFICATION_PROMPT

    def classification_text(self, choices: tuple[str, ...]) -> str:
        return self.classification.replace("{choices}", ", ".join(choices))


class Controls(ContractModel):
    """Label config tags named explicitly for a role, where the first match in document order is not wanted."""

    image: str | None = None
    rectangle: str | None = None
    question: str | None = None
    answer: str | None = None

    def named(self) -> dict[str, str]:
        return {role: name for role, name in self.model_dump().items() if name is not None}


class GateSettings(ContractModel):
    """The regression gate's thresholds. `metrics`: per question kind (caption, region_qa, classification,
    colour, ...) the metric compared (default: CIDEr-D for free text, exact match for short answers); a
    tolerance is how much of it a candidate may lose, per kind, on the project's held-out tasks and on
    replay, as a share of the metric's range (0..1; CIDEr-D's taken as 0..10: 0.01 allows 0.1 of it)."""

    metrics: dict[str, Literal[GATE_METRICS]] | None = None  # type: ignore[valid-type]
    held_out_tolerance: Annotated[float, Field(ge=0)] | None = None
    replay_tolerance: Annotated[float, Field(ge=0)] | None = None


class TrainOverrides(ContractModel):
    """Fine-tuning knobs a project may set; the worker's defaults fill the rest."""

    stage: Literal[TRAIN_STAGES] | None = None  # type: ignore[valid-type]
    steps: PositiveInt | None = None
    learning_rate: PositiveFloat | None = None
    replay_images: PositiveInt | None = None
    gate: GateSettings = GateSettings()

    def given(self) -> dict[str, Any]:
        """The knobs set, the gate's thresholds aside (see `gate`)."""
        return {key: value for key, value in self.model_dump().items() if value is not None and key != "gate"}


class ProjectSettings(ContractModel):
    prompts: Prompts = Prompts()
    controls: Controls = Controls()
    train_every: Annotated[int, Field(ge=0)] | None = None  # None: the backend's ROI_TRAIN_EVERY; 0: off
    train: TrainOverrides = TrainOverrides()

    @classmethod
    def from_extra_params(cls, extra: Any) -> ProjectSettings:
        """Label Studio's extra params: null, a JSON object, or a string holding one. ContractError names a problem."""
        if extra is None or extra == "":
            return cls()
        if isinstance(extra, str):
            if len(extra) > MAX_EXTRA_PARAMS_CHARS:
                raise ContractError(f"extra_params: longer than {MAX_EXTRA_PARAMS_CHARS} characters")
            try:
                extra = json.loads(extra)
            except (json.JSONDecodeError, RecursionError) as error:
                raise ContractError(f"extra_params: not valid JSON ({error})") from None
        return parse(cls, extra, "extra_params")
