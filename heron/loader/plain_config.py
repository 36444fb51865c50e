"""A model config as plain attributes: what heron reads of a transformers config, without transformers.

Importing transformers costs 1-2 s (and its ``AutoConfig`` pulls in torch). The engine's model
classes and the API's tokenizer only read attributes of their config, so a GGUF file's cache
entry keeps a snapshot of every attribute of its transformers config (``snapshot``) and later
starts read that (``PlainConfig``) instead of building the config again.
"""

from __future__ import annotations

import json
import logging
import warnings
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeAlias

    from transformers import PretrainedConfig

    # What code that only reads a model config's attributes takes: the real one or its snapshot.
    AnyModelConfig: TypeAlias = "PretrainedConfig | PlainConfig"


# Marks a nested config in a snapshot (MPT's ``attn_config``, an ``MptAttentionConfig``).
_NESTED = "__plain_config__"


class PlainConfig(SimpleNamespace):
    """A transformers config's attributes (see ``snapshot``); the text config of itself."""

    @classmethod
    def from_snapshot(cls, values: dict[str, Any]) -> PlainConfig:
        """The config of a ``snapshot``, nested configs as ``PlainConfig`` too."""
        return cls(**{name: _unnested(value) for name, value in values.items()})

    def get_text_config(self, *args: object, **kwargs: object) -> PlainConfig:
        return self


def _unnested(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {_NESTED}:
        return PlainConfig.from_snapshot(value[_NESTED])
    return value


def snapshot(config: object) -> dict[str, Any] | None:
    """Every attribute of ``config`` whose value is JSON (fields, properties, ``attribute_map``
    aliases; tuples become lists) or a nested config (its own snapshot, marked); None for
    configs with a separate text config (multimodal)."""
    get_text_config = getattr(config, "get_text_config", None)
    if get_text_config is not None and get_text_config() is not config:
        return None
    names = [n for n in dir(config) if not n.startswith("__")]
    names += list(getattr(config, "attribute_map", None) or {})
    values = {}
    quiet = logging.getLogger("transformers")  # deprecated aliases (torch_dtype) log a warning
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in names:
                value = _json_value(config, name)
                if value is not _SKIP:
                    values[name] = value
    finally:
        quiet.setLevel(level)
    return values


_SKIP = object()


def _json_value(config: object, name: str) -> Any:
    try:
        value = getattr(config, name)
        if callable(value):
            return _SKIP
        if callable(getattr(value, "to_dict", None)) and hasattr(value, "get_text_config"):
            nested = snapshot(value)  # a config within the config
            return _SKIP if nested is None else {_NESTED: nested}
        json.dumps(value)
        return value
    except Exception:  # noqa: BLE001 - a property that does not apply, a value not JSON
        return _SKIP
