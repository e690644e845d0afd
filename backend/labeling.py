"""What a Label Studio label config asks the model to do.

`scheme_from_config` reads any label config with the SDK's LabelInterface and finds the roles by
tag type and attributes, never by tag name: the image, the rectangle tool, the control the model
fills (the *answer*) and, where there is one, the question. The result is a `LabelingScheme`, one of
four kinds:

- ``caption``: one per-region TextArea; the model describes each box.
- ``region_qa``: two per-region TextAreas; the annotator types a question into the first, the model
  answers into the second.
- ``reasoning``: a ``<Text value="$question">`` whose ``<regionK>`` tags name the K-th drawn box, and
  a task-level TextArea for the model's answer (VCR style).
- ``classification``: per-region Choices; the model picks one choice per box.

Schemes are cached by config and controls: Label Studio sends the whole config with every /predict, and
parsing it is the slowest part of a small request. A scheme holds its parsed LabelInterface, so nothing
downstream parses the config again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cachetools import LRUCache, cached
from label_studio_sdk._legacy.exceptions import LabelStudioXMLSyntaxErrorSentryIgnored
from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ControlTag
from label_studio_sdk.label_interface.object_tags import ObjectTag

from roi_contract.project import Controls

Kind = Literal["caption", "region_qa", "reasoning", "classification"]

MAX_CONFIG_CHARS = 200_000
_RECTANGLE_TAGS = ("rectangle", "rectanglelabels")
_ANSWER_TAGS = ("textarea", "choices")


class UnsupportedConfig(ValueError):
    """The label config has no shape this backend can fill; the message names what is missing."""


@dataclass(frozen=True)
class LabelingScheme:
    kind: Kind
    image: str  # name of the <Image> object: the to_name of every region item
    image_key: str  # task data key of the image: "image" for value="$image"
    rectangle: str  # name of the Rectangle/RectangleLabels control
    rectangle_type: Literal["rectanglelabels", "rectangle"]
    default_label: str | None  # first label of a RectangleLabels control
    answer: str  # name of the control the model fills
    answer_type: Literal["textarea", "choices"]
    per_region: bool
    # region_qa: the per-region TextArea the annotator types into; reasoning: the <Text> object.
    question: str | None = None
    question_key: str | None = None  # reasoning: task data key of the question
    choices: tuple[str, ...] = ()
    smart: bool = False  # the rectangle tool can trigger interactive pre-annotation
    # The parsed config, to validate predictions against; the same object for every request of a config.
    interface: LabelInterface | None = field(default=None, repr=False, compare=False)


def scheme_from_config(xml: str, controls: Controls | None = None) -> LabelingScheme:
    """Interpret a label config; raise UnsupportedConfig naming the problem.

    `controls` names tags for roles explicitly (the project's settings, roi_contract.project), e.g.
    ``Controls(question="q", answer="a")``. Without them the first match in document order wins: per-region Choices make a classification scheme; two per-region TextAreas make
    region_qa (question first, answer second); one makes a caption scheme; a ``<Text value="$key">``
    plus a task-level TextArea make a reasoning scheme. Naming a per-region TextArea as "answer" without
    naming a "question" selects the caption kind.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise UnsupportedConfig(f"label config is empty or not a string: {str(xml)[:80]!r}")
    if len(xml) > MAX_CONFIG_CHARS:
        raise UnsupportedConfig(f"label config is longer than {MAX_CONFIG_CHARS} characters")
    return _cached_scheme(xml, controls or Controls())


@cached(LRUCache(maxsize=64), lock=threading.Lock())
def _cached_scheme(xml: str, controls: Controls) -> LabelingScheme:
    interface = _parse(xml)
    named = _named_controls(interface, controls)

    image = _pick_image(interface, named)
    rectangle = _pick_rectangle(interface, image, named.get("rectangle"))
    answer = _pick_answer(interface, image, named)
    question = _pick_question(interface, image, answer, named)

    answer_type = answer.tag.lower()
    per_region = _is_per_region(answer)
    if answer_type == "choices":
        kind: Kind = "classification"
        if not answer.labels:
            raise UnsupportedConfig(f"Choices '{answer.name}' has no <Choice> for the model to pick")
    elif not per_region:
        kind = "reasoning"
    elif question is not None:
        kind = "region_qa"
    else:
        kind = "caption"

    rectangle_type = rectangle.tag.lower()
    return LabelingScheme(
        kind=kind,
        image=image.name,
        image_key=_data_key(image),
        rectangle=rectangle.name,
        rectangle_type=rectangle_type,
        default_label=(rectangle.labels or [None])[0] if rectangle_type == "rectanglelabels" else None,
        answer=answer.name,
        answer_type=answer_type,
        per_region=per_region,
        question=question.name if question is not None else None,
        question_key=_data_key(question) if kind == "reasoning" else None,
        choices=tuple(answer.labels) if kind == "classification" else (),
        smart=_attr_true(rectangle, "smart") or _attr_true(rectangle, "smartOnly"),
        interface=interface,
    )


def _parse(xml: str) -> LabelInterface:
    try:
        return LabelInterface(xml)
    except LabelStudioXMLSyntaxErrorSentryIgnored as exc:
        raise UnsupportedConfig(f"label config is not valid XML: {exc}") from exc


def _named_controls(interface: LabelInterface, controls: Controls) -> dict[str, str]:
    """The roles the project's settings name explicitly, checked against the config."""
    named = controls.named()
    known_names = {tag.name for tag in [*interface.controls, *interface.objects]}
    missing = {role: name for role, name in named.items() if name not in known_names}
    if missing:
        listed = ", ".join(f"{role}={name!r}" for role, name in missing.items())
        raise UnsupportedConfig(
            f"extra_params 'controls' names tags the label config does not have: {listed}"
        )
    return named


def _pick_image(interface: LabelInterface, named: Mapping[str, str]) -> ObjectTag:
    images = [obj for obj in interface.objects if obj.tag.lower() == "image"]
    if not images:
        raise UnsupportedConfig("no <Image> object in the label config")
    if "image" in named:
        image = interface.get_tag(named["image"])
        if image not in images:
            raise UnsupportedConfig(f"image {named['image']!r} is a <{image.tag}>, not an <Image>")
    else:
        # The first image the (named) rectangle tool draws on; the first image when none has one,
        # which _pick_rectangle then reports.
        wanted = named.get("rectangle")
        drawn_on = [
            img for img in images if any(wanted in (None, r.name) for r in _rectangles_on(interface, img))
        ]
        image = (drawn_on or images)[0]
    _data_key(image)
    return image


def _pick_rectangle(interface: LabelInterface, image: ObjectTag, name: str | None) -> ControlTag:
    rectangles = _rectangles_on(interface, image)
    if name is None:
        if not rectangles:
            raise UnsupportedConfig(f"no Rectangle/RectangleLabels control on image '{image.name}'")
        return rectangles[0]
    rectangle = interface.get_tag(name)
    if rectangle not in rectangles:
        raise UnsupportedConfig(
            f"rectangle {name!r} is not a Rectangle/RectangleLabels control on image '{image.name}'"
        )
    return rectangle


def _pick_answer(interface: LabelInterface, image: ObjectTag, named: Mapping[str, str]) -> ControlTag:
    if "answer" in named:
        answer = interface.get_tag(named["answer"])
        tag = answer.tag.lower()
        if not isinstance(answer, ControlTag) or tag not in _ANSWER_TAGS:
            raise UnsupportedConfig(
                f"answer {answer.name!r} is a <{answer.tag}>; the model can fill only a TextArea or Choices"
            )
        if (tag == "choices" or _is_per_region(answer)) and answer not in _per_region(interface, image, tag):
            raise UnsupportedConfig(
                f"answer {answer.name!r} must be per-region (perRegion=\"true\") on image '{image.name}'"
            )
        return answer
    per_region_choices = _per_region(interface, image, "choices")
    if per_region_choices:
        return per_region_choices[0]
    per_region_texts = _per_region(interface, image, "textarea")
    if len(per_region_texts) >= 2 and "question" not in named:
        return per_region_texts[1]  # region_qa: the question comes first
    answers = [c for c in per_region_texts if c.name != named.get("question")]
    if answers:
        return answers[0]
    task_level = [c for c in interface.controls if c.tag.lower() == "textarea" and not _is_per_region(c)]
    if task_level:
        return task_level[0]
    raise UnsupportedConfig(
        "nothing for the model to fill: add a per-region TextArea or Choices on image "
        f"'{image.name}', or a <Text value=\"$question\"> with a task-level TextArea"
    )


def _pick_question(
    interface: LabelInterface, image: ObjectTag, answer: ControlTag, named: Mapping[str, str]
) -> ControlTag | ObjectTag | None:
    """region_qa: the per-region TextArea the annotator types into; reasoning: the <Text> object."""
    if answer.tag.lower() == "choices":
        if "question" in named:
            raise UnsupportedConfig(f"question {named['question']!r} is not used when the answer is Choices")
        return None
    if not _is_per_region(answer):
        return _pick_text_question(interface, answer, named.get("question"))
    per_region_texts = _per_region(interface, image, "textarea")
    if "question" not in named:
        # Two per-region TextAreas, none named: the first is the question. A named answer alone means caption.
        return per_region_texts[0] if "answer" not in named and len(per_region_texts) >= 2 else None
    question = interface.get_tag(named["question"])
    if question not in per_region_texts or question is answer:
        raise UnsupportedConfig(
            f"question {question.name!r} must be a per-region TextArea on image '{image.name}', "
            f"other than the answer {answer.name!r}"
        )
    return question


def _pick_text_question(interface: LabelInterface, answer: ControlTag, name: str | None) -> ObjectTag:
    texts = [obj for obj in interface.objects if obj.tag.lower() == "text" and obj.value_is_variable]
    if name is None:
        if not texts:
            raise UnsupportedConfig(
                f'TextArea {answer.name!r} is not per-region, and there is no <Text value="$question"> '
                'question for it to answer: make it perRegion="true" or add the <Text>'
            )
        return texts[0]
    question = interface.get_tag(name)
    if question not in texts:
        raise UnsupportedConfig(
            f"question {name!r} must be a <Text> whose value is a task data key like $question"
        )
    return question


def _rectangles_on(interface: LabelInterface, image: ObjectTag) -> list[ControlTag]:
    return [c for c in interface.controls if c.tag.lower() in _RECTANGLE_TAGS and image.name in c.to_name]


def _per_region(interface: LabelInterface, image: ObjectTag, tag: str) -> list[ControlTag]:
    return [
        c
        for c in interface.controls
        if c.tag.lower() == tag and image.name in c.to_name and _is_per_region(c)
    ]


def _is_per_region(control: ControlTag) -> bool:
    return _attr_true(control, "perRegion")


def _attr_true(tag: ControlTag, attribute: str) -> bool:
    return str(tag.attr.get(attribute, "false")).lower() == "true"


def _data_key(obj: ObjectTag) -> str:
    if not obj.value_is_variable:
        raise UnsupportedConfig(
            f"<{obj.tag} name='{obj.name}'> has value={obj.value!r}; it must be a task data key like $image"
        )
    return obj.value_name
