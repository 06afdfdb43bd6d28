"""Tensor methods between layers (issue 19): the idioms real CNN code uses either run through
convert -> hdrq_calibrate -> export -> validate, or the conversion refuses them naming the node
and the line of ``forward``; no forward after a successful conversion raises a raw error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq_plugin import HDRQConfig, convert_to_brevitas, hdrq_calibrate
from hdrq_plugin.convert.op_policy import UnsupportedOpError
from hdrq_plugin.export import export_qdq, validate
from hdrq_plugin.run.checkpoint import quantizer_family

#: How a gate ``s`` (N, C) scales ``x`` (N, C, H, W), and other between-layer tensor code.
IDIOMS = {
    "se-index-none": lambda x, s: x * s[:, :, None, None],
    "se-unsqueeze": lambda x, s: x * s.unsqueeze(-1).unsqueeze(-1),
    "se-torch-unsqueeze": lambda x, s: x * torch.unsqueeze(torch.unsqueeze(s, 2), 3),
    "se-view": lambda x, s: x * s.view(x.size(0), x.size(1), 1, 1),
    "se-reshape": lambda x, s: x * s.reshape(-1, x.shape[1], 1, 1),
    "se-expand-as": lambda x, s: x * s[..., None, None].expand_as(x),
    "se-ellipsis-squeeze": lambda x, s: x * s[..., None, None, None].squeeze(-1),
    "permute": lambda x, s: (x.permute(0, 2, 3, 1) * s[:, None, None, :]).permute(0, 3, 1, 2),
    "transpose": lambda x, s: x.transpose(2, 3) + s[:, :, None, None],
    "chunk": lambda x, s: torch.cat([x.chunk(2, dim=1)[1], x.chunk(2, dim=1)[0]], 1) * s[:, :, None, None],
    "split": lambda x, s: (lambda p: torch.cat([p[1], p[0]], 1))(torch.split(x * s[:, :, None, None], x.size(1) // 2, 1)),
    "slice-channels": lambda x, s: torch.cat([x[:, :4], x[:, 4:] * s[:, 4:, None, None]], 1),
    "mean-sum-over-dims": lambda x, s: x + x.mean(1, keepdim=True) * s.sum(dim=1)[:, None, None, None],
    "hard-sigmoid-by-hand": lambda x, s: x * (F.relu6(s + 3) / 6)[:, :, None, None],
}


class GatedNet(nn.Module):
    def __init__(self, idiom: str) -> None:
        super().__init__()
        self.idiom = idiom
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = IDIOMS[self.idiom](x, s)
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("idiom", list(IDIOMS))
def test_a_tensor_idiom_between_layers_converts_calibrates_exports_and_validates(idiom, tmp_path):
    torch.manual_seed(0)
    model = GatedNet(idiom).eval()
    qmodel = convert_to_brevitas(model, "w4a4", **quantizer_family("hdrq"))
    config = HDRQConfig.cpu_preset("hdrq", iterations=1, num_samples=8, batch_size=4)
    qmodel = hdrq_calibrate(qmodel, _images(8, 1), source=model, config=config)
    images = _images(16, 2)
    path = export_qdq(qmodel, tmp_path / "m.onnx", images[:1], weights="int4-in-int8")
    report = validate(path, qmodel, [images], batch_sizes=(1,), repeats=1, threads=1)
    assert report.ok, report.failures


class _Cumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x).cumsum(1)
        return self.fc(y.mean((2, 3)))


def test_an_unsupported_tensor_method_is_refused_naming_the_node_its_line_and_what_to_write():
    with pytest.raises(UnsupportedOpError) as err:
        convert_to_brevitas(_Cumsum(), "w4a4")
    message = str(err.value)
    assert "Tensor.cumsum (graph node 'cumsum')" in message
    assert "test_tensor_methods.py" in message and "self.conv(x).cumsum(1)" in message
    assert "unsqueeze" in message and "indexing with slices and None" in message
