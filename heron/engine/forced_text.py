"""The encoder of llguidance's forced text, in a child process that holds the tokenizer.

llguidance encodes the bytes a grammar forces (``{"name": "``, a constant, the rest of a
choice) with the model's tokenizer, and its masks depend on that encoding. For Gemma's 262,144
tokens that tokenizer takes ~95 MiB and ~1.6 s to load, holding the GIL all along: loaded in the
engine process at start it stays resident in every server, structured outputs used or not;
loaded there on the first constrained request it stalls every running stream for as long.
So it lives in a child process, started by the first compile (``StructuredOutputManager``),
whose load runs beside the step loop; a server that never constrains an output never starts
it::

    engine core process                                   child (this file, run as a script)
    llguidance -- text --> EncoderProcess -- JSON line -->  Tokenizer.from_file(tokenizer.json)
               <-- ids --                 <-- JSON line --  .encode(text).ids

The child imports only ``tokenizers`` (this file, run by path, imports nothing from heron). It
exits when its input closes: when the engine closes it or dies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_READY = "ready"


class EncoderProcess:
    """``encoder(text) -> token ids`` through the child process; ``start()`` starts it and
    waits for its tokenizer (a blocking read: other threads run meanwhile). Thread-safe."""

    def __init__(self, tokenizer_json: Path) -> None:
        self.tokenizer_json = tokenizer_json
        self._process: subprocess.Popen[str] | None = None
        self._stopper: weakref.finalize | None = None  # stops the child if this object goes
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        with self._lock:
            self._start()

    def __call__(self, text: str) -> list[int]:
        with self._lock:
            self._start()
            stdin, stdout = self._pipes()
            stdin.write(json.dumps(text) + "\n")
            stdin.flush()
            return list(json.loads(self._read(stdout)))

    def close(self) -> None:
        with self._lock:
            stopper, self._process, self._stopper = self._stopper, None, None
        if stopper is not None:
            stopper()  # _stop(process), once

    def _start(self) -> None:
        if self._process is not None:
            return
        isolated = ["-P"] if sys.version_info >= (3, 11) else []  # not this folder on sys.path
        self._process = subprocess.Popen(
            [sys.executable, *isolated, str(Path(__file__).resolve()), str(self.tokenizer_json)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")
        self._stopper = weakref.finalize(self, _stop, self._process)  # also at exit
        try:
            self._read(self._pipes()[1])  # the ready line, once the tokenizer is loaded
        except RuntimeError:
            self._stopper()
            self._process = self._stopper = None
            raise

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self._process is not None and self._process.stdin and self._process.stdout
        return self._process.stdin, self._process.stdout

    def _read(self, stdout: IO[str]) -> str:
        line = stdout.readline()
        if not line:
            code = self._process.poll() if self._process is not None else None
            raise RuntimeError(f"the tokenizer process for {self.tokenizer_json.name} ended "
                               f"(exit code {code}); see the log above")
        return line


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()  # the child exits at the end of its input
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def without_prepend(tokenizer: Tokenizer) -> Tokenizer:
    """llguidance drops a ``Prepend`` normalizer from a normalizer sequence before it encodes
    (grammar text is not the start of a prompt)."""
    from tokenizers import normalizers

    normalizer = tokenizer.normalizer
    if isinstance(normalizer, normalizers.Sequence):
        kept = [normalizer[i] for i in range(len(normalizer))
                if not isinstance(normalizer[i], normalizers.Prepend)]
        if len(kept) != len(normalizer):
            tokenizer.normalizer = normalizers.Sequence(kept)
    return tokenizer


def _child_main(tokenizer_json: str) -> None:
    """Load the tokenizer, say ready, then one JSON line of ids per JSON line of text."""
    from tokenizers import Tokenizer

    tokenizer = without_prepend(Tokenizer.from_file(tokenizer_json))
    _release_free_heap()
    print(_READY, flush=True)
    for line in sys.stdin:
        ids = tokenizer.encode(json.loads(line), add_special_tokens=False).ids
        print(json.dumps(ids), flush=True)


def _release_free_heap() -> None:
    """Parsing tokenizer.json leaves ~200 MiB of freed heap resident (see ``heron.heap``, which
    this script does not import): glibc's malloc_trim returns it."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


if __name__ == "__main__":
    _child_main(sys.argv[1])
