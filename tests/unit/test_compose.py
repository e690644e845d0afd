"""Static checks of the Docker deployment: docker-compose.yml, docker/*.Dockerfile, .env.example, .dockerignore.

No Docker engine runs here, so the compose file is read as Docker Compose reads it (a .env copied from
.env.example, ${...} interpolated), validated against the Compose Specification's JSON schema, and
cross-checked against the files it names, the settings backend/settings.py reads, and the deployment rules
in shared/DESIGN.md. The schema comes from a pinned, checksummed PyPI wheel (check-jsonschema vendors it
for its compose hook), downloaded into .cache/ on first use.

Each checker returns the problems it finds; every checker is also run on a small broken example, so a
checker that cannot fail is caught too.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SETTINGS_SOURCE = ROOT / "backend" / "settings.py"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
BACKEND_DOCKERFILE = ROOT / "docker" / "backend.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

SCHEMA_REQUIREMENT = "check-jsonschema==0.39.0"
SCHEMA_WHEEL = "check_jsonschema-0.39.0-py3-none-any.whl"
SCHEMA_WHEEL_SHA256 = "14ce5c94871c551268ea948ffe21e9f1464dc48fb20bf9a4c13deeaaf756cf9b"
SCHEMA_MEMBER = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"
SCHEMA_CACHE = ROOT / ".cache" / "compose-schema"

ROI_SERVICES = ("backend", "worker", "trainer")
GPU_SERVICES = ("worker", "trainer")
# Settings that docker-compose.yml sets to this stack's own addresses and paths, or that the operator
# must provide: the only ones whose value in the containers may differ from the code's default.
DEPLOYMENT_SPECIFIC = frozenset({"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL", "MODEL_DIR"})
# Secrets with no safe default: compose must refuse to start without them, and .env.example ships none.
REQUIRED_SECRETS = frozenset({"LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_API_KEY"})
# shared/reference/label-studio.md §1.2, §1.5 and §2.6: what Label Studio 1.23.2 needs to connect a
# backend on a private address, accept the legacy token, and make no calls home.
LABEL_STUDIO_IMAGE = "heartexlabs/label-studio:1.23.2"
LABEL_STUDIO_ENVIRONMENT = {
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    "LATEST_VERSION_CHECK": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
}
LABEL_STUDIO_PREDICT_TIMEOUT_S = 100
REDIS_OPTIONS = {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}

Problems = list[str]


# --- The Compose Specification's schema --------------------------------------------------------------


@functools.cache
def compose_schema(cache: Path = SCHEMA_CACHE) -> dict:
    """The schema from the pinned wheel, downloaded with pip into `cache` the first time."""
    wheel = cache / SCHEMA_WHEEL
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            done = subprocess.run(
                [*command, "--dest", download, SCHEMA_REQUIREMENT],
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(f"pip download {SCHEMA_REQUIREMENT} failed:\n{done.stdout}{done.stderr}")
            os.replace(Path(download) / SCHEMA_WHEEL, wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SCHEMA_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel} has sha256 {digest}, expected {SCHEMA_WHEEL_SHA256}; delete it to download again"
        )
    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read(SCHEMA_MEMBER))


def schema_problems(compose: Mapping, schema: Mapping) -> Problems:
    # No format checker: the spec's "duration" means Go durations ("10m"), not JSON Schema's ISO 8601 ones.
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top level)'}: {error.message}"
        for error in validator.iter_errors(compose)
    ]


# --- Reading and interpolating, as Docker Compose does ----------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping, as Docker Compose does; PyYAML keeps the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [
            self.construct_object(key, deep=True)
            for key, _ in node.value
            if key.tag != "tag:yaml.org,2002:merge"
        ]
        repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys given twice: {repeated}", node.start_mark
            )
        return super().construct_mapping(node, deep)


def load_compose(text: str) -> dict:
    return yaml.load(text, Loader=_StrictLoader)


_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*)|(?P<invalid>\{))"
)
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>.*))?", re.DOTALL)


class InterpolationError(ValueError):
    pass


def _parse_reference(match: re.Match) -> tuple[str, str | None, str]:
    """(name, operator, argument) of one ${...} or $NAME reference."""
    if match["named"]:
        return match["named"], None, ""
    braced = _BRACED.fullmatch(match["braced"] or "")
    if match["invalid"] or braced is None or "$" in match["braced"]:
        raise InterpolationError(f"unsupported interpolation in {match.string!r}")
    return braced["name"], braced["operator"], braced["argument"] or ""


def _substitute(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name, operator, argument = _parse_reference(match)
        value = env.get(name)
        if operator is None:
            return value or ""
        is_set = value is not None and (value != "" or not operator.startswith(":"))
        if operator.endswith("-"):
            return value if is_set else argument
        if operator.endswith("?"):
            if not is_set:
                raise InterpolationError(f"{name} is required: {argument}")
            return value
        return argument if is_set else ""

    return _REFERENCE.sub(replace, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """`node` (parsed YAML) with every ${...} in its string values replaced, as Docker Compose does."""
    if isinstance(node, str):
        return _substitute(node, env)
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return node


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _references(node: Any) -> Iterable[tuple[str, str | None]]:
    for text in _strings(node):
        for match in _REFERENCE.finditer(text):
            if not match["escaped"]:
                name, operator, _ = _parse_reference(match)
                yield name, operator


def referenced_variables(node: Any) -> set[str]:
    return {name for name, _ in _references(node)}


def required_variables(node: Any) -> set[str]:
    return {name for name, operator in _references(node) if operator in (":?", "?")}


# --- .env.example and backend/settings.py ------------------------------------------------------------

_ASSIGNMENT = re.compile(r"(?P<commented>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)")


@dataclasses.dataclass(frozen=True)
class EnvEntry:
    value: str
    active: bool  # False for a commented-out "# NAME=default" line
    description: str


def parse_env_example(text: str) -> dict[str, EnvEntry]:
    """Each NAME=value line, active or commented out, with the comment lines right above it."""
    entries: dict[str, EnvEntry] = {}
    description: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        assignment = _ASSIGNMENT.fullmatch(line)
        if assignment:
            name = assignment["name"]
            if name in entries:
                raise ValueError(f".env.example line {number}: {name} is set a second time")
            entries[name] = EnvEntry(assignment["value"], not assignment["commented"], " ".join(description))
            description = []
        elif line.startswith("#") and line.strip("#- "):
            description.append(line.lstrip("#").strip())
        elif line.startswith("#") or not line:
            description = []  # a blank line or a ruler ends a description
        else:
            raise ValueError(f".env.example line {number} is neither a comment nor NAME=value: {raw!r}")
    return entries


def undocumented(names: Iterable[str], entries: Mapping[str, EnvEntry]) -> Problems:
    return [
        f"{name} is not documented in .env.example (a NAME=default line with a comment above it)"
        for name in sorted(names)
        if name not in entries or not entries[name].description
    ]


_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def _environment_read(node: ast.AST) -> str | None:
    """The variable name when `node` reads the environment: get("X"), os.getenv("X"), environ["X"]."""
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        function = node.func
        called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        name = node.args[0].value
        if called in ("get", "getenv") and isinstance(name, str) and _ENV_NAME.fullmatch(name):
            return name
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        container = ast.unparse(node.value)
        name = node.slice.value
        if "env" in container.lower() and isinstance(name, str) and _ENV_NAME.fullmatch(name):
            return name
    return None


def settings_variables(source: str) -> tuple[set[str], set[str]]:
    """(names read, fallback names): a fallback is read only after another name in an `or` chain."""
    tree = ast.parse(source)
    fallback_nodes = {
        id(value)
        for node in ast.walk(tree)
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or)
        for value in node.values[1:]
    }
    reads = [(name, id(node)) for node in ast.walk(tree) if (name := _environment_read(node))]
    names = {name for name, _ in reads}
    primary = {name for name, node_id in reads if node_id not in fallback_nodes}
    return primary, names - primary


def service_environment(service: Mapping) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {
        key: "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        for key, value in environment.items()
    }


def changed_settings(environment: Mapping[str, str], keep: Iterable[str] = ()) -> Problems:
    """Settings that `environment` changes from the code's defaults other than through the names in `keep`."""
    kept = {name: value for name, value in environment.items() if name in set(keep)}
    try:
        actual = Settings.from_env(environment)
    except ValueError as error:
        return [f"Settings.from_env fails on these values: {error}"]
    expected = Settings.from_env(kept)
    return [
        f"{field.name} is {getattr(actual, field.name)!r}, the code's default is {getattr(expected, field.name)!r}"
        for field in dataclasses.fields(Settings)
        if getattr(actual, field.name) != getattr(expected, field.name)
    ]


