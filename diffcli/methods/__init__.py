"""Training methods of `diffprune train --method`; importing the package registers every one of them."""

from diffcli.methods import l0  # noqa: F401  (registers l0 first: the default leads every listing)
from diffcli.methods import fixed_masks  # noqa: F401,I001  (registers fisher, random, magnitude)
from diffcli.methods import swr  # noqa: F401,I001  (registers swr)
from diffcli.methods import basis  # noqa: F401,I001  (registers basis)
from diffcli.methods.registry import REGISTRY, SHARED_OPTIONS, TrainMethod, get_method, method_names, register

__all__ = ["REGISTRY", "SHARED_OPTIONS", "TrainMethod", "get_method", "method_names", "register"]
