"""The package version, in a module of its own so that modules that record it (the monitor's
meta) need not import the package root."""

__version__ = "0.1.0"
