"""Per-project state in Redis: the /setup parameters and the annotation counters.

gunicorn runs several backend processes, so whatever one process learns from Label Studio (the extra params
of /setup, the annotation webhooks) is kept in Redis for all of them and for the workers:

* ``roi:project:<id>:setup``: JSON ``{"extra_params", "hostname", "updated_at"}`` from the last /setup.
  The access token of /setup is not stored (it is the project creator's legacy token; the workers use
  LABEL_STUDIO_API_KEY).
* ``roi:project:<id>:stats``: a hash of counters (`STAT_FIELDS`): annotation events, curated annotations,
  and the acceptance statistics, i.e. how many regions of the project's current annotations were proposals
  accepted unchanged (origin "prediction"), edited ("prediction-changed") or drawn by hand ("manual").
* ``roi:project:<id>:origins``: annotation id -> "accepted,edited,manual" as last seen, so that an updated
  annotation replaces its earlier contribution to the region counters and a deleted one removes it.

`ProjectParams` reads and checks Label Studio's "extra params" JSON: {"prompts": {...}, "controls": {...},
"train_every": N, "train": {"stage", "steps", "learning_rate", "replay_images"}}.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from backend.labeling import Prompts

PREFIX = "roi:project:"
EXTRA_PARAM_KEYS = ("prompts", "controls", "train_every", "train")
# The fine-tuning knobs a project may set ("train": {...}); the worker's defaults fill the rest.
TRAIN_STAGES = ("region", "projector", "lora", "full")
TRAIN_KEYS = {"stage": str, "steps": int, "learning_rate": float, "replay_images": int}

EVENT_FIELDS = ("annotations_created", "annotations_updated", "annotations_deleted")
REGION_FIELDS = ("regions_accepted", "regions_edited", "regions_manual")
STAT_FIELDS = (*EVENT_FIELDS, "curated", *REGION_FIELDS)


class RegionOrigins(NamedTuple):
    """How many regions of one annotation were accepted proposals, edited proposals, or drawn by hand."""

    accepted: int = 0
    edited: int = 0
    manual: int = 0


@dataclass(frozen=True)
class ProjectParams:
    """A project's extra params, checked; `extra` is the JSON object as Label Studio sent it."""

    extra: dict[str, Any] = field(default_factory=dict)
    prompts: Prompts = field(default_factory=Prompts)
    train_every: int | None = None  # None: use the backend's default (settings.train_every_annotations)
    train: dict[str, Any] = field(default_factory=dict)  # fine-tuning overrides, checked

    @property
    def controls(self) -> dict[str, str]:
        return dict(self.extra.get("controls") or {})

    @classmethod
    def from_extra_params(cls, extra: Any) -> ProjectParams:
        """Check Label Studio's extra params (null, a JSON object, or a string holding one).

        Raises ValueError naming the problem. The "controls" names are checked against the label config
        by backend.labeling.scheme_from_config.
        """
        if extra is None or extra == "":
            return cls()
        if isinstance(extra, str):
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError as exc:
                raise ValueError(f"extra_params is not valid JSON: {exc}") from None
        if not isinstance(extra, Mapping):
            raise ValueError(f"extra_params must be a JSON object, got {type(extra).__name__}")
        unknown = sorted(set(extra) - set(EXTRA_PARAM_KEYS))
        if unknown:
            raise ValueError(f"extra_params has unknown keys {unknown}; known keys: {list(EXTRA_PARAM_KEYS)}")
        train_every = extra.get("train_every")
        if train_every is not None and (
            isinstance(train_every, bool) or not isinstance(train_every, int) or train_every < 0
        ):
            raise ValueError(
                f"extra_params 'train_every' must be a whole number >= 0 (0 turns it off), got {train_every!r}"
            )
        return cls(
            extra=dict(extra),
            prompts=Prompts.from_extra_params(extra),
            train_every=train_every,
            train=_checked_train(extra.get("train")),
        )


def _checked_train(train: Any) -> dict[str, Any]:
    if train is None:
        return {}
    if not isinstance(train, Mapping):
        raise ValueError(f"extra_params 'train' must be a JSON object, got {type(train).__name__}")
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise ValueError(f"extra_params 'train' has unknown keys {unknown}; known keys: {list(TRAIN_KEYS)}")
    for key, kind in TRAIN_KEYS.items():
        value = train.get(key)
        if value is None:
            continue
        number = kind in (int, float) and isinstance(value, int | float) and not isinstance(value, bool)
        if not (isinstance(value, kind) or (kind is float and number)) or (number and value <= 0):
            raise ValueError(f"extra_params 'train.{key}' must be a positive {kind.__name__}, got {value!r}")
    if train.get("stage") is not None and train["stage"] not in TRAIN_STAGES:
        raise ValueError(
            f"extra_params 'train.stage' must be one of {list(TRAIN_STAGES)}, got {train['stage']!r}"
        )
    return dict(train)


