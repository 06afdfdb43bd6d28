"""``python -m benchmarks.segmentation``: the merged-mIoU study (:func:`benchmarks.segmentation.study.main`)."""

import sys

from .study import main

sys.exit(main())
