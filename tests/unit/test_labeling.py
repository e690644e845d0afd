"""backend.labeling: label configs to labeling schemes, and per-project prompts."""

from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labeling import MAX_CONFIG_CHARS, LabelingScheme, UnsupportedConfig, scheme_from_config
from roi_contract.project import Controls

CONFIGS = Path(__file__).resolve().parents[2] / "labeling_configs"

RECTANGLE = '<RectangleLabels name="label" toName="image"><Label value="Object"/></RectangleLabels>'


def view(*tags: str) -> str:
    return "<View>" + "".join(tags) + "</View>"


IMAGE = '<Image name="image" value="$image"/>'


def read_config(name: str) -> str:
    return (CONFIGS / name).read_text()


EXPECTED = {
    "region_captioning.xml": dict(
        kind="caption",
        answer="caption",
        answer_type="textarea",
        per_region=True,
        smart=True,
    ),
    "region_qa.xml": dict(
        kind="region_qa",
        answer="answer",
        answer_type="textarea",
        per_region=True,
        question="question",
        smart=True,
    ),
    "multi_region_reasoning.xml": dict(
        kind="reasoning",
        answer="answer",
        answer_type="textarea",
        per_region=False,
        question="question",
        question_key="question",
        smart=True,
    ),
    "region_classification.xml": dict(
        kind="classification",
        answer="category",
        answer_type="choices",
        per_region=True,
        choices=("Person", "Vehicle", "Animal", "Furniture", "Other"),
        smart=True,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_shipped_config_is_valid_and_gives_its_scheme(name):
    xml = read_config(name)
    LabelInterface(xml).validate()  # raises on an invalid config

    expected = LabelingScheme(
        image="image",
        image_key="image",
        rectangle="label",
        rectangle_type="rectanglelabels",
        default_label="Object",
        **EXPECTED[name],
    )
    assert scheme_from_config(xml) == expected


def test_the_shipped_configs_are_exactly_the_four_kinds():
    assert sorted(p.name for p in CONFIGS.glob("*.xml")) == sorted(EXPECTED)


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View><Image name='image' value='$image'>", "label config is not valid XML"),
        ("", "label config is empty"),
        (
            view('<Text name="t" value="$t"/>', '<TextArea name="a" toName="t" perRegion="true"/>'),
            "no <Image> object",
        ),
        (
            view(IMAGE, '<TextArea name="caption" toName="image" perRegion="true"/>'),
            "no Rectangle/RectangleLabels control on image 'image'",
        ),
        (view(IMAGE, RECTANGLE), "nothing for the model to fill: add a per-region TextArea or Choices"),
        (
            view('<Image name="image" value="http://example.com/a.jpg"/>', RECTANGLE),
            "must be a task data key like $image",
        ),
        (
            view(IMAGE, RECTANGLE, '<TextArea name="answer" toName="image"/>'),
            "TextArea 'answer' is not per-region, and there is no <Text value=\"$question\">",
        ),
        (
            view(IMAGE, RECTANGLE, '<Choices name="category" toName="image" perRegion="true"></Choices>'),
            "Choices 'category' has no <Choice>",
        ),
    ],
    ids=[
        "not-xml",
        "empty",
        "no-image",
        "no-rectangle",
        "nothing-to-fill",
        "fixed-image-url",
        "no-question",
        "no-choice",
    ],
)
def test_unsupported_configs_name_their_problem(xml, message):
    with pytest.raises(UnsupportedConfig) as error:
        scheme_from_config(xml)
    assert message in str(error.value)


def test_unsupported_config_is_a_value_error():
    assert issubclass(UnsupportedConfig, ValueError)


def test_plain_rectangle_without_labels_has_no_default_label():
    xml = view(
        IMAGE,
        '<Rectangle name="box" toName="image"/>',
        '<TextArea name="caption" toName="image" perRegion="true"/>',
    )
    scheme = scheme_from_config(xml)
    assert (scheme.kind, scheme.rectangle, scheme.rectangle_type, scheme.default_label, scheme.smart) == (
        "caption",
        "box",
        "rectangle",
        None,
        False,
    )


def test_roles_are_found_by_tag_not_by_name():
    xml = view(
        '<Image name="photo" value="$url"/>',
        '<RectangleLabels name="boxes" toName="photo" smartOnly="true"><Label value="Car"/><Label value="Tree"/>'
        "</RectangleLabels>",
        '<TextArea name="words" toName="photo" perRegion="true"/>',
    )
    scheme = scheme_from_config(xml)
    assert (
        scheme.image,
        scheme.image_key,
        scheme.rectangle,
        scheme.default_label,
        scheme.answer,
        scheme.smart,
    ) == (
        "photo",
        "url",
        "boxes",
        "Car",
        "words",
        True,
    )


def test_the_image_with_a_rectangle_tool_is_chosen():
    xml = view(
        '<Image name="reference" value="$reference"/>',
        IMAGE,
        RECTANGLE,
        '<TextArea name="caption" toName="image" perRegion="true"/>',
    )
    assert scheme_from_config(xml).image == "image"


