# Repository root marker for pytest (rootdir); tests import shared helpers from tests/.
