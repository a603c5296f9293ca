"""Runs a program (``python tests/fault_launcher.py skd_jax.main --flags ...``) with a fault.

A test aid that stays out of the package: before the program starts, it wraps the commit of
orbax's checkpoint folders (the rename of a finished temporary folder to its step folder,
`AtomicRenameTemporaryPath.finalize`), so that the process kills itself with SIGKILL, as
``kill -9`` would, at an exact moment:

    SKD_TEST_KILL_BEFORE_COMMIT=checkpoints/4   the step folder is written but not yet committed
    SKD_TEST_WAIT_FOR=best/4                    ... and first wait until this one has committed
    SKD_TEST_KILL_AFTER_COMMIT=checkpoints/6    right after that commit
    SKD_TEST_SLOW_COMMIT=2                      every commit waits this many seconds first

(folders named by the last two parts of their path). The program is otherwise untouched.
"""

import asyncio
import os
import pathlib
import runpy
import signal
import sys
import time

from orbax.checkpoint._src.path import atomicity

_commit = atomicity.AtomicRenameTemporaryPath.finalize


def _kill() -> None:
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


async def _finalize_with_faults(self):
  final = pathlib.Path(str(self._final_path))  # pylint: disable=protected-access
  name = '/'.join(final.parts[-2:])
  if name == os.environ.get('SKD_TEST_KILL_BEFORE_COMMIT'):
    wait_for = os.environ.get('SKD_TEST_WAIT_FOR')
    deadline = time.monotonic() + 60
    while wait_for and not (final.parent.parent / wait_for).exists():
      if time.monotonic() > deadline:
        raise RuntimeError(f'{wait_for} never committed')
      await asyncio.sleep(0.01)
    _kill()
  await asyncio.sleep(float(os.environ.get('SKD_TEST_SLOW_COMMIT', '0')))
  await _commit(self)
  if name == os.environ.get('SKD_TEST_KILL_AFTER_COMMIT'):
    _kill()


atomicity.AtomicRenameTemporaryPath.finalize = _finalize_with_faults

if __name__ == '__main__':
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # the checkout's skd_jax
  program = sys.argv[1]
  sys.argv = [program] + sys.argv[2:]
  runpy.run_module(program, run_name='__main__', alter_sys=True)
