"""healthdeploy: deploy, verify and back up the Smart Chronic Disease Management System over SSH.

Layout of the library:
- ``settings``: env files -> one frozen, typed ``Settings`` object.
- ``commands``: pure command builders (config in, ``Command`` out, never executed).
- ``ssh``: the only module that opens SSH connections and runs commands remotely.
- ``local``: the only module that runs commands on the operator's machine.
- ``sandbox``/``images``: the local sandbox host and the offline images it needs.
"""

__version__ = "0.1.0"
