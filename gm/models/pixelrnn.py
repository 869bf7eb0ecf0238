"""PixelRNN models (van den Oord, Kalchbrenner, Kavukcuoglu 2016, sections 3.1-3.4, table 1): Row LSTM and
Diagonal BiLSTM.

    x -> 7x7 conv mask A (-> 2h maps) -> `layers` x [RowLSTM | DiagonalBiLSTM](2h, h, residual) -> head -> logits

The recurrent layers are gm.nn.RowLSTM / gm.nn.DiagonalBiLSTM (fused scans), each with the paper's residual
connection (1x1 mask B back to 2h maps, plus its input); the head is PixelCNN's (two ReLU + 1x1 mask B layers, then
the logits). Colour presets split every layer's maps R, G, B.
"""

from __future__ import annotations

import torch
from torch import nn

from gm.models.common import OutputHead, PixelModel
from gm.nn import DiagonalBiLSTM, MaskedConv2d, RowLSTM

# h is a multiple of 3 in the colour presets (see gm/models/pixelcnn.py).
PRESETS = {
    "mnist": dict(channels=1, levels=2, hidden=16, layers=7, head=32),
    "cifar10": dict(channels=3, levels=256, hidden=129, layers=12, head=1026),
    "tiny": dict(channels=1, levels=2, hidden=4, layers=2, head=8),
    "tiny-rgb": dict(channels=3, levels=256, hidden=6, layers=1, head=12),
}

_LAYERS = {"row": RowLSTM, "diagonal": DiagonalBiLSTM}


class PixelRNN(PixelModel):
    def __init__(
        self,
        kind: str,
        channels: int = 1,
        levels: int = 2,
        hidden: int = 16,
        layers: int = 7,
        head: int = 32,
        backend: str | None = None,
    ) -> None:
        super().__init__(channels, levels, backend)
        if kind not in _LAYERS:
            raise ValueError(f"kind must be one of {tuple(_LAYERS)}, got {kind!r}")
        self.config = dict(channels=channels, levels=levels, hidden=hidden, layers=layers, head=head)
        self.layer_kind = kind
        layer_cls = _LAYERS[kind]
        extra = {"kernel_size": 3} if kind == "row" else {}
        self.stem = MaskedConv2d(channels, 2 * hidden, 7, "A", colors=self.colors, backend=backend)
        self.layers = nn.ModuleList(
            layer_cls(2 * hidden, hidden, colors=self.colors, residual=True, backend=backend, **extra)
            for _ in range(layers)
        )
        self.head = OutputHead(2 * hidden, head, self.out_channels, self.colors, backend)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return h

    def layers_at(self, n: int, width: int, dtype: torch.dtype) -> list:
        from gm.models.incremental import DiagonalBiLSTMAt, RowLSTMAt  # noqa: PLC0415

        step = RowLSTMAt if self.layer_kind == "row" else DiagonalBiLSTMAt
        return [step(layer, n, width, dtype) for layer in self.layers]


class RowLSTMModel(PixelRNN):
    name = "rowlstm"

    def __init__(self, **kwargs) -> None:
        super().__init__("row", **kwargs)

    @property
    def channels_last(self) -> bool:
        """Channels-last where the layers' convolutions and scan all run on the cuda backend or all on the triton
        one: their one-node path then keeps gates, states and gradients channels-last (gm.nn.row_lstm.
        _FusedRowLSTMChannelsLast), so an NCHW activation between layers costs a conversion of each layer's input
        and of its output gradient. The backends as the layers resolve them for the compute dtype on the
        parameters' device (gm.nn.RowLSTM.runs_channels_last): backend="cuda" or "triton", or auto where the convs and
        the scan resolve to the same one (auto picks the triton scans unless a benchmark run measured the cuda ones
        ahead: gm.ops.row_lstm.scan_backend). The cpu row scan reads NCHW rows, and the input conv's channels-last output
        would cost it a conversion, so elsewhere the model stays NCHW."""
        if len(self.layers) == 0:
            return False
        p = next(self.parameters())
        return self.layers[0].runs_channels_last(p.new_empty(0, 0, 0, 0, dtype=self.compute_dtype or p.dtype))


class DiagonalBiLSTMModel(PixelRNN):
    name = "diagonal_bilstm"

    def __init__(self, **kwargs) -> None:
        super().__init__("diagonal", **kwargs)

    @property
    def channels_last(self) -> bool:
        """Channels-last where the layers' convolutions and scans all run on one backend, cuda, triton or cpu: their
        one-node path then keeps gates, states and gradients channels-last (gm.nn.diagonal_lstm.
        _FusedBiLSTMChannelsLast), so an NCHW activation between layers costs a conversion of each layer's input and
        of its output gradient. The backends as the layers resolve them for the compute dtype on the parameters'
        device (gm.nn.DiagonalBiLSTM.runs_channels_last): backend="cuda", "triton" or "cpu", or auto where the convs
        and the scans resolve to the same one; elsewhere (the reference, mixed backends) the model stays NCHW."""
        if len(self.layers) == 0:
            return False
        p = next(self.parameters())
        return self.layers[0].runs_channels_last(p.new_empty(0, 0, 0, 0, dtype=self.compute_dtype or p.dtype))
