# Fixtures live in sandbox_env.py (a unique module name: test modules import its helpers too).
from sandbox_env import make_env, sandbox_hosts  # noqa: F401
