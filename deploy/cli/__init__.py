from deploy.cli.old import *  # noqa: F401,F403  (temporary during the restructure)
from deploy.cli.old import _with_deadline, _read_json  # noqa: F401
