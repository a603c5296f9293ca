"""Reading PyTorch ``.pth`` files into NumPy, without PyTorch and without running pickled code.

    state_dict = load_torch_state_dict('resnet18-imagenet.pth')   # {'conv1.weight': ndarray, ...}

Two container formats are read:
  - the zip format of ``torch.save`` (PyTorch >= 1.6): ``<archive>/data.pkl`` (the pickled object
    graph), ``<archive>/data/<key>`` (one raw storage per key) and ``<archive>/byteorder``;
  - the legacy format (PyTorch < 1.6, or ``_use_new_zipfile_serialization=False``; e.g. the CSAIL
    ImageNet ResNets and the SKD reference checkpoints): a stream of pickles (magic number, protocol
    version, system info, the object graph, the list of storage keys), then each storage as an
    int64 element count followed by its raw bytes.

The object graph is unpickled by `RestrictedUnpickler`, whose ``find_class`` admits only what
rebuilding tensors and (ordered) dicts needs, each mapped to a NumPy re-implementation here
(never to PyTorch's function of that name); every other global -- ``os.system``, ``builtins.eval``,
``argparse.Namespace`` -- is refused with an `UnsafeCheckpointError` naming it. Tensors come back as
NumPy arrays (storage offset, shape and strides respected; float32/16/64, bfloat16 via ml_dtypes,
integer and bool dtypes), Parameters as their data.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping

import ml_dtypes
import numpy as np

PathLike = str | os.PathLike

# The legacy format starts with this pickled integer (torch/serialization.py: MAGIC_NUMBER).
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> element dtype (little-endian; byte-swapped on read when the file says big).
STORAGE_DTYPES: dict[str, np.dtype] = {
    'DoubleStorage': np.dtype('<f8'),
    'FloatStorage': np.dtype('<f4'),
    'HalfStorage': np.dtype('<f2'),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
    'ShortStorage': np.dtype('<i2'),
    'CharStorage': np.dtype('i1'),
    'ByteStorage': np.dtype('u1'),
    'BoolStorage': np.dtype('?'),
    'ComplexFloatStorage': np.dtype('<c8'),
    'ComplexDoubleStorage': np.dtype('<c16'),
    # Untyped storages (``_rebuild_tensor_v3`` passes the dtype separately).
    'UntypedStorage': np.dtype('u1'),
}

# torch.<dtype> globals, as pickled by ``_rebuild_tensor_v3`` (PyTorch >= 2.1 for the dtypes that
# have no typed storage, e.g. uint16).
TORCH_DTYPES: dict[str, np.dtype] = {
    'float64': np.dtype('<f8'), 'double': np.dtype('<f8'),
    'float32': np.dtype('<f4'), 'float': np.dtype('<f4'),
    'float16': np.dtype('<f2'), 'half': np.dtype('<f2'),
    'bfloat16': np.dtype(ml_dtypes.bfloat16),
    'int64': np.dtype('<i8'), 'long': np.dtype('<i8'),
    'int32': np.dtype('<i4'), 'int': np.dtype('<i4'),
    'int16': np.dtype('<i2'), 'short': np.dtype('<i2'),
    'int8': np.dtype('i1'),
    'uint8': np.dtype('u1'), 'uint16': np.dtype('<u2'), 'uint32': np.dtype('<u4'),
    'uint64': np.dtype('<u8'),
    'bool': np.dtype('?'),
    'complex64': np.dtype('<c8'), 'complex128': np.dtype('<c16'),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
}


class CheckpointError(ValueError):
  """A file that is not a readable PyTorch checkpoint (truncated, corrupt, or something else)."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
  """The checkpoint's pickle references a global outside the allow-list (it was not called)."""

  def __init__(self, path: str, global_name: str):
    self.global_name = global_name
    super().__init__(
        f'{path}: refusing to unpickle the global {global_name!r}: only tensors, storages and '
        '(ordered) dicts are rebuilt from a checkpoint, and this name is none of them. Nothing in '
        'the file was executed. If you trust the file, re-save its state_dict with PyTorch '
        '(torch.save(model.state_dict(), path)).')


