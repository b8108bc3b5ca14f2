"""The paper's tables as data: each published figure (accuracy, and memory where the paper gives it)
with the configuration that produced it, and the filters ``repnet reproduce`` selects cells with.

A :class:`Cell` is one published number and its dataset, backbone, method + options and image size
(batch 8 and the dataset's recipe); a :class:`Table` is the paper's table as cells (``TABLES``:
table1, the connector ablation; table2, other backbones and input reprogramming; table3, Rep-Net
against TinyTL).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from repnet.errors import RepnetError


PM = "proxylessnas_mobile"


@dataclass(frozen=True)
class Cell:
    """One published figure and the configuration behind it."""

    row: str
    dataset: str
    backbone: str
    method: str
    image_size: int
    accuracy: float | None = None
    memory_mb: float | None = None
    options: tuple = ()  # sorted (key, value) pairs

    @property
    def key(self) -> str:
        opts = "".join(f"@{k}={v}" for k, v in self.options)
        return f"{self.dataset}-{self.backbone}-{self.method}{opts}-{self.image_size}"


@dataclass(frozen=True)
class Table:
    title: str
    cells: tuple[Cell, ...] = field(default_factory=tuple)


def _cells(row: str, backbone: str, method: str, size: int, memory: float | None, accs: dict,
           options: dict | None = None) -> list[Cell]:
    opts = tuple(sorted((options or {}).items()))
    return [Cell(row, d, backbone, method, size, a, memory, opts) for d, a in accs.items()]


_T3_DATASETS = ("flowers102", "cars", "cub200", "food101", "pets", "aircraft", "cifar10", "cifar100")


def _t3(row, method, size, memory, values):
    return _cells(row, PM, method, size, memory, dict(zip(_T3_DATASETS, values)))


_T1_DATASETS = ("flowers102", "cars", "cub200", "pets", "aircraft")


def _t1(row, options, memory, values):
    return _cells(row, PM, "repnet", 224, memory, dict(zip(_T1_DATASETS, values)), options)


_T2_DATASETS = ("cifar10", "flowers102", "cub200", "aircraft")  # a shorter tuple: the first columns only


def _t2(row, method, backbone, memory, values):
    return _cells(row, backbone, method, 224, memory, dict(zip(_T2_DATASETS, values)))


TABLES: dict[str, Table] = {
    "table3": Table(
        "Rep-Net vs TinyTL-L+B, ProxylessNAS-Mobile, batch 8 (paper Table 3)",
        tuple(
            _t3("TinyTL (L+B) @224", "tinytl_lb", 224, 37.0, (95.5, 85.0, 77.1, 79.7, 91.8, 75.4, 95.9, 81.4))
            + _t3("Rep-Net @224", "repnet", 224, 34.0, (96.1, 85.8, 77.8, 80.5, 91.8, 77.4, 95.9, 81.9))
            + _t3("TinyTL (L+B) @320", "tinytl_lb", 320, 65.0, (96.8, 88.8, 81.0, 82.9, 92.9, 82.3, 96.1, 81.5))
            + _t3("Rep-Net @320", "repnet", 320, 61.0, (97.1, 89.0, 82.3, 83.3, 92.5, 82.4, 96.6, 82.3))
        ),
    ),
    "table1": Table(
        "Connector ablation, ProxylessNAS-Mobile @224, batch 8 (paper Table 1)",
        tuple(
            _t1("none", {"connector": "none"}, None, (93.3, 51.1, 65.5, 88.0, 36.9))
            + _t1("down", {"connector": "down"}, None, (91.8, 73.4, 67.8, 89.6, 56.3))
            + _t1("up", {"connector": "up"}, None, (95.2, 76.8, 71.4, 90.7, 59.3))
            + _t1("dual", {"connector": "dual"}, 34.0, (96.1, 85.8, 77.1, 91.8, 77.4))
            + _t1("dual, every block", {"connector": "dual", "placement": "all"}, 37.0,
                  (96.0, 85.8, 76.8, 91.2, 78.7))
        ),
    ),
    "table2": Table(
        "Rep-Net vs input reprogramming, batch 8 @224 (paper Table 2; its MNIST column is left out)",
        tuple(
            _t2("Adv. Rep / ResNet-50", "input_reprogram", "resnet50", 98.0, (62.8,))
            + _t2("Adv. Rep / MobileNetV2", "input_reprogram", "mobilenet_v2", 53.0, (58.3,))
            + _t2("Adv. Rep / MobileNetV3", "input_reprogram", "mobilenet_v3_large", 42.0, (59.4,))
            + _t2("Adv. Rep + Last / ResNet-50", "input_reprogram_last", "resnet50", 99.0, (92.8, 91.1, 66.9, 55.8))
            + _t2("Adv. Rep + Last / MobileNetV2", "input_reprogram_last", "mobilenet_v2", 54.0,
                  (85.1, 91.8, 66.8, 52.2))
            + _t2("Adv. Rep + Last / MobileNetV3", "input_reprogram_last", "mobilenet_v3_large", 46.0,
                  (92.0, 92.6, 62.3, 54.2))
            + _t2("Rep-Net / ResNet-50", "repnet", "resnet50", 119.0, (96.4, 96.7, 80.3, 85.9))
            + _t2("Rep-Net / MobileNetV2", "repnet", "mobilenet_v2", 51.0, (95.0, 95.0, 76.9, 81.6))
            + _t2("Rep-Net / MobileNetV3", "repnet", "mobilenet_v3_large", 43.0, (95.3, 95.1, 77.5, 78.9))
        ),
    ),
}


def get_table(name: str) -> Table:
    if name not in TABLES:
        raise RepnetError(f"unknown table '{name}'; choose from: {', '.join(TABLES)}")
    return TABLES[name]


def _split(value, what: str, valid) -> list | None:
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    bad = [v for v in items if str(v) not in {str(x) for x in valid}]
    if bad:
        raise RepnetError(f"{what} {', '.join(map(str, bad))} not in this table; choose from: "
                          f"{', '.join(sorted({str(x) for x in valid}))}")
    return items


def select(table: str, datasets=None, methods=None, image_sizes=None, backbones=None) -> list[Cell]:
    """The table's cells, filtered (comma-separated strings or lists)."""
    cells = list(get_table(table).cells)
    ds = _split(datasets, "dataset", {c.dataset for c in cells})
    ms = _split(methods, "method", {c.method for c in cells})
    ss = _split(image_sizes, "image size", {c.image_size for c in cells})
    bs = _split(backbones, "backbone", {c.backbone for c in cells})
    return [c for c in cells if (ds is None or c.dataset in ds) and (ms is None or c.method in ms)
            and (ss is None or str(c.image_size) in ss) and (bs is None or c.backbone in bs)]
