"""``python -m benchmarks.conformance``: run the conformance suite (:func:`benchmarks.conformance.run.main`)."""

import sys

from .run import main

sys.exit(main())
