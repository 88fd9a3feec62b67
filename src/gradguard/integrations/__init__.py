"""One-line integrations of the Guard with training frameworks.

Each framework has its own module, imported on its own so that ``import gradguard``
needs only torch:

* :mod:`gradguard.integrations.lightning` -- ``GuardCallback`` for PyTorch Lightning
  (``pip install "gradguard[lightning]"``);
* :mod:`gradguard.integrations.transformers` -- ``GuardCallback`` for the Hugging Face
  ``Trainer`` (``pip install "gradguard[transformers]"``).

:mod:`gradguard.integrations.common` holds what both share: argument checks and the
metrics written into the framework's logs (``gradguard/...`` keys).

This package imports neither framework; a module whose framework is missing raises an
``ImportError`` naming the extra to install.
"""

__all__: list[str] = []
