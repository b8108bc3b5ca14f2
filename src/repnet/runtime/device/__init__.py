"""The ``device`` runtime: training steps in ``repnet-device``, the C++ trainer over the ExecuTorch
runtime (sources in ``device/``, docs in ``docs/device.md``). :mod:`.files`: the files it reads
(program metadata, packed datasets); :mod:`.runner`: the process and ``repnet train --runtime device``."""
from .files import read_dataset, read_dataset_header, write_dataset, write_program, program_metadata  # noqa: F401
from .runner import DEVICE_RUN, find_binary, run_device, train_on_device  # noqa: F401