def test_per_region_choices_win_over_per_region_textareas():
    xml = view(
        IMAGE,
        RECTANGLE,
        '<TextArea name="note" toName="image" perRegion="true"/>',
        '<Choices name="kind" toName="image" perRegion="true"><Choice value="A"/><Choice value="B"/></Choices>',
    )
    scheme = scheme_from_config(xml)
    assert (scheme.kind, scheme.answer, scheme.choices) == ("classification", "kind", ("A", "B"))


THREE_TEXTAREAS = view(
    IMAGE,
    RECTANGLE,
    '<TextArea name="notes" toName="image" perRegion="true"/>',
    '<TextArea name="caption" toName="image" perRegion="true"/>',
    '<TextArea name="q" toName="image" perRegion="true"/>',
)


def test_without_overrides_the_first_two_per_region_textareas_are_question_and_answer():
    scheme = scheme_from_config(THREE_TEXTAREAS)
    assert (scheme.kind, scheme.question, scheme.answer) == ("region_qa", "notes", "caption")


def test_naming_only_the_answer_makes_a_caption_scheme():
    scheme = scheme_from_config(THREE_TEXTAREAS, Controls(answer="caption"))
    assert (scheme.kind, scheme.question, scheme.answer) == ("caption", None, "caption")


def test_naming_question_and_answer_picks_them():
    scheme = scheme_from_config(THREE_TEXTAREAS, Controls(question="q", answer="notes"))
    assert (scheme.kind, scheme.question, scheme.answer) == ("region_qa", "q", "notes")


def test_naming_only_the_question_takes_the_first_other_per_region_textarea_as_answer():
    scheme = scheme_from_config(THREE_TEXTAREAS, Controls(question="caption"))
    assert (scheme.kind, scheme.question, scheme.answer) == ("region_qa", "caption", "notes")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (Controls(answer="nope", question="notes"), "does not have: answer='nope'"),
        (Controls(answer="label"), "answer 'label' is a <RectangleLabels>"),
        (Controls(question="caption", answer="caption"), "other than the answer 'caption'"),
        (Controls(image="label"), "image 'label' is a <RectangleLabels>, not an <Image>"),
    ],
    ids=[
        "unknown-name",
        "answer-not-fillable",
        "question-is-answer",
        "image-not-image",
    ],
)
def test_bad_overrides_are_rejected_by_name(overrides, message):
    with pytest.raises(UnsupportedConfig) as error:
        scheme_from_config(THREE_TEXTAREAS, overrides)
    assert message in str(error.value)


def test_overriding_the_rectangle_and_the_reasoning_question():
    xml = view(
        '<Text name="intro" value="$intro"/>',
        '<Text name="ask" value="$ask"/>',
        IMAGE,
        RECTANGLE,
        '<Rectangle name="plain" toName="image"/>',
        '<TextArea name="reply" toName="image"/>',
    )
    auto = scheme_from_config(xml)
    assert (auto.kind, auto.rectangle, auto.question, auto.question_key) == (
        "reasoning",
        "label",
        "intro",
        "intro",
    )

    named = scheme_from_config(xml, Controls(rectangle="plain", question="ask"))
    assert (named.rectangle, named.rectangle_type, named.question, named.question_key) == (
        "plain",
        "rectangle",
        "ask",
        "ask",
    )


def test_a_non_per_region_choices_cannot_be_the_answer():
    xml = view(
        IMAGE,
        RECTANGLE,
        '<TextArea name="caption" toName="image" perRegion="true"/>',
        '<Choices name="quality" toName="image"><Choice value="good"/></Choices>',
    )
    with pytest.raises(UnsupportedConfig, match="answer 'quality' must be per-region"):
        scheme_from_config(xml, Controls(answer="quality"))


@pytest.mark.parametrize(
    "tags",
    [
        (
            '<TextArea name="caption" toName="image" perRegion="true"/>',
            '<TextArea name="notes" toName="image"/>',
        ),
        (
            '<TextArea name="notes" toName="image"/>',
            '<TextArea name="caption" toName="image" perRegion="true"/>',
        ),
        (
            '<Text name="ask" value="$ask"/>',
            '<TextArea name="caption" toName="image" perRegion="true"/>',
            '<TextArea name="notes" toName="image"/>',
        ),
    ],
    ids=["task-level-after", "task-level-before", "with-a-text-question"],
)
def test_a_task_level_textarea_beside_a_per_region_one_never_takes_the_answer(tags):
    # The annotator's task-level notes field is not the model's: each box's caption goes to the per-region one.
    scheme = scheme_from_config(view(IMAGE, RECTANGLE, *tags))

    assert (scheme.kind, scheme.answer, scheme.per_region, scheme.question) == (
        "caption",
        "caption",
        True,
        None,
    )


