"""The autoregressive models evaluated one pixel at a time, with each layer's state cached: fast sampling.

Drawing an image pixel by pixel (and colour by colour) needs the logits at one pixel per step. Running the whole
model for every step, as `PixelModel.sample(method="full")` does, costs H*W*C forward passes over a growing image.
Here every layer keeps what later pixels will read of it, so a step computes one pixel at every layer:

- a masked convolution keeps its input's rows r-kh//2..r in a buffer (the rows below the centre are masked out)
  and computes its output at (r, c) as one matrix-vector product per image over the kept taps;
- a Row LSTM keeps the previous row's hidden and cell state (the state-to-state convolution reads row r-1 only);
- a Diagonal BiLSTM keeps the left-to-right scan's previous row and current row; its right-to-left scan reaches a
  pixel through the one-row shift only, so it runs over row r-1 once that row is complete, at the start of row r.

Every value a layer computes at pixel (r, c) for colour group g depends on the input before (r, c) and on colours
before g at (r, c) (mask A in the first layer, mask B after it), so after the pass for the last colour every
buffer holds its final value at (r, c), except the model's input itself, which `PixelSteps.finish` writes.

This is matrix-vector work (N x C by C x C' products, a few per layer and pixel), written with PyTorch operations:
gm's kernels are built for whole images and would not change it. Arithmetic is float32 (float64 for a float64
model), whatever the model's compute precision; the full forward in float64 agrees with it to rounding
(tests/models/test_incremental.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gm.reference.masked_conv import conv_mask


def _dtype(model) -> torch.dtype:
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


class ConvAt:
    """A gm.nn.MaskedConv2d evaluated at one pixel at a time. A (kh, kw) kernel keeps its input's rows r-kh//2..r in
    a zero-padded buffer (N, kh//2 + 1, W + 2*(kw//2), C_in); a 1x1 kernel keeps nothing."""

    def __init__(self, conv, n: int, width: int, dtype: torch.dtype) -> None:
        kh, kw = conv.kernel_size
        self.ph, self.pw, self.kw, self.n = kh // 2, kw // 2, kw, n
        weight = conv.weight.detach().to(dtype)
        mask = conv_mask(tuple(weight.shape), conv.mask, conv.in_groups, conv.out_groups, weight.device)
        weight = (weight * mask.to(dtype))[:, :, : self.ph + 1]  # the taps below the centre row are all masked
        self.weight = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()  # (C_out, rows*kw*C_in)
        self.bias = conv.bias.detach().to(dtype) if conv.bias is not None else None
        self.pointwise = kh == 1 and kw == 1
        self.buf = None
        if not self.pointwise:
            self.buf = weight.new_zeros(n, self.ph + 1, width + 2 * self.pw, weight.shape[1])

    def next_row(self) -> None:
        """Row r+1 begins: the buffer's rows move up one, the new current row is zero."""
        if self.buf is not None:
            if self.ph:
                self.buf[:, :-1] = self.buf[:, 1:].clone()
            self.buf[:, -1].zero_()

    def write(self, v: torch.Tensor, c: int) -> None:
        """The input at (r, c) is v (N, C_in)."""
        if self.buf is not None:
            self.buf[:, self.ph, c + self.pw] = v

    def __call__(self, v: torch.Tensor, c: int) -> torch.Tensor:
        """The output at (r, c) (N, C_out), given the input there, v (N, C_in)."""
        if self.pointwise:
            return F.linear(v, self.weight, self.bias)
        self.write(v, c)
        patch = self.buf[:, :, c : c + self.kw].reshape(self.n, -1)
        return F.linear(patch, self.weight, self.bias)


def _cell(z: torch.Tensor, c_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSTM cell on pre-activations z (N, 4h) in gate order i, f, o, g: (h, c)."""
    i, f, o, g = z.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class ChainAt:
    """relu_conv_chain at one pixel: conv_n(relu(... conv_1(relu(v)))), plus v when `residual` (the PixelCNN residual
    block, the output head)."""

    def __init__(self, convs, residual: bool, n: int, width: int, dtype: torch.dtype) -> None:
        self.convs = [ConvAt(conv, n, width, dtype) for conv in convs]
        self.residual = residual

    def next_row(self, r: int) -> None:
        for conv in self.convs:
            conv.next_row()

    def __call__(self, v: torch.Tensor, c: int) -> torch.Tensor:
        h = v
        for conv in self.convs:
            h = conv(F.relu(h), c)
        return v + h if self.residual else h


class RowLSTMAt:
    """gm.nn.RowLSTM at one pixel: the (1, k) input-to-state conv over the current row, the state-to-state conv over
    the previous row's hidden state (kept, zero-padded), the cell from the previous row's cell state."""

    def __init__(self, layer, n: int, width: int, dtype: torch.dtype) -> None:
        hid, k = layer.hidden, layer.kernel_size
        self.k, self.p, self.n = k, k // 2, n
        self.conv_in = ConvAt(layer.input_to_state, n, width, dtype)
        self.w_ss = layer.w_ss.detach().to(dtype).permute(0, 2, 1).reshape(4 * hid, k * hid).contiguous()
        self.out = ConvAt(layer.out, n, width, dtype) if layer.out is not None else None
        new = self.w_ss.new_zeros
        self.h_prev, self.h_cur = new(n, width + 2 * self.p, hid), new(n, width + 2 * self.p, hid)
        self.c_prev, self.c_cur = new(n, width, hid), new(n, width, hid)
        if layer.h0 is not None:  # the learned initial state (row -1), the same at every column
            self.h_prev[:, self.p : self.p + width] = layer.h0.detach().to(dtype)
            self.c_prev[:] = layer.c0.detach().to(dtype)

    def next_row(self, r: int) -> None:
        self.conv_in.next_row()
        if r > 0:  # the row just finished is the previous row now; the padding columns stay zero in both
            self.h_prev, self.h_cur = self.h_cur, self.h_prev
            self.c_prev, self.c_cur = self.c_cur, self.c_prev

    def __call__(self, v: torch.Tensor, c: int) -> torch.Tensor:
        z = self.conv_in(v, c) + F.linear(self.h_prev[:, c : c + self.k].reshape(self.n, -1), self.w_ss)
        h, cell = _cell(z, self.c_prev[:, c])
        self.c_cur[:, c] = cell
        self.h_cur[:, c + self.p] = h
        return v + self.out(h, c) if self.out is not None else h


class DiagonalBiLSTMAt:
    """gm.nn.DiagonalBiLSTM at one pixel. Left to right: the state at (r, c) from the hidden states above (r-1, c)
    and to the left (r, c-1) and the cell state to the left. Right to left: reaches row r only through the one-row
    shift, so next_row(r) runs it over row r-1 (complete by then) from the layer's input there."""

    def __init__(self, layer, n: int, width: int, dtype: torch.dtype) -> None:
        hid = layer.hidden
        self.width, self.hid = width, hid
        conv = ConvAt(layer.input_to_state, n, width, dtype)  # 1x1: its weight is (8h, C_in)
        self.w_in, self.w_in_rev = conv.weight.chunk(2, dim=0)
        self.b_in, self.b_in_rev = conv.bias.chunk(2, dim=0) if conv.bias is not None else (None, None)

        def state(w):  # (4h, h, 2) taps (above, left) -> (4h, 2h) over [h_above, h_left]
            w = w.detach().to(dtype)
            return torch.cat([w[..., 0], w[..., 1]], dim=1).contiguous()

        self.w_ss, self.w_ss_rev = state(layer.w_ss), state(layer.w_ss_rev)
        self.out = ConvAt(layer.output, n, width, dtype) if layer.output is not None else None
        new = self.w_ss.new_zeros
        # left to right: hidden states of rows r-1 and r with a zero column on the left (c = -1), cells of row r
        self.h_prev, self.h_cur = new(n, width + 1, hid), new(n, width + 1, hid)
        self.c_cur = new(n, width + 1, hid)
        self.x_cur = new(n, width, conv.weight.shape[1])  # the layer's input on row r
        self.h_rev = new(n, width, hid)  # the right-to-left hidden state of row r-1: row r's shifted term

    def next_row(self, r: int) -> None:
        if r == 0:
            return
        self.h_prev, self.h_cur = self.h_cur, self.h_prev
        self._reverse_scan()

    def _reverse_scan(self) -> None:
        """The right-to-left scan over the row just completed (the input in x_cur), from the state above (h_rev)."""
        n, hid = self.x_cur.shape[0], self.hid
        w_above, w_right = self.w_ss_rev[:, :hid], self.w_ss_rev[:, hid:]
        z_row = F.linear(self.x_cur, self.w_in_rev, self.b_in_rev) + F.linear(self.h_rev, w_above)  # (N, W, 4h)
        h_row = torch.empty_like(self.h_rev)
        h = cell = self.h_rev.new_zeros(n, hid)  # zero state right of the image
        for c in reversed(range(self.width)):
            h, cell = _cell(z_row[:, c] + F.linear(h, w_right), cell)
            h_row[:, c] = h
        self.h_rev = h_row

    def __call__(self, v: torch.Tensor, c: int) -> torch.Tensor:
        self.x_cur[:, c] = v
        above_left = torch.cat([self.h_prev[:, c + 1], self.h_cur[:, c]], dim=1)
        z = F.linear(v, self.w_in, self.b_in) + F.linear(above_left, self.w_ss)
        h, cell = _cell(z, self.c_cur[:, c])
        self.h_cur[:, c + 1] = h
        self.c_cur[:, c + 1] = cell
        h = h + self.h_rev[:, c]
        return v + self.out(h, c) if self.out is not None else h


class PixelSteps:
    """A PixelModel (gm.models.common) evaluated pixel by pixel, rows top to bottom, columns left to right:
    `begin_row(r)`, then for each column c `logits = steps(x_rc, c)` once per colour (x_rc (N, C): the pixel's levels
    so far, later colours zero; logits (N, C) or (N, C, 256): colour k's are right where colours < k are), then
    `finish(x_rc, c)` with its final levels."""

    def __init__(self, model, n: int, width: int) -> None:
        dtype = _dtype(model)
        self.model, self.n, self.dtype = model, n, dtype
        self.stem = ConvAt(model.stem, n, width, dtype)
        self.layers = model.layers_at(n, width, dtype)
        self.head = ChainAt(model.head.convs, False, n, width, dtype)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) * (2.0 / (self.model.levels - 1)) - 1.0  # as PixelModel.forward scales x

    def begin_row(self, r: int) -> None:
        self.stem.next_row()
        for layer in self.layers:
            layer.next_row(r)
        self.head.next_row(r)

    def __call__(self, x: torch.Tensor, c: int) -> torch.Tensor:
        h = self.stem(self._input(x), c)
        for layer in self.layers:
            h = layer(h, c)
        logits = self.head(h, c)
        model = self.model
        return logits if model.levels == 2 else logits.view(self.n, model.channels, model.levels)

    def finish(self, x: torch.Tensor, c: int) -> None:
        self.stem.write(self._input(x), c)


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for levels x (N, C, H, W), computed pixel by pixel as sampling computes them: equal, to
    rounding, to model(x) (float32 or float64 as the parameters; the tests' check of the cached states)."""
    n, _, height, width = x.shape
    steps = PixelSteps(model, n, width)
    out = []
    for r in range(height):
        steps.begin_row(r)
        row = []
        for c in range(width):
            row.append(steps(x[:, :, r, c], c))  # the pixel's every colour at once: colour k reads colours < k
            steps.finish(x[:, :, r, c], c)
        out.append(torch.stack(row, dim=-1))
    return torch.stack(out, dim=-2)
