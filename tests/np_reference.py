"""Independent NumPy versions of PyTorch's definitions, shared by the tests."""

import math

import numpy as np


def np_resize_align_corners(x, out_h, out_w):
  """PyTorch bilinear, align_corners=True, written pixel by pixel (2-D, not separable)."""
  n, h, w, c = x.shape
  out = np.zeros((n, out_h, out_w, c))
  for i in range(out_h):
    sy = 0.0 if out_h == 1 else i * (h - 1) / (out_h - 1)
    y0 = min(int(math.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for j in range(out_w):
      sx = 0.0 if out_w == 1 else j * (w - 1) / (out_w - 1)
      x0 = min(int(math.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


def np_adaptive_avg_pool(x, bins):
  n, h, w, c = x.shape
  out = np.zeros((n, bins, bins, c))
  for i in range(bins):
    h0, h1 = (i * h) // bins, math.ceil((i + 1) * h / bins)
    for j in range(bins):
      w0, w1 = (j * w) // bins, math.ceil((j + 1) * w / bins)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def np_pool(x, k, s, p, ceil_mode, mode):
  """PyTorch max_pool2d / avg_pool2d(count_include_pad=True), loop over output positions."""
  n, h, w, c = x.shape

  def out_len(size):
    span = size + 2 * p - k
    o = (math.ceil(span / s) if ceil_mode else span // s) + 1
    if ceil_mode and (o - 1) * s >= size + p:
      o -= 1
    return o

  oh, ow = out_len(h), out_len(w)
  out = np.zeros((n, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      hs, ws = i * s - p, j * s - p
      he, we = min(hs + k, h + p), min(ws + k, w + p)
      pool_size = (he - hs) * (we - ws)
      window = x[:, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
      if mode == 'max':
        out[:, i, j] = window.max(axis=(1, 2))
      else:
        out[:, i, j] = window.sum(axis=(1, 2)) / pool_size
  return out


def np_conv(x, kernel, *, stride=1, padding=0, dilation=1, bias=None):
  """PyTorch Conv2d on NHWC with an HWIO kernel, as a sum over kernel taps."""
  n, h, w, _ = x.shape
  kh, kw, _, co = kernel.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
  ow = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros((n, oh, ow, co))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i * dilation:i * dilation + stride * (oh - 1) + 1:stride,
                 j * dilation:j * dilation + stride * (ow - 1) + 1:stride]
      out += patch @ kernel[i, j]
  return out if bias is None else out + bias


def np_conv_grads(x, kernel, grad, *, stride=1, padding=0, dilation=1):
  """Gradients (dx, dkernel) of sum(np_conv(x, kernel) * grad), tap by tap: the adjoint of the
  sums in np_conv (each output gathers patch @ kernel[i, j]; here each tap scatters back)."""
  n, h, w, _ = x.shape
  kh, kw, _, _ = kernel.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  _, oh, ow, _ = grad.shape
  dxp = np.zeros_like(xp)
  dk = np.zeros(kernel.shape)
  for i in range(kh):
    for j in range(kw):
      rows = slice(i * dilation, i * dilation + stride * (oh - 1) + 1, stride)
      cols = slice(j * dilation, j * dilation + stride * (ow - 1) + 1, stride)
      dk[i, j] = np.einsum('nhwc,nhwo->co', xp[:, rows, cols], grad)
      dxp[:, rows, cols] += grad @ kernel[i, j].T
  return dxp[:, padding:padding + h, padding:padding + w], dk


def np_max_pool_grad(x, grad, k, s, p, ceil_mode):
  """d(sum(max_pool(x) * grad))/dx with PyTorch's rule: each window's gradient goes to its first
  maximum in row-major order (CPU kernel: a later element wins only if strictly greater)."""
  n, h, w, c = x.shape
  out = np_pool(x, k, s, p, ceil_mode, 'max')
  dx = np.zeros_like(x)
  for b in range(n):
    for ch in range(c):
      for i in range(out.shape[1]):
        for j in range(out.shape[2]):
          best, where = -np.inf, None
          for r in range(i * s - p, i * s - p + k):
            for q in range(j * s - p, j * s - p + k):
              if 0 <= r < h and 0 <= q < w and x[b, r, q, ch] > best:
                best, where = x[b, r, q, ch], (r, q)
          dx[b, where[0], where[1], ch] += grad[b, i, j, ch]
  return dx


def np_batch_norm_eval(x, p, s, eps=1e-5):
  return (x - s['mean']) / np.sqrt(s['var'] + eps) * p['scale'] + p['bias']


def parse_state_dict_keys(path):
  """{name: shape} from a `name (d0, d1, ...)` or tab-separated key listing."""
  shapes = {}
  for line in open(path):
    line = line.strip()
    if not line:
      continue
    name, shape = line.replace('\t', ' ').split(' ', 1)
    shapes[name] = tuple(int(d) for d in shape.strip('() ').split(',') if d.strip())
  return shapes


def label_ids_to_train_ids(label_ids):
  """Cityscapes raw label ids [...] (any integer dtype) -> train ids [...] uint8, 255 = ignored;
  values outside 0..255 are ignored too. The table of skd-reference.md section 6, written out."""
  train_id = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
              25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
  label_ids = np.asarray(label_ids)
  out = np.full(label_ids.shape, 255, np.uint8)
  for label_id, t in train_id.items():
    out[label_ids == label_id] = t
  return out
