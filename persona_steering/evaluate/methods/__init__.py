"""Evaluation methods, one module each; every module defines ``METHODS = [Method(...)]``.

``persona_steering.evaluate.core.registry()`` imports every module in this folder, so adding a
method means adding a file here and nothing else.
"""
