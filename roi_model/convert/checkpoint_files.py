"""Checkpoint files on disk, read and written one tensor at a time.

Reading takes any Hugging Face layout: one `model.safetensors` or `pytorch_model.bin`, or the
shards listed by `model.safetensors.index.json` / `pytorch_model.bin.index.json`. Safetensors are
read per tensor; pickled `.bin` shards are memory-mapped, so a 10 GB shard costs address space, not
RAM. Writing produces safetensors shards of bounded size and their index, the layout
`from_pretrained` loads; only one output shard is ever held in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: a missing file, an unknown tensor, a wrong shape."""


class CheckpointReader:
    """The tensors of one model directory, by name, loaded only when asked for."""

    def __init__(self, directory: str | Path, role: str):
        """`role` names the directory in error messages (e.g. "--delta")."""
        self.directory = Path(directory)
        self.role = role
        if not self.directory.is_dir():
            raise CheckpointError(f"{role} {self.directory} is not a directory")
        self._safetensors: dict[Path, object] = {}
        self._pickled_path: Path | None = None
        self._pickled: dict[str, torch.Tensor] = {}
        self.file_of: dict[str, Path] = self._index()

    def _index(self) -> dict[str, Path]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.directory / index_name
            if index_path.exists():
                weight_map = json.loads(index_path.read_text()).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise CheckpointError(f"{index_path} has no weight_map")
                files = {name: self.directory / file for name, file in weight_map.items()}
                for path in sorted(set(files.values())):
                    if not path.exists():
                        raise CheckpointError(f"{self.role}: {path.name}, listed in {index_path}, is missing")
                return files
        for single_name in (SAFETENSORS_FILE, BIN_FILE):
            path = self.directory / single_name
            if path.exists():
                return dict.fromkeys(self._names_in(path), path)
        raise CheckpointError(
            f"{self.role} {self.directory} holds no weights: expected {SAFETENSORS_FILE}, {BIN_FILE} "
            f"or a sharded index ({SAFETENSORS_INDEX}, {BIN_INDEX})"
        )

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._open_safetensors(path).keys())
        return list(self._load_pickled(path))

    def names(self) -> list[str]:
        """Every tensor name, grouped by file so that reading them in this order visits each file once."""
        return sorted(self.file_of, key=lambda name: (str(self.file_of[name]), name))

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._path(name)
        if path.suffix == ".safetensors":
            return tuple(self._open_safetensors(path).get_slice(name).get_shape())
        return tuple(self._pickled_tensor(path, name).shape)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as stored, or cast to `dtype`."""
        path = self._path(name)
        if path.suffix == ".safetensors":
            tensor = self._open_safetensors(path).get_tensor(name)
        else:
            tensor = self._pickled_tensor(path, name)
        return tensor if dtype is None else tensor.to(dtype)

    def _pickled_tensor(self, path: Path, name: str) -> torch.Tensor:
        try:
            return self._load_pickled(path)[name]
        except KeyError:
            raise CheckpointError(f"{self.role}: {path.name} lacks {name!r}, which its index lists") from None

    def _path(self, name: str) -> Path:
        try:
            return self.file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.role} {self.directory} has no tensor {name!r}") from None

    def _open_safetensors(self, path: Path):
        if path not in self._safetensors:
            self._safetensors[path] = safe_open(path, framework="pt")
        return self._safetensors[path]

    def _load_pickled(self, path: Path) -> dict[str, torch.Tensor]:
        # One pickled shard at a time: memory-mapped it is nearly free, loaded eagerly it is not.
        if self._pickled_path != path:
            self._pickled = {}  # release the previous shard before loading the next
            self._pickled = _load_pickled_shard(path)
            self._pickled_path = path
        return self._pickled


def _load_pickled_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise CheckpointError(f"cannot read {path}: {error}") from error
        # Files written before torch 1.6's zip format cannot be mapped: read this one shard whole.
        logger.warning("%s is in the legacy torch format; loading it into memory", path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: its name, shape and dtype known before `load` produces it.

    `origin` says where it comes from, for error messages (e.g. "--delta model.norm.weight").
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    origin: str

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class WrittenWeights:
    files: list[str]
    total_bytes: int
    peak_buffered_bytes: int  # the most tensor bytes held at once while writing


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [shard for shard in shards if shard]


def write_safetensors_shards(
    directory: Path, tensors: Sequence[PlannedTensor], max_shard_bytes: int
) -> WrittenWeights:
    """Write `tensors` as `model.safetensors`, or as numbered shards with `model.safetensors.index.json`."""
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [SAFETENSORS_FILE]
    else:
        names = [
            f"model-{number:05d}-of-{len(shards):05d}.safetensors" for number in range(1, len(shards) + 1)
        ]
    weight_map, total, peak = {}, 0, 0
    for file_name, shard in zip(names, shards, strict=True):
        buffered: dict[str, torch.Tensor] = {}
        buffered_bytes = 0
        for planned in shard:
            tensor = planned.load()
            if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
                raise CheckpointError(
                    f"{planned.name}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {planned.shape} {planned.dtype}"
                )
            buffered[planned.name] = tensor.contiguous()
            buffered_bytes += planned.nbytes
            peak = max(peak, buffered_bytes)
            weight_map[planned.name] = file_name
        save_file(buffered, directory / file_name, metadata={"format": "pt"})
        total += buffered_bytes
        logger.info("wrote %s (%d tensors, %.1f MB)", file_name, len(buffered), buffered_bytes / 1e6)
        del buffered
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return WrittenWeights(files=names, total_bytes=total, peak_buffered_bytes=peak)
