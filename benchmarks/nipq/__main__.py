"""``python -m benchmarks.nipq``: run the NIPQ benchmark (:func:`benchmarks.nipq.run.main`)."""

import sys

from .run import main

sys.exit(main())
