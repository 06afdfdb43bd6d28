"""The conformance suite over the model space (issue 19): generated CNNs × bit specs × storages."""
