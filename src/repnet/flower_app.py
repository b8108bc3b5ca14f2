"""The Flower app's components under the names Flower apps already use: ``repnet.flower_app:server_app``
and ``repnet.flower_app:client_app`` (an app folder's ``pyproject.toml`` names them).

The apps live in :mod:`repnet.federated.app`; this module only keeps the names that apps written
before the federated package existed refer to, so they keep working. It sits on the command line's
floor because it is an entry point, like ``cli``.
"""
from repnet.federated.app import client_app, server_app

__all__ = ["server_app", "client_app"]
