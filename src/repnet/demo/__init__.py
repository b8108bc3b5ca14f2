"""``repnet demo``: the offline demo (ImageNet MobileNetV2 -> Fashion-MNIST, Rep-Net against its
baselines on one budget): the budget (:mod:`.config`), the comparison and its report (:mod:`.run`),
the linear probe (:mod:`.probe`).

Everything it needs ships in packages (the weights, the dataset), so it runs offline on a CPU in
minutes; docs/demo.md gives the budget's reasons and the committed figures.
"""
from repnet.registry import lazy_exports

_EXPORTS = {"DemoConfig": "config", "DEFAULT_METHODS": "config", "LINEAR_PROBE": "config", "DEMO_LRS": "config",
            "method_config": "config", "run": "run", "compare": "run", "verdict": "run", "format_table": "run",
            "provenance": "run", "linear_probe": "probe"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
