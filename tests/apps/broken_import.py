"""A test app whose import fails, as a deploy with a typo would."""

raise ImportError("deliberately broken app module")
