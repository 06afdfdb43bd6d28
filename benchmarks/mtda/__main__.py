"""``python -m benchmarks.mtda``: run the multi-target benchmark (:func:`benchmarks.mtda.run.main`)."""

import sys

from .run import main

sys.exit(main())
