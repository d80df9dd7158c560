"""toyfarm: batched toy-based CLs for pyhf workspaces.

The notebook API mirrors the CLI: ``toyfarm.generate``, ``toyfarm.cls``, ``toyfarm.limit``,
``toyfarm.combine`` (see ``toyfarm.api``). They load lazily: a worker importing ``toyfarm.task``
must be able to configure JAX before anything imports it.
"""

__version__ = "0.1.0"
__all__ = ["generate", "cls", "limit", "combine"]


def __getattr__(name: str):
    if name in __all__:
        from toyfarm import api

        return getattr(api, name)
    raise AttributeError(f"module 'toyfarm' has no attribute {name!r}")
