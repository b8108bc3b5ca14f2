"""The Flower app's components under the names Flower apps already use: ``repnet.flower_app:server_app``
and ``repnet.flower_app:client_app`` (an app folder's ``pyproject.toml`` names them). The apps live in
:mod:`repnet.federated.app`."""
from repnet.federated.app import client_app, server_app

__all__ = ["server_app", "client_app"]
