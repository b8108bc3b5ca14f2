"""Federated learning of adapters on Flower: the frozen backbone stays on every device, only the
method's trainable state travels. :mod:`.core` is what the server and the clients do (settings as
Flower run config, client rounds through the one loop, screened replies, checkpoints, bytes);
:mod:`.app` holds Flower's ServerApp / ClientApp and the simulation; :mod:`.run` is the front end
(``repnet federated``, the app folder for ``flwr run``)."""
from repnet.registry import lazy_exports

_EXPORTS = {"run_federated": "run", "write_app": "run", "Settings": "core", "STRATEGIES": "core",
            "partition": "core", "state_bytes": "core", "RUN": "core", "LocalClient": "core", "Server": "core",
            "screen_reply": "core", "encode_state": "core", "decode_arrays": "core",
            "server_app": "app", "client_app": "app", "make_apps": "app", "simulate": "app"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
