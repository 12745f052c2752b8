"""Test session set-up: caches the library writes by default go to a temporary folder, not ~/.cache."""

from __future__ import annotations

import os
import tempfile

os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="preftune-test-cache-")