def missing_settings(compose: Mapping, names: Iterable[str], services: Iterable[str]) -> Problems:
    problems = []
    for service in services:
        environment = service_environment(compose["services"].get(service, {}))
        problems += [f"{service} does not get {name}" for name in sorted(set(names) - environment.keys())]
    return problems


def secret_problems(raw_compose: Mapping, entries: Mapping[str, EnvEntry]) -> Problems:
    required = required_variables(raw_compose)
    problems = [
        f"compose starts without {name} (use ${{{name}:?...}})"
        for name in sorted(REQUIRED_SECRETS - required)
    ]
    for name in sorted(required):
        entry = entries.get(name)
        if entry is None or not entry.active or entry.value:
            problems.append(f".env.example must list {name} as an empty, uncommented {name}= line")
    return problems


# --- Services ----------------------------------------------------------------------------------------


def command_args(service: Mapping) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def option_value(args: list[str], option: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def volume_mounts(service: Mapping) -> list[tuple[str | None, str]]:
    """(source, target) of each volume; source None for an anonymous volume."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            mounts.append((parts[0], parts[1]) if len(parts) > 1 else (None, parts[0]))
        else:
            mounts.append((volume.get("source"), volume["target"]))
    return mounts


def _named_volume_at(compose: Mapping, service: Mapping, target: str) -> str | None:
    sources = [source for source, mounted_at in volume_mounts(service) if mounted_at == target]
    named = compose.get("volumes") or {}
    return sources[0] if sources and sources[0] in named else None


def build_problems(compose: Mapping, root: Path) -> Problems:
    problems = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            image = service.get("image") or ""
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                problems.append(f"{name}: image {image!r} is not pinned to a tag")
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = root / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not context.is_dir():
            problems.append(f"{name}: build context {context} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
        else:
            missing = [
                source for source in copy_sources(dockerfile.read_text()) if not (context / source).exists()
            ]
            problems += [
                f"{name}: {dockerfile.name} copies {source}, which does not exist" for source in missing
            ]
    return problems


def healthcheck_problems(compose: Mapping) -> Problems:
    problems = []
    for name, service in compose["services"].items():
        check = service.get("healthcheck") or {}
        test = check.get("test") or []
        if str(check.get("disable", "")).lower() == "true" or not test or test[0] == "NONE":
            problems.append(f"{name} has no healthcheck")
    return problems


def dependency_problems(compose: Mapping) -> Problems:
    problems = []
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        conditions = (
            dict.fromkeys(depends_on, "service_started") if isinstance(depends_on, list) else depends_on
        )
        for target, condition in conditions.items():
            condition = (
                condition if isinstance(condition, str) else condition.get("condition", "service_started")
            )
            if target not in services:
                problems.append(f"{name} depends on {target}, which is not a service")
            elif condition == "service_healthy" and not services[target].get("healthcheck"):
                problems.append(f"{name} waits for {target} to be healthy, but {target} has no healthcheck")
    return problems


def model_volume_problems(compose: Mapping) -> Problems:
    problems, mounts = [], {}
    for name in GPU_SERVICES:
        service = compose["services"].get(name, {})
        model_dir = option_value(command_args(service), "--model-dir")
        volume = _named_volume_at(compose, service, model_dir) if model_dir else None
        if model_dir is None:
            problems.append(f"{name}: its command has no --model-dir")
        elif volume is None:
            problems.append(f"{name}: no named volume is mounted at its --model-dir {model_dir}")
        else:
            mounts[name] = (volume, model_dir)
    if len(set(mounts.values())) > 1:
        problems.append(f"the GPU services mount different model volumes: {mounts}")
    return problems


def _reserved_gpus(service: Mapping) -> set[str] | None:
    """The GPUs a service reserves ({"all"} for every GPU), or None when it reserves no NVIDIA GPU."""
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    devices = [
        device
        for device in reservations.get("devices") or []
        if device.get("driver") == "nvidia" and "gpu" in (device.get("capabilities") or [])
    ]
    if not devices:
        return None
    gpus: set[str] = set()
    for device in devices:
        if device.get("device_ids"):
            gpus |= {str(gpu) for gpu in device["device_ids"]}
        elif str(device.get("count", "all")) in ("all", "-1"):
            gpus.add("all")
        else:
            # Docker gives `count: N` the GPUs 0..N-1, whatever other containers hold.
            gpus |= {str(index) for index in range(int(device["count"]))}
    return gpus


def gpu_problems(compose: Mapping) -> Problems:
    problems, reserved = [], {}
    for name in GPU_SERVICES:
        gpus = _reserved_gpus(compose["services"].get(name, {}))
        if gpus is None:
            problems.append(f"{name} reserves no NVIDIA GPU (deploy.resources.reservations.devices)")
        else:
            reserved[name] = gpus
    for first, second in itertools.combinations(reserved, 2):
        shared = reserved[first] & reserved[second]
        if shared or "all" in reserved[first] | reserved[second]:
            problems.append(f"{first} and {second} share GPUs {sorted(shared) or ['all']}")
    return problems


def stop_grace_problems(compose: Mapping) -> Problems:
    problems = []
    for name in GPU_SERVICES:
        period = str(compose["services"].get(name, {}).get("stop_grace_period") or "")
        if not re.fullmatch(r"(?=\d)(\d+h)?(\d+m)?(\d+s)?", period):
            problems.append(
                f"{name} has no valid stop_grace_period ({period!r}): Docker kills it 10 s after SIGTERM"
            )
    return problems


def redis_problems(compose: Mapping) -> Problems:
    service = compose["services"].get("redis", {})
    args = command_args(service)
    options = {arg[2:]: args[index + 1] for index, arg in enumerate(args[:-1]) if arg.startswith("--")}
    problems = [
        f"redis runs with {option} {options.get(option)!r}, needs {expected!r}"
        for option, expected in REDIS_OPTIONS.items()
        if options.get(option) != expected
    ]
    if _named_volume_at(compose, service, "/data") is None:
        problems.append("redis keeps /data on no named volume")
    return problems


def label_studio_problems(compose: Mapping) -> Problems:
    service = compose["services"].get("label-studio", {})
    environment = service_environment(service)
    problems = []
    if service.get("image") != LABEL_STUDIO_IMAGE:
        problems.append(f"label-studio image is not {LABEL_STUDIO_IMAGE}")
    problems += [
        f"label-studio has {name}={environment.get(name)!r}, needs {expected!r}"
        for name, expected in LABEL_STUDIO_ENVIRONMENT.items()
        if environment.get(name) != expected
    ]
    problems += [
        f"label-studio gets no {name}"
        for name in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN")
        if not environment.get(name)
    ]
    admin_token = environment.get("LABEL_STUDIO_USER_TOKEN")
    for name in ROI_SERVICES:
        if service_environment(compose["services"].get(name, {})).get("LABEL_STUDIO_API_KEY") != admin_token:
            problems.append(f"{name}'s LABEL_STUDIO_API_KEY is not the token Label Studio gives its admin")
    return problems


def backend_command_problems(compose: Mapping) -> Problems:
    args = command_args(compose["services"].get("backend", {}))
    timeout = option_value(args, "--timeout")
    problems = [] if args[:1] == ["gunicorn"] else ["backend does not run gunicorn"]
    if timeout is None or not timeout.isdigit() or int(timeout) <= LABEL_STUDIO_PREDICT_TIMEOUT_S:
        problems.append(
            f"gunicorn --timeout {timeout} does not outlast Label Studio's {LABEL_STUDIO_PREDICT_TIMEOUT_S} s /predict"
        )
    if option_value(args, "--bind") != "0.0.0.0:9090":
        problems.append("gunicorn does not bind 0.0.0.0:9090")
    if args[-1:] != ["backend.app:create_app()"]:
        problems.append("gunicorn does not serve backend.app:create_app()")
    return problems


# --- Dockerfiles -------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; comment lines dropped, as Docker does."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        keyword, _, arguments = line.strip().partition(" ")
        if keyword:
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def copy_sources(text: str) -> list[str]:
    """What COPY and ADD take from the build context (not from another stage)."""
    sources = []
    for keyword, arguments in dockerfile_instructions(text):
        if keyword in ("COPY", "ADD") and "--from=" not in arguments:
            args = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
            args = [arg for arg in args if not arg.startswith("--")]
            sources += [arg.rstrip("/") for arg in args[:-1]]
    return sources


_PIP_OPTIONS_WITH_VALUE = frozenset(
    {"--wheel-dir", "-w", "--find-links", "-f", "--constraint", "-c", "-r", "--requirement"}
)


def pip_requirements(text: str) -> list[str]:
    """The arguments of every `pip install` and `pip wheel` in RUN instructions, options left out."""
    requirements = []
    for keyword, arguments in dockerfile_instructions(text):
        if keyword == "RUN":
            for match in re.finditer(r"\bpip\s+(?:install|wheel)\b([^&;|]*)", arguments):
                args = shlex.split(match[1])
                values = {index + 1 for index, arg in enumerate(args) if arg in _PIP_OPTIONS_WITH_VALUE}
                requirements += [
                    arg for index, arg in enumerate(args) if not arg.startswith("-") and index not in values
                ]
    return requirements


_PROJECT = re.compile(r"(?:\.|roi-label|roi_label)(?:\[(?P<extras>[^\]]*)\])?")


def project_extras(text: str) -> list[set[str]]:
    """The extras of each `pip install`/`pip wheel` of the project in a Dockerfile."""
    matches = [match for requirement in pip_requirements(text) if (match := _PROJECT.fullmatch(requirement))]
    return [
        {extra.strip() for extra in (match["extras"] or "").split(",") if extra.strip()} for match in matches
    ]


def backend_image_problems(text: str) -> Problems:
    installs = project_extras(text)
    problems = [] if installs else ["the backend image does not install the project"]
    if any("model" in extras for extras in installs):
        problems.append("the backend image installs the model extra (torch)")
    torch = [requirement for requirement in pip_requirements(text) if re.match(r"torch\b", requirement)]
    return problems + [f"the backend image installs {requirement}" for requirement in torch]


def gpu_image_problems(text: str) -> Problems:
    installs = project_extras(text)
    if installs and all("model" in extras for extras in installs):
        return []
    return ["the GPU image does not install the project with the model extra at every step"]


def uncopied_packages(text: str, pyproject: Mapping) -> Problems:
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.split(".")[0].rstrip("*") for pattern in patterns}
    copied = set(copy_sources(text))
    return [f"the Dockerfile does not copy the package {package}" for package in sorted(packages - copied)]


def dockerignore_problems(sources: Iterable[str], dockerignore: str) -> Problems:
    """Sources the .dockerignore keeps out of the build context (the last matching rule wins; enough for
    top-level names, not all of Docker's pattern rules)."""
    rules = [line.strip() for line in dockerignore.splitlines() if line.strip() and not line.startswith("#")]
    problems = []
    for source in sources:
        excluded = False
        for rule in rules:
            pattern = rule.removeprefix("!").strip("/")
            if fnmatch(source, pattern) or source.startswith(pattern + "/"):
                excluded = not rule.startswith("!")
        if excluded:
            problems.append(f".dockerignore keeps {source} out of the build context")
    return problems


# --- The real files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return load_compose(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_entries() -> dict[str, EnvEntry]:
    return parse_env_example(ENV_EXAMPLE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict, env_entries: dict[str, EnvEntry]) -> dict:
    """docker-compose.yml as Docker Compose reads it, with .env copied from .env.example and filled in."""
    env = {name: entry.value for name, entry in env_entries.items() if entry.active}
    env |= {
        name: f"filled-in-{name.lower()}" for name in required_variables(raw_compose) if not env.get(name)
    }
    return interpolate(raw_compose, env)


@pytest.fixture(scope="module")
def settings_names() -> tuple[set[str], set[str]]:
    return settings_variables(SETTINGS_SOURCE.read_text())


def test_compose_file_follows_the_compose_specification(compose: dict) -> None:
    schema = compose_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema_problems(compose, schema) == []


def test_every_service_builds_from_existing_files_or_runs_a_pinned_image(compose: dict) -> None:
    assert build_problems(compose, ROOT) == []


def test_every_compose_variable_is_documented_in_env_example(raw_compose: dict, env_entries: dict) -> None:
    assert undocumented(referenced_variables(raw_compose), env_entries) == []


def test_every_variable_settings_reads_is_documented_in_env_example(
    settings_names, env_entries: dict
) -> None:
    primary, fallbacks = settings_names
    assert "REDIS_URL" in primary, "the settings parser found none of the names DESIGN.md lists"
    assert undocumented(primary | fallbacks, env_entries) == []


def test_every_setting_reaches_the_backend_worker_and_trainer(compose: dict, settings_names) -> None:
    primary, _ = settings_names
    assert missing_settings(compose, primary, ROI_SERVICES) == []


def test_container_settings_are_the_code_defaults_but_for_this_stacks_addresses(compose: dict) -> None:
    for name in ROI_SERVICES:
        assert changed_settings(service_environment(compose["services"][name]), DEPLOYMENT_SPECIFIC) == [], (
            name
        )


def test_env_example_shows_the_code_defaults(env_entries: dict) -> None:
    shown = {name: entry.value for name, entry in env_entries.items() if name not in DEPLOYMENT_SPECIFIC}
    assert changed_settings(shown) == []


def test_secrets_are_required_and_not_shipped(raw_compose: dict, env_entries: dict) -> None:
    assert secret_problems(raw_compose, env_entries) == []


def test_worker_and_trainer_mount_the_same_model_volume(compose: dict) -> None:
    assert model_volume_problems(compose) == []


def test_every_service_has_a_healthcheck_and_dependencies_wait_for_health(compose: dict) -> None:
    assert healthcheck_problems(compose) == []
    assert dependency_problems(compose) == []
    for name in ROI_SERVICES:
        redis = (compose["services"][name].get("depends_on") or {}).get("redis") or {}
        assert redis.get("condition") == "service_healthy", f"{name} does not wait for a healthy redis"


def test_worker_and_trainer_each_reserve_their_own_nvidia_gpu(compose: dict) -> None:
    assert gpu_problems(compose) == []


def test_worker_and_trainer_finish_their_job_before_being_killed(compose: dict) -> None:
    assert stop_grace_problems(compose) == []


def test_backend_image_does_not_install_torch() -> None:
    assert backend_image_problems(BACKEND_DOCKERFILE.read_text()) == []


def test_gpu_image_installs_the_model_extra() -> None:
    assert gpu_image_problems(WORKER_DOCKERFILE.read_text()) == []


def test_images_get_every_package_through_the_dockerignore() -> None:
    pyproject = tomllib.loads(PYPROJECT.read_text())
    for dockerfile in (BACKEND_DOCKERFILE, WORKER_DOCKERFILE):
        text = dockerfile.read_text()
        assert uncopied_packages(text, pyproject) == [], dockerfile.name
        assert dockerignore_problems(copy_sources(text), DOCKERIGNORE.read_text()) == [], dockerfile.name


def test_redis_is_durable_and_never_evicts(compose: dict) -> None:
    assert redis_problems(compose) == []


def test_label_studio_connects_the_backend_and_makes_no_calls_home(compose: dict) -> None:
    assert label_studio_problems(compose) == []


def test_backend_runs_gunicorn_longer_than_label_studio_waits(compose: dict) -> None:
    assert backend_command_problems(compose) == []


# --- The checkers on broken examples -----------------------------------------------------------------

_COUNT_ONE_GPU = {
    "resources": {"reservations": {"devices": [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}
}
BROKEN_COMPOSE: dict = {
    "services": {
        "redis": {
            "image": "redis",
            "command": ["redis-server", "--appendonly", True, "--maxmemory-policy", "allkeys-lru"],
        },
        "label-studio": {
            "image": "heartexlabs/label-studio:latest",
            "environment": ["ML_BLOCK_LOCAL_IP=true", "LABEL_STUDIO_USER_TOKEN=abcdef"],
        },
        "backend": {
            "build": {"context": "no-such-directory"},
            "command": "gunicorn --timeout 30 --bind 127.0.0.1:9090 app:app",
            "environment": {"LABEL_STUDIO_API_KEY": "another"},
            "depends_on": {"cache": {"condition": "service_healthy"}},
            "healthcheck": {"test": ["CMD", "true"], "disable": True},
        },
        "worker": {
            "image": "roi-label-worker:1",
            "command": ["roi-worker", "--model-dir", "/models"],
            "volumes": ["models:/models"],
            "deploy": _COUNT_ONE_GPU,
        },
        "trainer": {
            "image": "roi-label-worker:1",
            "command": ["roi-worker", "--model-dir", "/models"],
            "volumes": ["checkpoints:/models"],
            "deploy": _COUNT_ONE_GPU,
            "depends_on": ["worker"],
            "stop_grace_period": "soon",
        },
    },
    "volumes": {"models": None, "checkpoints": None},
}
_SETTINGS_SOURCE = (
    'env.get("PLAIN"), os.getenv("VIA_OS"), os.environ["SUBSCRIPT"], get("NEW") or get("OLD") or "x"'
)
_PYPROJECT = {"tool": {"setuptools": {"packages": {"find": {"include": ["backend*", "worker*"]}}}}}

BROKEN_CASES: list[tuple[str, Callable[[], Problems], str]] = [
    (
        "unknown key",
        lambda: schema_problems({"services": {"web": {"image": "a:1", "restrat": "no"}}}, compose_schema()),
        "restrat",
    ),
    (
        "wrong type",
        lambda: schema_problems({"services": {"web": {"image": 5}}}, compose_schema()),
        "services/web/image",
    ),
    ("missing build context", lambda: build_problems(BROKEN_COMPOSE, ROOT), "backend: build context"),
    ("unpinned image", lambda: build_problems(BROKEN_COMPOSE, ROOT), "redis: image 'redis' is not pinned"),
    ("latest image", lambda: build_problems(BROKEN_COMPOSE, ROOT), "label-studio: image"),
    ("no description", lambda: undocumented(["FOO"], parse_env_example("FOO=1\n")), "FOO is not documented"),
    (
        "not listed",
        lambda: undocumented(["BAR"], parse_env_example("# Foo.\nFOO=1\n")),
        "BAR is not documented",
    ),
    (
        "setting not passed",
        lambda: missing_settings(BROKEN_COMPOSE, ["REDIS_URL"], ROI_SERVICES),
        "worker does not get REDIS_URL",
    ),
    (
        "other default",
        lambda: changed_settings({"ROI_INLINE_PREDICT_TASKS": "9"}),
        "inline_predict_tasks is 9",
    ),
    ("empty number", lambda: changed_settings({"ROI_MAX_NEW_TOKENS": ""}), "Settings.from_env fails"),
    (
        "secret optional",
        lambda: secret_problems({"x": "${LABEL_STUDIO_PASSWORD:-admin}"}, {}),
        "starts without LABEL_STUDIO_PASSWORD",
    ),
    (
        "secret shipped",
        lambda: secret_problems({"x": "${TOKEN:?}"}, parse_env_example("# The token.\nTOKEN=abc\n")),
        "empty, uncommented TOKEN=",
    ),
    ("model volumes differ", lambda: model_volume_problems(BROKEN_COMPOSE), "different model volumes"),
    (
        "no model dir",
        lambda: model_volume_problems({"services": {"worker": {}, "trainer": {}}}),
        "no --model-dir",
    ),
    ("no healthcheck", lambda: healthcheck_problems(BROKEN_COMPOSE), "redis has no healthcheck"),
    ("disabled healthcheck", lambda: healthcheck_problems(BROKEN_COMPOSE), "backend has no healthcheck"),
    ("unknown dependency", lambda: dependency_problems(BROKEN_COMPOSE), "depends on cache"),
    ("count 1 twice", lambda: gpu_problems(BROKEN_COMPOSE), "worker and trainer share GPUs ['0']"),
    (
        "no gpu",
        lambda: gpu_problems({"services": {"worker": {}, "trainer": {}}}),
        "worker reserves no NVIDIA GPU",
    ),
    (
        "no grace period",
        lambda: stop_grace_problems(BROKEN_COMPOSE),
        "worker has no valid stop_grace_period ('')",
    ),
    (
        "bad grace period",
        lambda: stop_grace_problems(BROKEN_COMPOSE),
        "trainer has no valid stop_grace_period ('soon')",
    ),
    ("redis boolean yes", lambda: redis_problems(BROKEN_COMPOSE), "appendonly 'True'"),
    ("redis eviction", lambda: redis_problems(BROKEN_COMPOSE), "maxmemory-policy 'allkeys-lru'"),
    ("redis volume", lambda: redis_problems(BROKEN_COMPOSE), "no named volume"),
    (
        "label studio image",
        lambda: label_studio_problems(BROKEN_COMPOSE),
        "image is not heartexlabs/label-studio:1.23.2",
    ),
    ("local ip blocked", lambda: label_studio_problems(BROKEN_COMPOSE), "ML_BLOCK_LOCAL_IP='true'"),
    ("sentry on", lambda: label_studio_problems(BROKEN_COMPOSE), "SENTRY_DSN=None"),
    ("token mismatch", lambda: label_studio_problems(BROKEN_COMPOSE), "backend's LABEL_STUDIO_API_KEY"),
    ("short timeout", lambda: backend_command_problems(BROKEN_COMPOSE), "--timeout 30"),
    ("loopback bind", lambda: backend_command_problems(BROKEN_COMPOSE), "does not bind"),
    ("model extra in backend", lambda: backend_image_problems('RUN pip install ".[model]"'), "model extra"),
    (
        "torch in backend",
        lambda: backend_image_problems("RUN pip install . && pip install torch==2.14.1"),
        "torch==2.14.1",
    ),
    (
        "project not installed",
        lambda: backend_image_problems("RUN pip install flask"),
        "does not install the project",
    ),
    ("no model extra", lambda: gpu_image_problems("RUN pip wheel --wheel-dir /wheels ."), "model extra"),
    (
        "model extra at one step",
        lambda: gpu_image_problems(
            "RUN pip wheel -w /w .\nRUN pip install --no-index -f /w 'roi-label[model]'"
        ),
        "model extra at every step",
    ),
    ("package not copied", lambda: uncopied_packages("COPY backend backend", _PYPROJECT), "package worker"),
    (
        "dockerignored",
        lambda: dockerignore_problems(["backend", "worker"], "*\n!backend\n"),
        "keeps worker out",
    ),
]


@pytest.mark.parametrize(
    ("checker", "expected"), [case[1:] for case in BROKEN_CASES], ids=[c[0] for c in BROKEN_CASES]
)
def test_checker_reports_a_broken_example(checker: Callable[[], Problems], expected: str) -> None:
    problems = checker()
    assert any(expected in problem for problem in problems), problems


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert (
        interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env) == "value d  d value $SET"
    )
    assert interpolate({"a": ["${SET:+alt}", "${EMPTY:+alt}", 1]}, env) == {"a": ["alt", "", 1]}
    with pytest.raises(InterpolationError, match="UNSET is required: set it"):
        interpolate("${UNSET:?set it}", env)
    with pytest.raises(InterpolationError, match="unsupported"):
        interpolate("${A:-${B}}", env)
    assert required_variables({"x": "${A:?} ${B?} ${C:-}"}) == {"A", "B"}


def test_settings_parser_tells_fallback_names_apart() -> None:
    primary, fallbacks = settings_variables(_SETTINGS_SOURCE)
    assert primary == {"PLAIN", "VIA_OS", "SUBSCRIPT", "NEW"}
    assert fallbacks == {"OLD"}


def test_compose_loader_refuses_keys_given_twice_but_allows_merge_overrides() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="depends_on"):
        load_compose("backend:\n  depends_on: [a]\n  image: x:1\n  depends_on: [b]\n")
    merged = load_compose("base: &base {image: 'x:1', init: true}\nworker:\n  <<: *base\n  init: false\n")
    assert merged["worker"] == {"image": "x:1", "init": False}


def test_env_example_parser_rejects_what_compose_would_misread() -> None:
    with pytest.raises(ValueError, match="second time"):
        parse_env_example("# A.\nA=1\n# A again.\n# A=2\n")
    with pytest.raises(ValueError, match="neither a comment"):
        parse_env_example("export A=1\n")
