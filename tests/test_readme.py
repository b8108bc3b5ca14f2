"""The README's code that claims to run does run (in a fresh interpreter, so that the example's
method registration does not leak into the other tests)."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

CHECKS = '''
import torch
from repnet.memory import remove_engine
x = torch.randn(2, 3, 64, 64)
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("scales", "shifts", "head"))}
last = repnet.get_model("mobilenet_v2", "last", num_classes=10, image_size=64, pretrained=False)
last.load_state_dict(model.state_dict(), strict=False)
model.eval(); last.eval()
assert torch.allclose(model(x), last(x), atol=1e-6)  # scale 1, shift 0: the frozen backbone + head
model.train()
model(x).square().sum().backward()
assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shifts)
assert all(p.grad is None for p in model.backbone.parameters())
print("CHECKS OK")
'''


def test_extension_example_runs_and_behaves():
    text = README.read_text()
    m = re.search(r"<!-- extend-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README lost its extension example"
    out = subprocess.run([sys.executable, "-c", m.group(1) + CHECKS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("trainable params: 14,202 ||")
    assert float(lines[1]) > 0 and lines[-1] == "CHECKS OK"
