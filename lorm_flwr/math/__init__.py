"""Pure closed forms on tensors: merges, folds, Gram algebra, continual metrics.

No Flower, no models of the package, no I/O: only torch (and the standard library).
"""