@pytest.mark.parametrize("notes_at", [0, 1, 2], ids=["before", "between", "after"])
def test_a_task_level_textarea_beside_two_per_region_ones_leaves_question_and_answer_to_them(notes_at):
    tags = [
        '<TextArea name="question" toName="image" perRegion="true"/>',
        '<TextArea name="answer" toName="image" perRegion="true"/>',
    ]
    tags.insert(notes_at, '<TextArea name="notes" toName="image"/>')

    scheme = scheme_from_config(view(IMAGE, RECTANGLE, *tags))

    assert (scheme.kind, scheme.question, scheme.answer) == ("region_qa", "question", "answer")


CHOICES_AND_NOTES = view(
    IMAGE,
    RECTANGLE,
    '<TextArea name="note" toName="image" perRegion="true"/>',
    '<TextArea name="remark" toName="image" perRegion="true"/>',
    '<Choices name="kind" toName="image" perRegion="true"><Choice value="A"/></Choices>',
)


def test_a_choices_answer_has_no_question_and_refuses_a_named_one():
    scheme = scheme_from_config(CHOICES_AND_NOTES)
    assert (scheme.kind, scheme.answer, scheme.question) == ("classification", "kind", None)

    with pytest.raises(UnsupportedConfig) as error:
        scheme_from_config(CHOICES_AND_NOTES, Controls(question="note"))
    assert str(error.value) == "question 'note' is not used when the answer is Choices"


def test_reasoning_refusals_say_exactly_what_to_do():
    no_text = view(IMAGE, RECTANGLE, '<TextArea name="answer" toName="image"/>')
    with pytest.raises(UnsupportedConfig) as error:
        scheme_from_config(no_text)
    assert str(error.value) == (
        "TextArea 'answer' is not per-region, and there is no <Text value=\"$question\"> question for it to "
        'answer: make it perRegion="true" or add the <Text>'
    )

    fixed_text = view(
        '<Text name="fixed" value="What is left?"/>', IMAGE, RECTANGLE, '<TextArea name="a" toName="image"/>'
    )
    with pytest.raises(UnsupportedConfig) as error:
        scheme_from_config(fixed_text, Controls(question="fixed"))
    assert (
        str(error.value) == "question 'fixed' must be a <Text> whose value is a task data key like $question"
    )


def test_naming_the_first_per_region_textarea_as_question_takes_the_next_as_answer():
    scheme = scheme_from_config(THREE_TEXTAREAS, Controls(question="notes"))
    assert (scheme.kind, scheme.question, scheme.answer) == ("region_qa", "notes", "caption")


def test_a_named_rectangle_chooses_the_image_it_draws_on():
    xml = view(
        IMAGE,
        '<Image name="second" value="$second"/>',
        RECTANGLE,
        '<Rectangle name="box2" toName="second"/>',
        '<TextArea name="caption" toName="image" perRegion="true"/>',
        '<TextArea name="caption2" toName="second" perRegion="true"/>',
    )

    assert (scheme_from_config(xml).image, scheme_from_config(xml).rectangle) == ("image", "label")
    named = scheme_from_config(xml, Controls(rectangle="box2"))
    assert (named.image, named.image_key, named.rectangle, named.answer) == (
        "second",
        "second",
        "box2",
        "caption2",
    )


@pytest.mark.parametrize(
    ("xml", "controls", "message"),
    [
        (
            view('<Text name="t" value="$t"/>', '<TextArea name="a" toName="t" perRegion="true"/>'),
            None,
            "no <Image> object in the label config",
        ),
        (
            view(IMAGE, RECTANGLE),
            None,
            "nothing for the model to fill: add a per-region TextArea or Choices on image 'image', "
            'or a <Text value="$question"> with a task-level TextArea',
        ),
        (
            THREE_TEXTAREAS,
            Controls(rectangle="caption"),
            "rectangle 'caption' is not a Rectangle/RectangleLabels control on image 'image'",
        ),
        (
            THREE_TEXTAREAS,
            Controls(answer="nope", question="nada"),
            "extra_params 'controls' names tags the label config does not have: question='nada', answer='nope'",
        ),
    ],
    ids=["no-image", "nothing-to-fill", "not-a-rectangle", "two-unknown-names"],
)
def test_refusals_word_for_word(xml, controls, message):
    with pytest.raises(UnsupportedConfig) as error:
        scheme_from_config(xml, controls)
    assert str(error.value) == message


def test_a_config_that_is_not_text_or_too_long_is_refused_before_parsing():
    def refusal(xml) -> str:
        with pytest.raises(UnsupportedConfig) as error:
            scheme_from_config(xml)
        return str(error.value)

    assert refusal(42) == "label config is empty or not a string: '42'"
    assert refusal(" " * 100) == f"label config is empty or not a string: {' ' * 80!r}"
    config = read_config("region_captioning.xml")
    padded = config + " " * (MAX_CONFIG_CHARS - len(config))  # exactly at the limit: read
    assert scheme_from_config(padded).kind == "caption"
    assert refusal(padded + " ") == f"label config is longer than {MAX_CONFIG_CHARS} characters"