class _StorageType:
  """Stands for ``torch.<Name>Storage`` in an unpickled graph: just the element dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f'torch.{self.name}'


class _Storage:
  """A storage read from the file: its elements as a flat native-endian array.

  `raw_big_endian` is kept for untyped storages (uint8 bytes here), whose element type is only
  known when a tensor is rebuilt from them.
  """

  def __init__(self, data: np.ndarray, raw_big_endian: bool = False):
    self.data = data
    self.raw_big_endian = raw_big_endian


def _element_view(storage: _Storage, dtype: np.dtype) -> np.ndarray:
  """The storage's bytes as `dtype` elements (untyped storages of ``_rebuild_tensor_v3``)."""
  flat = storage.data
  if flat.dtype == dtype:
    return flat
  raw = flat.view(np.uint8)
  if raw.size % dtype.itemsize:
    raise CheckpointError(f'storage of {raw.size} bytes is not a whole number of {dtype} elements')
  if storage.raw_big_endian and dtype.itemsize > 1:
    return raw.view(dtype.newbyteorder('>')).astype(dtype)
  return raw.view(dtype)


def _strided(flat: np.ndarray, offset: int, size, stride) -> np.ndarray:
  """``flat[offset:]`` viewed with PyTorch's element strides, bounds-checked, copied out."""
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise CheckpointError(f'invalid tensor geometry: size {size}, stride {stride}')
  if offset < 0:
    raise CheckpointError(f'negative storage offset {offset}')
  if 0 in size:
    return np.zeros(size, flat.dtype)
  # as_strided does no bounds checking: a corrupt file must not make it read past the buffer.
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise CheckpointError(
        f'tensor of size {size}, stride {stride} at offset {offset} reads element {last} of a '
        f'storage of {flat.size} elements (truncated or corrupt file)')
  base = flat[offset:]
  view = np.lib.stride_tricks.as_strided(
      base, shape=size, strides=tuple(s * flat.itemsize for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  """``torch._utils._rebuild_tensor`` / ``_rebuild_tensor_v2``: a tensor from a typed storage."""
  if not isinstance(storage, _Storage):
    raise CheckpointError(f'tensor rebuilt from {type(storage).__name__}, not a storage')
  return _strided(storage.data, int(storage_offset), size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, *unused) -> np.ndarray:
  """``torch._utils._rebuild_tensor_v3``: a tensor from an untyped storage and a dtype."""
  if not isinstance(storage, _Storage) or not isinstance(dtype, np.dtype):
    raise CheckpointError('malformed _rebuild_tensor_v3 call')
  return _strided(_element_view(storage, dtype), int(storage_offset), size, stride)


def _rebuild_parameter(data, *unused) -> np.ndarray:
  """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is just its data here."""
  return data


# (module, name) -> what the restricted unpickler returns for it. Everything else is refused.
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    # Harmless value constructors that appear in wrapped checkpoints' metadata.
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('builtins', 'bytearray'): bytearray,
    ('__builtin__', 'set'): set,
    ('__builtin__', 'frozenset'): frozenset,
}
_SAFE_GLOBALS.update({('torch', n): _StorageType(n) for n in STORAGE_DTYPES})
# Checkpoints saved from GPU tensors by old PyTorch name the CUDA storage types.
_SAFE_GLOBALS.update({('torch.cuda', n): _StorageType(n) for n in STORAGE_DTYPES
                      if n != 'UntypedStorage'})
_SAFE_GLOBALS.update({('torch', n): d for n, d in TORCH_DTYPES.items()})
# Untyped storages (``_rebuild_tensor_v3``) are pickled under their defining module.
_SAFE_GLOBALS[('torch.storage', 'UntypedStorage')] = _StorageType('UntypedStorage')


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only `_SAFE_GLOBALS` and hands storages to `load_storage`.

  Args:
    file: the pickle stream.
    path: the checkpoint's name, for error messages.
    load_storage: called with the persistent id tuple of each ``('storage', ...)`` reference
      (without its leading 'storage'); returns a `_Storage`.
    rebuild_tensors: False makes the tensor-rebuild globals return None (a dry run that only
      collects the storage references, for the legacy format whose storages follow the pickle).
  """

  def __init__(self, file: BinaryIO, path: str,
               load_storage: Callable[[tuple], Any] | None = None, rebuild_tensors: bool = True):
    super().__init__(file, encoding='latin1')  # Python-2-era pickles hold byte strings.
    self._path = path
    self._load_storage = load_storage
    self._rebuild_tensors = rebuild_tensors

  def find_class(self, module: str, name: str) -> Any:
    try:
      obj = _SAFE_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(self._path, f'{module}.{name}') from None
    if not self._rebuild_tensors and obj in (_rebuild_tensor, _rebuild_tensor_v3):
      return _dry_rebuild
    return obj

  def persistent_load(self, pid: Any) -> Any:
    if self._load_storage is None or not isinstance(pid, tuple) or not pid:
      raise CheckpointError(f'{self._path}: unexpected persistent reference {pid!r}')
    typename = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if typename != 'storage':
      raise CheckpointError(f'{self._path}: unsupported persistent reference type {typename!r}')
    return self._load_storage(pid[1:])


def _dry_rebuild(*unused) -> None:
  return None


def _storage_type(obj: Any, path: str) -> _StorageType:
  if not isinstance(obj, _StorageType):
    raise CheckpointError(f'{path}: storage reference with type {obj!r}, not a torch storage type')
  return obj


def _read_zip(path: str, zf: zipfile.ZipFile) -> Any:
  """Unpickles ``torch.save``'s zip format."""
  names = zf.namelist()
  pkl = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
  if len(pkl) != 1:
    raise CheckpointError(
        f'{path}: a zip file but not a PyTorch checkpoint (no single */data.pkl among '
        f'{len(names)} entries)')
  prefix = pkl[0][:-len('data.pkl')]
  byteorder = 'little'
  if f'{prefix}byteorder' in names:
    byteorder = zf.read(f'{prefix}byteorder').decode('ascii').strip()
    if byteorder not in ('little', 'big'):
      raise CheckpointError(f'{path}: unknown byteorder {byteorder!r}')
  cache: dict[str, _Storage] = {}

  def load_storage(pid: tuple) -> _Storage:
    if len(pid) < 4:
      raise CheckpointError(f'{path}: malformed storage reference {pid!r}')
    storage_type, key, _, numel = pid[:4]
    dtype = _storage_type(storage_type, path).dtype
    key = str(key)
    if key not in cache:
      entry = f'{prefix}data/{key}'
      try:
        raw = zf.read(entry)
      except KeyError:
        raise CheckpointError(f'{path}: storage {entry} is missing (truncated file?)') from None
      if storage_type.name == 'UntypedStorage':
        nbytes = int(numel)
      else:
        nbytes = int(numel) * dtype.itemsize
      if len(raw) < nbytes:
        raise CheckpointError(
            f'{path}: storage {entry} has {len(raw)} bytes, expected {nbytes} (truncated file?)')
      big = byteorder == 'big'
      data = np.frombuffer(raw, dtype.newbyteorder('>') if big else dtype,
                           count=nbytes // dtype.itemsize)
      cache[key] = _Storage(data.astype(dtype) if big else data, raw_big_endian=big)
    return cache[key]

  with zf.open(pkl[0]) as f:
    return RestrictedUnpickler(f, path, load_storage).load()


def _read_legacy(path: str, f: BinaryIO) -> Any:
  """Unpickles the pre-1.6 format (a stream of pickles followed by raw storages)."""
  try:
    magic = RestrictedUnpickler(f, path).load()
  except UnsafeCheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Any failure to read the first pickle means "not a torch file", not a corrupt one.
    raise CheckpointError(
        f'{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy '
        f'torch.save stream: {type(e).__name__}: {e})') from None
  if magic != LEGACY_MAGIC_NUMBER:
    raise CheckpointError(
        f"{path}: not a PyTorch checkpoint (a pickle, but without torch.save's magic number)")
  version = RestrictedUnpickler(f, path).load()
  if version != LEGACY_PROTOCOL_VERSION:
    raise CheckpointError(f'{path}: unsupported legacy torch.save protocol version {version!r}')
  sys_info = RestrictedUnpickler(f, path).load()
  if isinstance(sys_info, dict) and not sys_info.get('little_endian', True):
    raise CheckpointError(f'{path}: big-endian legacy checkpoints are not supported')

  # The storages' bytes follow the object graph, so read the graph twice: a dry run that collects
  # the storage references and finds where the graph ends, then the real one.
  graph_start = f.tell()
  roots: dict[str, tuple[np.dtype, int]] = {}   # root key -> (dtype, numel)
  views: dict[str, tuple[str, int, int]] = {}   # view key -> (root key, element offset, size)

  def parse(pid: tuple) -> tuple[str, str]:
    if len(pid) < 5:
      raise CheckpointError(f'{path}: malformed legacy storage reference {pid!r}')
    storage_type, root_key, _, numel, view_metadata = pid[:5]
    root_key = str(root_key)
    roots.setdefault(root_key, (_storage_type(storage_type, path).dtype, int(numel)))
    if view_metadata is None:
      return root_key, root_key
    view_key, offset, size = view_metadata
    views[str(view_key)] = (root_key, int(offset), int(size))
    return root_key, str(view_key)

  RestrictedUnpickler(f, path, parse, rebuild_tensors=False).load()
  keys = RestrictedUnpickler(f, path).load()
  if not isinstance(keys, list):
    raise CheckpointError(f'{path}: malformed legacy checkpoint (no storage key list)')
  storages: dict[str, _Storage] = {}
  for key in keys:
    key = str(key)
    if key not in roots:
      raise CheckpointError(f'{path}: storage {key} is listed but never referenced')
    dtype, numel = roots[key]
    header = f.read(8)
    if len(header) < 8:
      raise CheckpointError(f'{path}: truncated file (storage {key} is missing)')
    (count,) = struct.unpack('<q', header)
    if count != numel:
      raise CheckpointError(f'{path}: storage {key} has {count} elements, expected {numel}')
    raw = f.read(count * dtype.itemsize)
    if len(raw) < count * dtype.itemsize:
      raise CheckpointError(f'{path}: truncated file (storage {key} has {len(raw)} of '
                            f'{count * dtype.itemsize} bytes)')
    storages[key] = _Storage(np.frombuffer(raw, dtype))
  missing = sorted(set(roots) - set(storages))
  if missing:
    raise CheckpointError(f'{path}: truncated file (storages {missing} are missing)')
  for view_key, (root, offset, size) in views.items():
    storages[view_key] = _Storage(storages[root].data[offset:offset + size])

  f.seek(graph_start)
  return RestrictedUnpickler(f, path, lambda pid: storages[parse(pid)[1]]).load()


def _with_path(error: CheckpointError, path: str) -> CheckpointError:
  """`error`, its message prefixed with the file name if it lacks it (tensor rebuild errors do)."""
  if str(error).startswith(path):
    return error
  return CheckpointError(f'{path}: {error}')


def read_torch_file(path: PathLike) -> Any:
  """Unpickles a ``torch.save`` file safely; tensors become NumPy arrays.

  Raises:
    FileNotFoundError: no such file.
    UnsafeCheckpointError: the pickle names a global outside the allow-list.
    CheckpointError: the file is truncated, corrupt, or not a PyTorch checkpoint.
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    head = f.read(4)
    f.seek(0)
    if head == b'PK\x03\x04' or zipfile.is_zipfile(f):
      f.seek(0)
      try:
        with zipfile.ZipFile(f) as zf:
          return _read_zip(path, zf)
      except (zipfile.BadZipFile, EOFError, struct.error, zipfile.LargeZipFile) as e:
        raise CheckpointError(f'{path}: truncated or corrupt zip archive ({e})') from None
      except CheckpointError as e:
        raise _with_path(e, path) from None
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f'{path}: corrupt PyTorch checkpoint ({type(e).__name__}: {e})'
                              ) from None
    f.seek(0)
    try:
      return _read_legacy(path, f)
    except CheckpointError as e:
      raise _with_path(e, path) from None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'{path}: truncated or corrupt legacy PyTorch checkpoint ({type(e).__name__}: {e})'
      ) from None


# Keys under which training scripts wrap a model's state_dict (tried in this order).
WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'net')


def unwrap_state_dict(obj: Any, path: str = '<checkpoint>') -> dict[str, np.ndarray]:
  """The model's flat ``{name: array}`` from a loaded checkpoint.

  Accepts a plain state_dict, one wrapped as ``{'state_dict': ...}`` / ``{'model': ...}`` (also
  nested, e.g. a training checkpoint holding the optimizer too), and strips a ``module.`` prefix
  (``nn.DataParallel``) when every key carries it. Non-array entries of the state_dict (scalars a
  script stored beside the tensors) are dropped.

  Raises:
    CheckpointError: no state_dict of arrays could be found.
  """
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in WRAPPER_KEYS
                  if isinstance(obj.get(k), Mapping) and obj[k]), None)
    if inner is None or any(isinstance(v, np.ndarray) for v in obj.values()):
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise CheckpointError(
        f'{path}: not a state_dict: the checkpoint holds a {type(obj).__name__}')
  tensors = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not tensors:
    raise CheckpointError(
        f'{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:10]}); expected a '
        "state_dict, possibly wrapped as {'state_dict': ...} or {'model': ...}")
  while all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
  return tensors


def load_torch_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """`read_torch_file` + `unwrap_state_dict`: the model's ``{name: array}`` of a ``.pth`` file."""
  return unwrap_state_dict(read_torch_file(path), os.fspath(path))
