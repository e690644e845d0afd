"""The project's labeling configs and API client against a real Label Studio 1.23.2."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import requests
from PIL import Image

from backend.ls_client import LabelStudioClient, LabelStudioError
from devstack.label_studio import LabelStudio, copy_data_template
from devstack.processes import ProcessFailed

REPO_ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image" smart="true">
    <Label value="Object"/><Label value="Person"/>
  </RectangleLabels>
  <TextArea name="caption" toName="image" perRegion="true" editable="true" required="false"
            maxSubmissions="1" displayMode="region-list"/>
</View>
"""


def box_and_caption(
    region_id: str, box: tuple[float, float, float, float], label: str, text: str
) -> list[dict]:
    """A rectangle and its per-region caption, tied by their shared id."""
    x, y, width, height = box
    geometry = {"x": x, "y": y, "width": width, "height": height, "rotation": 0}
    common = {"id": region_id, "to_name": "image", "original_width": 64, "original_height": 48}
    return [
        {
            **common,
            "from_name": "label",
            "type": "rectanglelabels",
            "value": {**geometry, "rectanglelabels": [label]},
        },
        {**common, "from_name": "caption", "type": "textarea", "value": {**geometry, "text": [text]}},
    ]


@pytest.fixture(scope="module")
def refusing_label_studio(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory):
    """A Label Studio of its own for the tests that provoke its errors (it logs them at ERROR): the session's
    one must end the suite with a clean log (tests/e2e/test_zz_healthy_logs.py)."""
    root = tmp_path_factory.mktemp("refusing-label-studio")
    copy_data_template(label_studio.venv, root / "data")
    with LabelStudio(root / "data", root / "files", venv=label_studio.venv) as server:
        yield server


@pytest.fixture(scope="module")
def image_folder(label_studio: LabelStudio) -> Path:
    folder = label_studio.files_root / "images"
    folder.mkdir(exist_ok=True)
    for name, colour in (("red.png", (200, 30, 30)), ("green.png", (30, 200, 30))):
        Image.new("RGB", (64, 48), colour).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def project(ls_client: LabelStudioClient, image_folder: Path) -> int:
    project = ls_client.create_project("e2e client checks", CONFIG)
    ls_client.add_local_storage(project, image_folder, "images")
    return project


def test_every_labeling_config_passes_label_studios_validation(ls_client: LabelStudioClient) -> None:
    configs = sorted((REPO_ROOT / "labeling_configs").glob("*.xml"))
    assert configs, "labeling_configs/ has no *.xml file"
    problems = {path.name: ls_client.validate_config(path.read_text()) for path in configs}
    assert {name: errors for name, errors in problems.items() if errors} == {}


def test_a_broken_config_is_reported_with_label_studios_message(refusing_label_studio: LabelStudio) -> None:
    ls_client = LabelStudioClient(refusing_label_studio.url, refusing_label_studio.token)
    wrong_target = '<View><Image name="image" value="$image"/><TextArea name="caption" toName="img"/></View>'
    assert ls_client.validate_config(wrong_target) == [
        "toName=\"img\" not found in names: ['caption', 'image']"
    ]
    assert ls_client.validate_config("<View><Image") == ["unclosed token: line 1, column 6"]
    with pytest.raises(LabelStudioError) as refused:
        ls_client.create_project("broken", wrong_target)
    assert refused.value.status_code == 400
    assert 'toName="img" not found' in refused.value.message


def test_errors_carry_the_status_code_and_label_studios_message(refusing_label_studio: LabelStudio) -> None:
    label_studio = refusing_label_studio
    ls_client = LabelStudioClient(label_studio.url, label_studio.token)
    with pytest.raises(LabelStudioError, match="HTTP 404: No Project matches the given query") as missing:
        ls_client.get_project(999_999)
    assert missing.value.status_code == 404
    with pytest.raises(LabelStudioError, match="HTTP 401: Invalid token"):
        LabelStudioClient(label_studio.url, "not-the-token").get_project(1)


