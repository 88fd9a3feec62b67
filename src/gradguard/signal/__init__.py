"""Signal propagation: will gradients explode or vanish, why, and the initialisation that
fixes it.

Modules, each importing only those above it:

* :mod:`~gradguard.signal.activations`: mean-field maths (moments, gains, variance map);
* :mod:`~gradguard.signal.modules`: what a module is (activation, norm, pass-through, layer);
* :mod:`~gradguard.signal.inputs`: example inputs as batches, isolated runs;
* :mod:`~gradguard.signal.tracing`: the tracer (records, provenance, residual branches);
* :mod:`~gradguard.signal.measure`: the probe's measurement (one forward/backward per batch);
* :mod:`~gradguard.signal.verdict`: the verdict rule;
* :mod:`~gradguard.signal.diagnosis`: causes and the recommendation;
* :mod:`~gradguard.signal.planner`: the per-layer initialisation rules;
* :mod:`~gradguard.signal.initialize`: :func:`~gradguard.signal.initialize.init_model`;
* :mod:`~gradguard.signal.probe`: :func:`~gradguard.signal.probe.probe`, the report and
  its ``fix``.

The ``gradguard probe`` command line lives in :mod:`gradguard.cli.probe`.

The public names are re-exported by :mod:`gradguard` (``gradguard.probe``,
``gradguard.init_model``, ...). Nothing is re-exported here: a package attribute ``probe``
would hide the submodule of the same name.
"""
