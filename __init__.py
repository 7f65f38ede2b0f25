"""Kiln: a compiler-driven serving runtime that speaks SGLang's native HTTP API."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Engine pulls in torch and transformers; keep `import kiln` itself light.
    if name == "Engine":
        from kiln.engine import Engine

        return Engine
    raise AttributeError(name)
