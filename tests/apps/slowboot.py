"""A test app whose import hangs while ./hang-on-boot exists: a deploy whose workers never become
ready (a dependency waiting on a dead database, say), not one that fails outright."""

import os
import time

if os.path.exists("hang-on-boot"):
    time.sleep(3600)   # cooperative (the worker is monkey-patched): signals still get through

from reporting_ivr import handle  # noqa: E402,F401
