"""What the three programs (`skd_jax.main`, `skd_jax.evaluate`, `skd_jax.convert`) share.

The multi-host flags, starting `jax.distributed` before anything touches a device, quieter logs
from the storage libraries, and how a program ends on an error: an error the user can cause and
fix (a config, a flag, a file, a full or read-only disk, a non-finite value) ends it with exactly
one line on stderr, ``error: <what, where, and the fix>``, and exit status 1, without a traceback
(set ``SKD_JAX_TRACEBACK=1`` to see it as well). A preempted run ends with ``stopped: ...`` and
status 143. On several processes, every process prints its line and stops at once rather than
after the others time out.
"""

from __future__ import annotations

import errno
import io
import logging as logging_std
import os
import re
import sys
import threading
import traceback
import warnings
from typing import Any, Callable, Sequence

from absl import flags, logging
import jax

from skd_jax import checkpoint as ckpt_lib
from skd_jax import sharding

# Set (to anything but '' or 0) to print the traceback of an error above its one line.
TRACEBACK_ENV = 'SKD_JAX_TRACEBACK'
# The errors a user causes and fixes: their message says what and how (raised by skd_jax), or
# names the file (raised by the operating system).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, KeyError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def define_multihost_flags() -> None:
  """--distributed and the explicit --coordinator_address/--num_processes/--process_id."""
  flags.DEFINE_enum('distributed', 'auto', list(sharding.DISTRIBUTED_MODES),
                    'Start jax.distributed: auto (where the launcher shows several processes: a '
                    'Cloud TPU VM slice, Slurm, Open MPI, ...), on (always, with jax\'s own '
                    'cluster detection) or off.')
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-host without a detected launcher: HOST:PORT of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Multi-host: the number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index, 0 .. N-1.')


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax and tfds (their warnings and errors still show)."""

  def filter(self, record):
    return record.levelno > logging_std.INFO or not any(
        f'{os.sep}{lib}{os.sep}' in record.pathname
        for lib in ('orbax', 'tensorflow_datasets', 'etils'))


class _NoLibraryTracebacks(logging_std.Filter):
  """Drops the tracebacks that libraries log for an error that reaches the program anyway.

  A failed asynchronous checkpoint write (a full disk) makes orbax, tensorstore and clu log a
  traceback from each of their threads, hundreds of lines above the one line that says what
  happened; their messages stay (first line only). `SKD_JAX_TRACEBACK=1` keeps everything.
  """

  def filter(self, record):
    if (record.levelno >= logging_std.ERROR and record.exc_info
        and not os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)):
      record.exc_info = record.exc_text = None
      record.msg, record.args = record.getMessage().splitlines()[0], ()
    return True


class _DropClosedLoopTracebacks(io.TextIOBase):
  """sys.stderr, less the "RuntimeError: Event loop is closed" tracebacks of tensorstore.

  When an asynchronous checkpoint write fails (a full disk), orbax closes its event loop while
  tensorstore still completes the other writes' futures; each completion prints (PyErr_Print,
  into sys.stderr) a traceback of that RuntimeError, tens of them after the real error. Each
  thread's text is held from a "Traceback" line to the exception's line: dropped if that is the
  closed loop's, written out whole otherwise.
  """

  def __init__(self, stream):
    super().__init__()
    self._stream = stream
    self._held: dict[int, list[str]] = {}   # per thread: the lines of a traceback so far
    self._partial: dict[int, str] = {}      # per thread: the text after the last newline

  def write(self, text: str) -> int:
    thread = threading.get_ident()
    lines = (self._partial.pop(thread, '') + text).split('\n')
    if lines[-1]:
      self._partial[thread] = lines[-1]
    for line in lines[:-1]:
      self._line(thread, line + '\n')
    return len(text)

  def _line(self, thread: int, line: str) -> None:
    held = self._held.get(thread)
    if held is None:
      if line.startswith('Traceback (most recent call last):'):
        self._held[thread] = [line]
      else:
        self._stream.write(line)
      return
    held.append(line)
    if not line.startswith(' '):   # the exception's line ends the traceback
      del self._held[thread]
      if line.strip() != 'RuntimeError: Event loop is closed':
        self._stream.write(''.join(held))

  def flush(self) -> None:
    for thread in list(self._partial):
      if thread not in self._held:
        self._stream.write(self._partial.pop(thread))
    self._stream.flush()

  def fileno(self) -> int:
    return self._stream.fileno()

  def isatty(self) -> bool:
    return self._stream.isatty()


_quiet_process = False   # set by `quiet_library_errors`: this process is one of the programs


def quiet_library_errors() -> None:
  """For a program's process: `_QuietLibraries`, and unless SKD_JAX_TRACEBACK is set
  `_NoLibraryTracebacks` and `_DropClosedLoopTracebacks`."""
  global _quiet_process
  _quiet_process = True
  # On the loggers the libraries write to (absl's, which orbax and tfds use, and asyncio's),
  # whichever handler prints them (absl's in the absl programs, Python's last resort in convert).
  for logger in (logging_std.getLogger('absl'), logging_std.getLogger('asyncio')):
    logger.addFilter(_QuietLibraries())
    if not _show_traceback():
      logger.addFilter(_NoLibraryTracebacks())
  if not _show_traceback():
    sys.stderr = _DropClosedLoopTracebacks(sys.stderr)


# ---------------------------------------------------------------------------------------------
# One line per error.


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from or during, outermost first."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def _errno_in(chain: Sequence[BaseException], code: int, text: str) -> BaseException | None:
  """The first exception of `chain` with OS error `code`, or whose message contains `text`."""
  for e in chain:
    if getattr(e, 'errno', None) == code or text.lower() in str(e).lower():
      return e
  return None


def _file_of(error: BaseException) -> str:
  """' (the file)' that `error` names, or ''."""
  name = getattr(error, 'filename', None)
  if name:
    return f' ({name})'
  # Libraries that put the path in the text: tensorstore's 'local file "/path"', or any
  # absolute path after a space or a quote.
  text = str(error)
  match = (re.search(r'local file "([^"]+)"', text)
           or re.search(r"""(?:^|[\s"'(])(/[^\s'":]+)""", text))
  return f' ({match[1]})' if match else ''


def _raised_in_package(error: BaseException) -> bool:
  """Whether `error` was raised by skd_jax's own code (whose messages name input and fix)."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIR)