def parse_project_id(value: Any) -> int:
    """Label Studio's project reference as an id: "<id>.<created_at>" in /setup and /predict, an int in webhooks."""
    text = str(value).split(".", 1)[0] if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"project must be a project id or '<id>.<created_at>', got {value!r}")
    return int(text)


def _key(project_id: int, part: str) -> str:
    return f"{PREFIX}{project_id}:{part}"


def save_setup(connection: redis.Redis, project_id: int, params: ProjectParams, hostname: str | None) -> None:
    record = {"extra_params": params.extra, "hostname": hostname, "updated_at": time.time()}
    connection.set(_key(project_id, "setup"), json.dumps(record))


def known_projects(connection: redis.Redis) -> list[int]:
    """The projects that ran /setup, i.e. every project connected to this backend."""
    keys = connection.scan_iter(match=f"{PREFIX}*:setup", count=500)
    return sorted(int(key.decode().removeprefix(PREFIX).split(":")[0]) for key in keys)


def load_params(connection: redis.Redis, project_id: int) -> ProjectParams:
    """The params of the project's last /setup; the defaults when there was none."""
    value = connection.get(_key(project_id, "setup"))
    if value is None:
        return ProjectParams()
    return ProjectParams.from_extra_params(json.loads(value).get("extra_params"))


# Replaces the annotation's earlier region counts by the new ones, counts the event, and counts it as
# curated when asked; returns the project's curated total (0 when not curated). Atomic across processes.
_RECORD = """
local stats, origins = KEYS[1], KEYS[2]
local annotation, event, curated = ARGV[1], ARGV[2], ARGV[3]
local new = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local old = {0, 0, 0}
local previous = redis.call('HGET', origins, annotation)
if previous then
  local i = 1
  for count in string.gmatch(previous, '[^,]+') do old[i] = tonumber(count); i = i + 1 end
end
local fields = {'regions_accepted', 'regions_edited', 'regions_manual'}
for i = 1, 3 do
  if new[i] ~= old[i] then redis.call('HINCRBY', stats, fields[i], new[i] - old[i]) end
end
redis.call('HSET', origins, annotation, ARGV[4] .. ',' .. ARGV[5] .. ',' .. ARGV[6])
redis.call('HINCRBY', stats, event, 1)
if curated == '1' then return redis.call('HINCRBY', stats, 'curated', 1) end
return 0
"""

# Removes deleted annotations' region counts and counts the deletions.
_FORGET = """
local stats, origins = KEYS[1], KEYS[2]
local fields = {'regions_accepted', 'regions_edited', 'regions_manual'}
for _, annotation in ipairs(ARGV) do
  local previous = redis.call('HGET', origins, annotation)
  if previous then
    local i = 1
    for count in string.gmatch(previous, '[^,]+') do
      local n = tonumber(count)
      if n ~= 0 then redis.call('HINCRBY', stats, fields[i], -n) end
      i = i + 1
    end
    redis.call('HDEL', origins, annotation)
  end
end
return redis.call('HINCRBY', stats, 'annotations_deleted', #ARGV)
"""


def record_annotation(
    connection: redis.Redis,
    project_id: int,
    annotation_id: int,
    *,
    updated: bool,
    curated: bool,
    origins: RegionOrigins,
) -> int:
    """Count a created or updated annotation; returns the project's curated total when `curated`, else 0."""
    script = connection.register_script(_RECORD)
    event = "annotations_updated" if updated else "annotations_created"
    return int(
        script(
            keys=[_key(project_id, "stats"), _key(project_id, "origins")],
            args=[annotation_id, event, "1" if curated else "0", *origins],
        )
    )


def forget_annotations(connection: redis.Redis, project_id: int, annotation_ids: Iterable[int]) -> None:
    ids = list(annotation_ids)
    if ids:
        script = connection.register_script(_FORGET)
        script(keys=[_key(project_id, "stats"), _key(project_id, "origins")], args=ids)


def project_stats(connection: redis.Redis, project_id: int) -> dict[str, int]:
    """Every counter of `STAT_FIELDS` (0 when never counted) plus "annotations", the current annotations seen."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(_key(project_id, "stats"))
        pipe.hlen(_key(project_id, "origins"))
        counters, annotations = pipe.execute()
    values = {key.decode(): int(value) for key, value in counters.items()}
    return {**{name: values.get(name, 0) for name in STAT_FIELDS}, "annotations": annotations}
