"""Sampling algorithms (installed as ``tiltsample.samplers``).

One module per algorithm family, each with the sampler shape of :mod:`tiltsample.sampler`. Modules
load on first use through the registry (:mod:`tiltsample.registry`); none imports a concrete target.
"""