def test_project_tasks_with_predictions_and_local_files(
    label_studio: LabelStudio, ls_client: LabelStudioClient, project: int, image_folder: Path
) -> None:
    assert ls_client.find_project_by_title("e2e client checks") == project
    assert ls_client.find_project_by_title("no such project") is None
    assert ls_client.get_project(project)["title"] == "e2e client checks"

    imported_prediction = {
        "model_version": "imported-1",
        "score": 0.25,
        "result": box_and_caption("p1", (10, 10, 30, 40), "Object", "a red rectangle"),
    }
    task_ids = ls_client.import_tasks(
        project,
        [
            {"data": {"image": "/data/local-files/?d=images/red.png"}, "predictions": [imported_prediction]},
            {"data": {"image": "/data/local-files/?d=images/green.png"}},
        ],
    )
    assert len(task_ids) == 2

    first, second = ls_client.get_tasks(project, task_ids)
    assert first["id"] == task_ids[0]
    assert first["predictions"][0]["model_version"] == "imported-1"
    assert first["predictions"][0]["result"][1]["value"]["text"] == ["a red rectangle"]
    assert second["predictions"] == [] and second["annotations"] == [] and second["drafts"] == []
    assert [task["id"] for task in ls_client.get_tasks(project, [task_ids[1]])] == [task_ids[1]]

    late = ls_client.create_prediction(
        task_ids[1],
        box_and_caption("g1", (5, 5, 50, 50), "Object", "green"),
        score=-0.3,
        model_version="async-2",
    )
    assert [(p["id"], p["model_version"], p["score"]) for p in ls_client.predictions(task_ids[1])] == [
        (late, "async-2", -0.3)
    ]
    assert ls_client.model_versions(project) == {"imported-1": 1, "async-2": 1}

    # Local files are served to the token's holder, and only below a storage's folder. (Not asked without
    # the token here: Label Studio logs a refused request as an ERROR with a traceback, and this stack's
    # logs must stay clean for tests/e2e/test_zz_healthy_logs.py.)
    image_url = f"{label_studio.url}{first['data']['image']}"
    served = requests.get(image_url, headers={"Authorization": f"Token {label_studio.token}"}, timeout=30)
    assert served.status_code == 200
    assert Image.open(io.BytesIO(served.content)).getpixel((0, 0)) == (200, 30, 30)
    (label_studio.files_root / "elsewhere").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(label_studio.files_root / "elsewhere" / "x.png")
    outside = f"{label_studio.url}/data/local-files/?d=elsewhere/x.png"
    assert (
        requests.get(
            outside, headers={"Authorization": f"Token {label_studio.token}"}, timeout=30
        ).status_code
        == 404
    )


def test_tasks_of_a_large_selection_come_page_by_page_without_asking_past_the_last(
    label_studio: LabelStudio, ls_client: LabelStudioClient
) -> None:
    project = ls_client.create_project("e2e many tasks", CONFIG)
    task_ids = ls_client.import_tasks(
        project, [{"data": {"image": f"/data/upload/x/{n}.png"}} for n in range(230)]
    )
    assert label_studio.log_path is not None
    log_before = label_studio.log_path.read_text(errors="replace")

    selected = ls_client.get_tasks(project, list(reversed(task_ids[5:])))  # 225 ids: three pages of ids
    everything = ls_client.get_tasks(project)

    assert [task["id"] for task in selected] == task_ids[5:]
    assert [task["id"] for task in everything] == task_ids
    log_after = label_studio.log_path.read_text(errors="replace")
    assert "Invalid page" not in log_after[len(log_before) :]


def test_export_json_keeps_annotation_and_region_ids(ls_client: LabelStudioClient, project: int) -> None:
    [task] = ls_client.import_tasks(project, [{"data": {"image": "/data/local-files/?d=images/green.png"}}])
    annotation = ls_client.create_annotation(
        task, box_and_caption("r7", (20, 20, 40, 40), "Object", "first words")
    )
    ls_client.update_annotation(
        annotation, box_and_caption("r7", (20, 20, 40, 40), "Person", "a green field")
    )

    exported = {item["id"]: item for item in ls_client.export_json(project)}
    [saved] = exported[task]["annotations"]
    assert saved["id"] == annotation
    assert [(r["id"], r["type"]) for r in saved["result"]] == [("r7", "rectanglelabels"), ("r7", "textarea")]
    assert saved["result"][0]["value"]["rectanglelabels"] == ["Person"]
    assert saved["result"][1]["value"]["text"] == ["a green field"]
    assert task in {item["id"] for item in ls_client.export_json(project, all_tasks=True)}


def test_a_restart_keeps_the_user_token_and_data(
    label_studio: LabelStudio, ls_client: LabelStudioClient
) -> None:
    stored = json.loads((label_studio.data_dir / "credentials.json").read_text())
    assert stored["token"] == label_studio.token
    label_studio.stop()
    assert not label_studio.running
    label_studio.start()  # same data dir and port: the user exists and is not created again
    assert label_studio.running
    assert ls_client.find_project_by_title("e2e client checks") is not None


def test_credentials_that_clash_with_the_data_dir_are_refused(label_studio: LabelStudio) -> None:
    with pytest.raises(ValueError, match="already has a user with another token"):
        LabelStudio(label_studio.data_dir, label_studio.files_root, token="another-token-123")
    with pytest.raises(ValueError, match="longer than 5 characters"):
        LabelStudio(label_studio.data_dir.parent / "fresh", label_studio.files_root, token="abc")


def test_draw_box_refuses_a_box_that_is_not_fractions(draw_box, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="a draw step needs x1,y1,x2,y2 fractions"):
        draw_box(1, 1, (0.6, 0.2, 0.4, 0.5), tmp_path / "shot.png")


def test_a_taken_port_is_reported_with_the_end_of_the_log(label_studio: LabelStudio, tmp_path: Path) -> None:
    # Label Studio itself would quietly move to the next port; we refuse instead.
    copy_data_template(label_studio.venv, tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LabelStudio(
            tmp_path / "data", tmp_path / "files", venv=label_studio.venv, port=port, start_timeout_s=120
        )
        with pytest.raises(ProcessFailed, match=f"label-studio: port {port} is in use") as failure:
            server.start()
    assert f"* Port {port} is in use." in failure.value.tail
    assert f"* Port {port} is in use." in (tmp_path / "data" / "label-studio.log").read_text()
    assert not server.running