def error_line(error: BaseException) -> str | None:
  """The one line a program ends with on `error`, or None for an error that is not the user's.

  A full disk and a read-only one are recognised wherever they surface (an OSError, or the
  message of an orbax / tensorstore / TensorFlow error that wraps one).
  """
  chain = _chain(error)
  if isinstance(error, ckpt_lib.Preempted):
    return f'stopped: {error}'
  if isinstance(error, KeyboardInterrupt):
    return 'stopped: interrupted; the checkpoints written so far are intact: run the same ' \
           'command again to resume.'
  full = _errno_in(chain, errno.ENOSPC, 'No space left on device')
  if full is not None:
    return (f'error: no space left on the device being written{_file_of(full)}: free space '
            'there or give a --workdir / --out on a larger disk (the checkpoints that had '
            'completed are intact: a training run resumes from the last).')
  read_only = _errno_in(chain, errno.EROFS, 'Read-only file system')
  if read_only is not None:
    return (f'error: cannot write to a read-only file system{_file_of(read_only)}: give a '
            'writable --workdir / --out.')
  if isinstance(error, PermissionError):
    return (f'error: permission denied{_file_of(error)}: give a --workdir / --out this user '
            'can write to, or fix the permissions.')
  if isinstance(error, KeyError) and not _raised_in_package(error):
    return None
  if isinstance(error, USER_ERRORS):
    line = f'error: {ckpt_lib.one_line(error, limit=2000)}'
    if not _raised_in_package(error):
      line += f' (raised in a library; {TRACEBACK_ENV}=1 shows where)'
    return line
  return None


