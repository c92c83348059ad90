"""Training methods of `diffprune train --method`: `registry.CATALOG` names each one and the module that registers
it; a method's module is imported when it is first asked for (`get_method`), every one by `all_methods()`."""

from diffcli.methods.registry import (CATALOG, REGISTRY, SHARED_OPTIONS, TrainMethod, all_methods, get_method,
                                      method_names, register)

__all__ = ["CATALOG", "REGISTRY", "SHARED_OPTIONS", "TrainMethod", "all_methods", "get_method", "method_names",
           "register"]
