"""The segmentation study (issue 23): merged mIoU of RTN/AdaRound/BRECQ/QDrop/HDRQ on digit scenes,
and the exported files' figures (integer kernels, per-pixel agreement, latency, sizes)."""
