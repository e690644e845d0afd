"""backend.settings: the one place the environment is read, and the documentation that must follow it."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]


class RecordingEnvironment(Mapping[str, str]):
    """An empty environment that remembers every variable asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        raise KeyError(name)

    def get(self, name: str, default=None):
        self.asked.add(name)
        return default

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def variables_read() -> set[str]:
    environment = RecordingEnvironment()
    Settings.from_env(environment)
    return environment.asked


def test_defaults_without_any_variable():
    assert Settings.from_env({}) == Settings()


def test_every_variable_is_in_the_readme_table_and_in_env_example():
    table_rows = re.findall(r"^\| `[A-Z].*$", (ROOT / "README.md").read_text(), re.MULTILINE)
    readme_rows = {name for row in table_rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}
    env_example = set(
        re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE)
    )
    read = variables_read()

    assert len(read) >= 15
    assert read - readme_rows == set(), "variables missing from the README's configuration table"
    assert read - env_example == set(), "variables missing from .env.example"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ROI_PREDICT_TIMEOUT", "soon", "ROI_PREDICT_TIMEOUT='soon' is not a number"),
        ("ROI_INLINE_PREDICT_TASKS", "2.5", "ROI_INLINE_PREDICT_TASKS='2.5' is not an integer"),
        ("ROI_IMAGE_MAX_BYTES", "-1", "ROI_IMAGE_MAX_BYTES='-1' must not be negative"),
        ("ROI_PRELABEL_CHUNK_TASKS", "0", "ROI_PRELABEL_CHUNK_TASKS='0' must be at least 1"),
    ],
)
def test_a_bad_value_names_its_variable(name, value, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env({name: value})


def test_values_are_parsed():
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "ROI_IMAGE_ALLOWED_HOSTS": "a.example, b.example:8443,",
            "ROI_TRAIN_EVERY": "50",
            "LOG_LEVEL": "info",
        }
    )
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.image_allowed_hosts == ("a.example", "b.example:8443")
    assert settings.train_every_annotations == 50
    assert settings.log_level == "INFO"


def test_the_console_scripts_refuse_a_bad_value_in_one_line(monkeypatch, capsys):
    from backend.app import main as backend_main
    from worker.main import main as worker_main

    monkeypatch.setenv("ROI_TRAIN_EVERY", "often")

    assert worker_main([]) != 0
    with pytest.raises(SystemExit) as exited:
        backend_main([])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "roi-worker: ROI_TRAIN_EVERY='often' is not an integer",
        "roi-backend: ROI_TRAIN_EVERY='often' is not an integer",
    ]
