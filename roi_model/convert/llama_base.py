"""Is --base the LLaMA-1 7B that GPT4RoI's delta is relative to?

The delta holds target - base, so a different base merges without complaint and gives a broken model
(LLaMA-2 has the same shapes; GPT4RoI issue #45). Shapes are checked tensor by tensor elsewhere; here:

- the base's config.json must agree with the delta's on the fields both state that set the numerics
  (LLaMA-2's conversions say rms_norm_eps 1e-5 and 4096 positions where LLaMA-1's say 1e-6 and 2048);
- the weight files are compared with the published sha256 of the standard conversion of LLaMA-1 7B
  (transformers' convert_llama_weights_to_hf.py, two pickled shards; the same list appears in
  Chinese-LLaMA-Alpaca's SHA256.md and in PygmalionAI's model documentation). Other conversions of the
  same weights (safetensors, other shard counts, other torch versions) have other bytes: then the
  weights cannot be verified, and the report says so. A statistic of the merged tensors cannot tell
  instead: each is delta + base, so it follows whichever base is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from tqdm import tqdm

from .checkpoint_files import CheckpointError, CheckpointReader

logger = logging.getLogger(__name__)

LLAMA1_7B_SHA256 = {
    "pytorch_model-00001-of-00002.bin": "0087155d6df07106c1d910bfeb6aab1be8e612dfbf2b56ddfb4ccbde7dbd50d0",
    "pytorch_model-00002-of-00002.bin": "461bc5e50200db7813ff99cc0b9316c48ccbd6aaaa31bf8cf7bee0b64bc3eda3",
}
# Fields of a LLaMA config.json that change the numbers a base produces, and that LLaMA-1 and LLaMA-2 differ in.
NUMERIC_FIELDS = ("rms_norm_eps", "max_position_embeddings", "rope_theta", "hidden_act")
HASH_BLOCK = 1 << 24


def check_base(base: CheckpointReader, delta_config: dict) -> dict:
    """Raise CheckpointError when the base's config contradicts the delta's; return what was verified."""
    return {"config": _check_config(base.directory, delta_config), "weights": _check_checksums(base)}


def _check_config(directory: Path, delta_config: dict) -> str:
    path = directory / "config.json"
    if not path.exists():
        logger.warning("--base %s has no config.json: its LLaMA version cannot be checked", directory)
        return "not checked: --base has no config.json"
    base_config = json.loads(path.read_text())
    compared = [field for field in NUMERIC_FIELDS if field in base_config and field in delta_config]
    for field in compared:
        ours, theirs = base_config[field], delta_config[field]
        same = math.isclose(ours, theirs, rel_tol=1e-9) if isinstance(ours, float | int) else ours == theirs
        if not same:
            raise CheckpointError(
                f"--base config.json says {field} {ours!r}, the delta's {theirs!r}: --base is not the LLaMA-1 7B "
                "the delta is relative to (LLaMA-2 says rms_norm_eps 1e-05 and 4096 positions)"
            )
    return (
        f"agrees with the delta's config.json on {', '.join(compared)}" if compared else "no field to compare"
    )


def _check_checksums(base: CheckpointReader) -> str:
    files = sorted({path.name for path in base.file_of.values()})
    if files != sorted(LLAMA1_7B_SHA256):
        message = (
            f"not verified: the weights are in {', '.join(files)}, not in the two shards of the standard "
            "conversion whose sha256 is known; only shapes and config were checked"
        )
        logger.warning("--base %s", message)
        return message
    for name in files:
        digest = _sha256(base.directory / name)
        if digest != LLAMA1_7B_SHA256[name]:
            message = (
                f"not verified: {name} has sha256 {digest}, not the standard conversion's "
                f"{LLAMA1_7B_SHA256[name]} (another conversion of the same weights also differs); "
                "only shapes and config were checked"
            )
            logger.warning("--base %s", message)
            return message
    return "verified: the sha256 of both shards is the standard conversion of LLaMA-1 7B"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with (
        path.open("rb") as file,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", leave=False
        ) as progress,
    ):
        while block := file.read(HASH_BLOCK):
            digest.update(block)
            progress.update(len(block))
    return digest.hexdigest()
