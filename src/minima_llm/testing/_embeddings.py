"""Deterministic embeddings: each vector is derived from a hash of its input text."""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import Any

from ._replies import RequestError, dumps, load_object

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096


def embed(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """A unit-length vector that depends only on ``text`` and ``dimensions``."""
    digest = hashlib.shake_256(text.encode()).digest(4 * dimensions)
    raw = [value / 2_147_483_648.0 - 1.0 for value in struct.unpack(f"<{dimensions}I", digest)]
    # Guard the (astronomically unlikely) all-zero vector so normalising never divides by 0.
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def render_embeddings(raw: bytes, default_model: str) -> bytes:
    """The response body for a ``/embeddings`` request."""
    payload = load_object(raw)
    texts = _inputs(payload.get("input"))
    dimensions = _dimensions(payload.get("dimensions"))
    encoding = payload.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    data = []
    for index, text in enumerate(texts):
        vector = embed(text, dimensions)
        # openai-python asks for base64 by default and decodes little-endian float32.
        value: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if encoding == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": value})
    model = payload.get("model")
    tokens = sum(len(text.split()) for text in texts)
    return dumps(
        {
            "object": "list",
            "data": data,
            "model": model if isinstance(model, str) and model else default_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _inputs(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        # Token-id inputs are hashed through their decimal spelling.
        if all(isinstance(item, int) for item in value):
            return [" ".join(map(str, value))]
        if all(isinstance(item, list) for item in value):
            return [" ".join(map(str, item)) for item in value]
    raise RequestError("'input' must be a string, an array of strings or token arrays", "input")


def _dimensions(value: object) -> int:
    if value is None:
        return DEFAULT_DIMENSIONS
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIMENSIONS:
        raise RequestError(
            f"'dimensions' must be an integer between 1 and {MAX_DIMENSIONS}", "dimensions"
        )
    return value