def _show_traceback() -> bool:
  return os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def end_on_error(error: BaseException) -> None:
  """Ends the program on `error`: one line for a user's error (`error_line`), else re-raises."""
  line = error_line(error)
  distributed = jax.distributed.is_initialized()
  if line is None:
    if not distributed:
      raise error
    logging.exception('process %d of %d failed', jax.process_index(), jax.process_count())
    _exit_now(1)
  if _show_traceback():
    traceback.print_exception(error)
  elif _quiet_process:
    # What the threads, futures and coroutines of a failed orbax save still say on the way out,
    # after the line: the other writes' errors, asyncio's "Future exception was never
    # retrieved", "coroutine ... was never awaited". The program is ending: nothing else to log.
    for name in ('absl', 'asyncio'):
      logging_std.getLogger(name).disabled = True
    warnings.simplefilter('ignore')
  print(line, file=sys.stderr, flush=True)
  code = getattr(error, 'exit_code', 130 if isinstance(error, KeyboardInterrupt) else 1)
  if distributed:
    _exit_now(code)
  sys.exit(code)


def run_with_one_line_errors(program: Callable[[], Any]) -> Any:
  """Runs `program`; an error a user can cause ends the process with its one line."""
  try:
    return program()
  except BaseException as e:  # pylint: disable=broad-except
    if isinstance(e, SystemExit):
      raise
    end_on_error(e)


# ---------------------------------------------------------------------------------------------
# Flags.


def _config_error(error: BaseException, argv: Sequence[str]) -> str:
  """The line of a --config file that does not load, or of a --config.KEY override that fails."""
  text = str(error)
  paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  if 'Failed loading config file' in text or 'Configuration is not available' in text:
    path = paths[0] if paths else '?'
    reason = text.strip().splitlines()[-1].strip()
    if not os.path.exists(path):
      return (f'error: --config={path}: no such file (from {os.getcwd()}): give the path of a '
              'config file, e.g. configs/cityscapes.py.')
    return f'error: --config={path} does not load: {reason}'
  key = re.search(r"'([^'\\]+)\\?'", text)   # KeyError("'lamda_pa'\nDid you mean ...")
  key = key[1] if key else text
  overrides = [a for a in argv if a.startswith('--config.') and key in a.split('=')[0]]
  hint = re.search(r'Did you mean "([^"]+)"', text)
  flag = overrides[0].split('=')[0] if overrides else '--config.' + key
  return (f'error: {flag}: {paths[0] if paths else "the config"} has no key {key!r}'
          + (f'; did you mean "{hint[1]}"?' if hint else '; see the config file for its keys.'))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for `app.run(flags_parser=...)`) whose errors end in one line.

  The config file is loaded here too (ml_collections defers its errors to the first use): a
  missing or broken config file and a misspelt override (``--config.loss.lamda_pa``) are one
  line each, with ml_collections' suggestion.
  """
  fl = flags.FLAGS
  try:
    rest = fl(argv)
    if 'config' in fl and fl['config'].present:
      fl.config.keys()   # raises the deferred error of a config file that did not load
    return rest
  except flags.Error as e:
    message = f'error: {ckpt_lib.one_line(e, limit=2000)}'
  except (AttributeError, KeyError, OSError) as e:   # from ml_collections' config_flags
    if not any(a.startswith('--config') for a in argv):
      raise
    message = _config_error(e, argv)
  if _show_traceback():
    traceback.print_exc()
  print(message, file=sys.stderr, flush=True)
  sys.exit(1)


# ---------------------------------------------------------------------------------------------
# The programs' common start.


def run(program: Callable[[], None]) -> None:
  """Runs ``program`` in this process of a (possibly multi-host) launch; for `absl.app` mains."""
  quiet_library_errors()
  fl = flags.FLAGS
  try:
    sharding.initialize_distributed(mode=fl.distributed, coordinator_address=fl.coordinator_address,
                                    num_processes=fl.num_processes, process_id=fl.process_id)
  except ValueError as e:   # contradictory or incomplete multi-host flags
    raise SystemExit(f'error: {e}') from None
  logging.info('JAX process %d of %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  run_with_one_line_errors(program)


def _exit_now(code: int) -> None:
  # A normal exit would wait (5 minutes by default) at jax.distributed's shutdown barrier for
  # processes that are themselves blocked waiting for this one: stop now, with the error, and let
  # the launcher and the coordination service end the others.
  logging.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
