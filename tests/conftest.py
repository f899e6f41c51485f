"""Hypothesis profiles: ``ci`` (set HYPOTHESIS_PROFILE=ci, as .ci/run does) replays a fixed set of
examples so that a submission's result does not depend on the draw; locally the default profile
keeps exploring new examples."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
