"""backend.webhooks and backend.project_state without Redis: reading events and project ids."""

from __future__ import annotations

import re

import pytest

from backend.project_state import parse_project_id
from backend.webhooks import parse_event


def item(region_id, origin, kind="rectanglelabels"):
    return {
        "id": region_id,
        "type": kind,
        "from_name": "label",
        "to_name": "image",
        "value": {},
        "origin": origin,
    }


def test_annotation_event_is_curated_unless_skipped_or_empty():
    def event(**annotation):
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 5, **annotation}}
        return parse_event(body)

    submitted = event(result=[item("a", "prediction")])

    assert (submitted.project_id, submitted.annotation_ids, submitted.curated) == (3, (5,), True)
    assert not event(result=[item("a", "manual")], was_cancelled=True).curated
    assert not event(result=[]).curated


def test_deleted_and_training_events():
    deleted = parse_event(
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {"id": 2}], "project": {"id": 3}}
    )
    training = parse_event({"action": "START_TRAINING", "project": {"id": 3, "title": "x"}})

    assert (deleted.action, deleted.project_id, deleted.annotation_ids) == ("ANNOTATIONS_DELETED", 3, (1, 2))
    assert (training.action, training.project_id) == ("START_TRAINING", 3)
    assert parse_event({"action": "TASKS_CREATED", "tasks": []}) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"action": "ANNOTATION_CREATED", "project": {"id": 3}},
            "ANNOTATION_CREATED needs an 'annotation' object",
        ),
        ({"action": "ANNOTATION_UPDATED", "project": {"id": 3}, "annotation": {"id": "x"}}, "integer 'id'"),
        (
            {"action": "ANNOTATIONS_DELETED", "project": {"id": 3}},
            "ANNOTATIONS_DELETED needs an 'annotations' list",
        ),
        ({"action": "START_TRAINING"}, "project must be a project id"),
        ({"action": 5}, "webhook body needs a string 'action', got 5"),
    ],
)
def test_malformed_events_name_the_problem(body, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_event(body)


def test_project_id_of_each_form_label_studio_sends():
    assert parse_project_id("12.1795827309") == 12
    assert parse_project_id(12) == 12
    assert parse_project_id("12") == 12
    for bad in (None, "", "x.1", "0.1", True, -3, {"id": 1}):
        with pytest.raises(ValueError, match="project must be"):
            parse_project_id(bad)
