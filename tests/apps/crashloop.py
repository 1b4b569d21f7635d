"""A test app whose import fails while ./crash-on-boot exists: a bad deploy in the middle of the
day, after the gateway started fine (the pre-flight check passed)."""

import os

if os.path.exists("crash-on-boot"):
    raise RuntimeError("deliberate boot failure (crash-on-boot exists)")

from reporting_ivr import handle  # noqa: E402,F401
