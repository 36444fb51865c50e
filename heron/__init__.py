"""heron: an OpenAI-compatible LLM inference server and offline engine.

    from heron import LLM, SamplingParams
    llm = LLM()  # the embedded default model, Gemma 3 270M
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from heron.pooling_params import PoolingParams
from heron.sampling_params import SamplingParams

if TYPE_CHECKING:
    from heron.llm import LLM
    from heron.outputs import CompletionOutput, EmbeddingRequestOutput, RequestOutput

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "PoolingParams", "RequestOutput", "CompletionOutput",
           "EmbeddingRequestOutput", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy: `import heron` stays light for the server's API process and the CLI.
    if name == "LLM":
        from heron.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput", "EmbeddingRequestOutput"):
        from heron import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'heron' has no attribute {name!r}")
