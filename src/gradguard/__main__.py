"""``python -m gradguard``: the ``gradguard`` command line (:func:`gradguard.cli.main`)."""

import sys

from gradguard.cli import main

sys.exit(main())
