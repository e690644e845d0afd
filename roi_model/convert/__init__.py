"""Model directories from weights made elsewhere: GPT4RoI's released delta, or any vision model + LM.

- `convert_gpt4roi`: GPT4RoI-7B (delta over LLaMA-1 7B, plus the CLIP tower) into our layout.
- `init_from_base`: a new region-LLM from a local CLIP/SigLIP model and a local causal LM.

Both stream tensor by tensor and refuse, naming the tensor, anything that does not fit the model.
"""

from .checkpoint_files import CheckpointError
from .gpt4roi import convert_gpt4roi
from .init_from_base import init_from_base

__all__ = ["CheckpointError", "convert_gpt4roi", "init_from_base"]
