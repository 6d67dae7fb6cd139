# Fixtures live in sandbox_env.py and testbed_env.py (unique module names: test modules import their helpers too).
from sandbox_env import make_env, sandbox_hosts  # noqa: F401
from testbed_env import testbed_hosts  # noqa: F401
from swarm_env import swarm_cluster  # noqa: F401
