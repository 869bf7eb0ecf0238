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
buffer holds its final value at (r, c), except the model's input itself, which `PixelSteps.finish` writes. So the
pass for colour k computes only colour group k's channels at every layer (`group=k`): the groups before k hold their
values from the earlier passes at this pixel, the groups after it stale values that the masks multiply by zero and
later passes overwrite. A colour model's step then reads a third of every weight.

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


def _parts(groups: torch.Tensor | None) -> list | None:
    """Per colour group, its channels: a slice where they are contiguous (one block), else an index (gate blocks,
    ascending: i_k, f_k, o_k, g_k); None without colour groups."""
    if groups is None:
        return None
    parts = []
    for k in range(int(groups.max()) + 1):
        idx = (groups == k).nonzero().flatten()
        contiguous = int(idx[-1] - idx[0]) + 1 == idx.numel()
        parts.append(slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx.to(groups.device))
    return parts


def _rows(t: torch.Tensor | None, parts: list | None) -> list | None:
    """t's rows of each part, contiguous; None where t or parts is None."""
    if t is None or parts is None:
        return None
    return [t[part].contiguous() for part in parts]


class ConvAt:
    """A gm.nn.MaskedConv2d evaluated at one pixel at a time. A (kh, kw) kernel keeps its input's rows r-kh//2..r in
    a zero-padded buffer (N, kh//2 + 1, W + 2*(kw//2), C_in); a 1x1 kernel keeps nothing. With colour groups,
    `group=k` computes group k's outputs alone, into the pixel's output vector (`last`) that it returns."""

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
        self.parts = _parts(conv.out_groups)
        self.weights, self.biases = _rows(self.weight, self.parts), _rows(self.bias, self.parts)
        self.last = weight.new_zeros(n, weight.shape[0]) if self.parts is not None else None

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

    def _inputs(self, v: torch.Tensor, c: int) -> torch.Tensor:
        if self.pointwise:
            return v
        self.write(v, c)
        return self.buf[:, :, c : c + self.kw].reshape(self.n, -1)

    def part(self, v: torch.Tensor, c: int, group: int) -> torch.Tensor:
        """Group `group`'s outputs at (r, c) alone (N, C_out / colours), given the input there, v (N, C_in)."""
        return F.linear(self._inputs(v, c), self.weights[group], self.biases[group] if self.biases else None)

    def __call__(self, v: torch.Tensor, c: int, group: int | None = None) -> torch.Tensor:
        """The output at (r, c) (N, C_out), given the input there, v (N, C_in); with `group` (colour layers), that
        group's channels, the others as the earlier passes left them."""
        if group is None or self.parts is None:
            return F.linear(self._inputs(v, c), self.weight, self.bias)
        self.last[:, self.parts[group]] = self.part(v, c, group)
        return self.last


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

    def __call__(self, v: torch.Tensor, c: int, group: int | None = None) -> torch.Tensor:
        h = v
        for conv in self.convs:
            h = conv(F.relu(h), c, group)
        return v + h if self.residual else h


def _hidden_parts(gate_groups: torch.Tensor | None) -> list | None:
    """The hidden units of each colour group (a unit has its gates' colour: contiguous thirds); None without."""
    if gate_groups is None:
        return None
    return _parts(gate_groups[: gate_groups.numel() // 4])


class RowLSTMAt:
    """gm.nn.RowLSTM at one pixel: the (1, k) input-to-state conv over the current row, the state-to-state conv over
    the previous row's hidden state (kept, zero-padded), the cell from the previous row's cell state."""

    def __init__(self, layer, n: int, width: int, dtype: torch.dtype) -> None:
        hid, k = layer.hidden, layer.kernel_size
        self.k, self.p, self.n = k, k // 2, n
        self.conv_in = ConvAt(layer.input_to_state, n, width, dtype)
        self.w_ss = layer.w_ss.detach().to(dtype).permute(0, 2, 1).reshape(4 * hid, k * hid).contiguous()
        self.out = ConvAt(layer.out, n, width, dtype) if layer.out is not None else None
        self.w_ss_parts = _rows(self.w_ss, self.conv_in.parts)
        self.hid_parts = _hidden_parts(layer.input_to_state.out_groups)
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

    def __call__(self, v: torch.Tensor, c: int, group: int | None = None) -> torch.Tensor:
        above = self.h_prev[:, c : c + self.k].reshape(self.n, -1)
        if group is None or self.hid_parts is None:
            z = self.conv_in(v, c) + F.linear(above, self.w_ss)
            h, cell = _cell(z, self.c_prev[:, c])
            self.c_cur[:, c] = cell
            self.h_cur[:, c + self.p] = h
        else:  # group k's gates and hidden units alone
            units = self.hid_parts[group]
            z = self.conv_in.part(v, c, group) + F.linear(above, self.w_ss_parts[group])
            h, cell = _cell(z, self.c_prev[:, c, units])
            self.c_cur[:, c, units] = cell
            self.h_cur[:, c + self.p, units] = h
            h = self.h_cur[:, c + self.p]
        return v + self.out(h, c, group) if self.out is not None else h


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
        groups = layer.input_to_state.out_groups  # both directions' gates: the first 4h are left to right's
        gate_parts = _parts(groups[: 4 * hid]) if groups is not None else None
        self.w_in_parts, self.w_ss_parts = _rows(self.w_in, gate_parts), _rows(self.w_ss, gate_parts)
        self.b_in_parts = _rows(self.b_in, gate_parts)
        self.hid_parts = _hidden_parts(groups[: 4 * hid] if groups is not None else None)
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

    def __call__(self, v: torch.Tensor, c: int, group: int | None = None) -> torch.Tensor:
        self.x_cur[:, c] = v
        above_left = torch.cat([self.h_prev[:, c + 1], self.h_cur[:, c]], dim=1)
        if group is None or self.hid_parts is None:
            z = F.linear(v, self.w_in, self.b_in) + F.linear(above_left, self.w_ss)
            h, cell = _cell(z, self.c_cur[:, c])
            self.h_cur[:, c + 1] = h
            self.c_cur[:, c + 1] = cell
        else:  # group k's gates and hidden units alone
            units = self.hid_parts[group]
            bias = self.b_in_parts[group] if self.b_in_parts is not None else None
            z = F.linear(v, self.w_in_parts[group], bias) + F.linear(above_left, self.w_ss_parts[group])
            h, cell = _cell(z, self.c_cur[:, c, units])
            self.h_cur[:, c + 1, units] = h
            self.c_cur[:, c + 1, units] = cell
            h = self.h_cur[:, c + 1]
        h = h + self.h_rev[:, c]
        return v + self.out(h, c, group) if self.out is not None else h


class PixelSteps:
    """A PixelModel (gm.models.common) evaluated pixel by pixel, rows top to bottom, columns left to right:
    `begin_row(r)`, then for each column c `logits = steps(x_rc, c, group=k)` for each colour k in order (x_rc (N, C):
    the pixel's levels so far, later colours zero; logits (N, C) or (N, C, 256): colour k's are right), then
    `finish(x_rc, c)` with its final levels. group=None computes every colour's channels in one pass: with the
    pixel's final levels given, every colour's logits are right (a colour's depend on the colours before it only)."""

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

    def __call__(self, x: torch.Tensor, c: int, group: int | None = None) -> torch.Tensor:
        h = self.stem(self._input(x), c, group)
        for layer in self.layers:
            h = layer(h, c, group)
        logits = self.head(h, c, group)
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
