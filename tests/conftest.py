import os

from hypothesis import settings

# The first call of each numba kernel compiles it, so no deadline; CI runs derandomised.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
