"""repnet: memory-efficient on-device transfer learning (Rep-Net and its baselines)."""
from .api import from_pretrained, get_model
from .backbones import BACKBONES, create_backbone, list_backbones
from .errors import RepnetError
from .methods import METHODS, TransferModel

__all__ = ["get_model", "from_pretrained", "create_backbone", "list_backbones", "BACKBONES", "METHODS",
           "TransferModel", "RepnetError"]
__version__ = "0.1.0"
