"""An OpenAI-compatible HTTP server over a workdir's model (see docs/sampling.md).

    python -m tinystories_jax.serve --workdir=runs/quickstart --port=8000
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="quickstart", prompt="Once upon a time")
"""

from tinystories_jax.serving.app import create_app
from tinystories_jax.serving.engine import Engine
from tinystories_jax.serving.protocol import APIError, Limits
from tinystories_jax.serving.server import ServeOptions, serve

__all__ = ["APIError", "Engine", "Limits", "ServeOptions", "create_app", "serve"]
