"""toyfarm: batched toy-based CLs for pyhf workspaces."""

__version__ = "0.1.0"
