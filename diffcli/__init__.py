"""diffprune: parameter-efficient transfer learning with diff pruning (Guo, Rush & Kim, 2021)."""

__version__ = "0.1.0"

__all__ = ["DiffPruner", "DiffPruningCallback"]


def __getattr__(name: str):
    """The public training API, imported on first use (so that `diffprune --help` stays fast)."""
    if name == "DiffPruner":
        from diffcli.api import DiffPruner

        return DiffPruner
    if name == "DiffPruningCallback":
        from diffcli.callback import DiffPruningCallback

        return DiffPruningCallback
    raise AttributeError(f"module 'diffcli' has no attribute {name!r}")
