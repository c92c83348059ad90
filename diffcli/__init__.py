"""diffprune: parameter-efficient transfer learning with diff pruning (Guo, Rush & Kim, 2021)."""

__version__ = "0.1.0"
