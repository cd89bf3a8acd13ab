"""The application layer: the ``tiltsample`` command line (:mod:`~tiltsample.app.cli`), the demo,
``compare`` and the resumable run store.

It imports the library (core, samplers, targets, theory) and is never imported by it: a sampler or a
bound check never depends on how a run is driven or stored.
"""
