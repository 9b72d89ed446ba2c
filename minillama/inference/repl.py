"""The chat REPL's terminal: line editing and history (readline), multi-line input, commands, and a Ctrl-C that
stops the answer in progress instead of the chat, under plain python and under torchrun alike.

Ctrl-C is read as a key, not a signal. Under torchrun each worker runs in its own session, so the terminal's SIGINT
goes to torchrun's agent, which forwards it and SIGKILLs the worker ~30 s later, whatever the worker does; and
under plain python a SIGINT that lands while readline waits is sometimes not seen until the next key (measured:
about one Ctrl-C in two at the prompt after an interrupted answer). So when rank 0 reads a terminal it takes the
terminal's interrupt key away (termios VINTR; readline turns ISIG back on at each prompt, so ISIG alone would not
do) and reads Ctrl-C as the byte 0x03: between decode steps while answering, and through a readline binding at the
prompt. The cache is never left half-written: an answer stops between steps. A second Ctrl-C (at the prompt, or
twice while answering) quits without a traceback. Without a terminal (a pipe), SIGINT stops an answer the same way.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

CTRL_C = "\x03"
BLOCK = '"""'
HISTORY = Path(os.environ.get("MINILLAMA_HISTORY", Path.home() / ".cache" / "minillama" / "chat_history"))

HELP = f"""commands:
  /help          this list
  /system TEXT   set the system prompt (the conversation goes on); /system shows it, /system - removes it
  /reset         forget the conversation (the system prompt stays)
  /exit          quit (also Ctrl-D, or Ctrl-C at the prompt)
input: a line ending in \\ goes on on the next line; {BLOCK} alone on a line starts and ends a block (a paste
of several lines arrives whole). Ctrl-C while the model answers stops the answer."""


class Terminal:
    """Rank 0's input side of the chat; other ranks never touch the terminal."""

    def __init__(self, is_rank0: bool):
        self.rank0 = is_rank0
        self.tty = is_rank0 and sys.stdin.isatty()
        self.keys = self.tty  # Ctrl-C read as a key, not a signal (see above)
        self.fd = sys.stdin.fileno() if self.tty else None
        self.flag = False
        self._saved = None
        if not is_rank0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when an answer stops
            return
        if self.tty:
            self._setup_readline()
        if self.keys:
            import termios
            self._saved = termios.tcgetattr(self.fd)
            atexit.register(self.restore)
            self._set_lflag(clear=0)

    # ---- reading a message ----
    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # no GNU readline (e.g. some minimal builds): plain input() still works
            self.readline = None
            return
        self.readline = readline
        readline.parse_and_bind("set enable-bracketed-paste on")  # a multi-line paste arrives as one input
        if self.keys:  # no interrupt key: Ctrl-C ends the line with a 0x03 in it, which read() takes as Ctrl-C
            readline.parse_and_bind(r'"\C-c": "\C-e\C-v\C-c\C-m"')
        try:
            readline.read_history_file(HISTORY)
        except OSError:
            pass
        readline.set_history_length(1000)
        atexit.register(self._save_history)

    def _save_history(self) -> None:
        try:
            HISTORY.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(HISTORY)
        except OSError:
            pass

    def _line(self, prompt: str) -> Optional[str]:
        """One line without its newline; None at end of input. KeyboardInterrupt for Ctrl-C."""
        if not self.tty:
            raw = sys.stdin.readline()
            return raw.rstrip("\r\n") if raw else None
        try:
            line = input(prompt)
        except EOFError:
            print(flush=True)  # Ctrl-D: leave the shell on a fresh line
            return None
        if CTRL_C in line:
            raise KeyboardInterrupt
        return line

    def read(self) -> Optional[str]:
        """The next message (multi-line joined with newlines); None to quit (end of input, Ctrl-D, Ctrl-C)."""
        try:
            first = self._line("> ")
            if first is None:
                return None
            if first.strip() == BLOCK:
                lines = []
                while (line := self._line("... ")) is not None and line.strip() != BLOCK:
                    lines.append(line)
                return "\n".join(lines)
            lines = [first]
            while lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                line = self._line("... ")
                if line is None:
                    break
                lines.append(line)
            return "\n".join(lines)
        except KeyboardInterrupt:
            if self.tty:
                print(flush=True)
            return None

    # ---- while the model answers ----
    @contextmanager
    def answering(self):
        """Ctrl-C sets the interrupt flag (a second one, before it is seen, quits)."""
        self.flag = False
        if not self.rank0:
            yield
            return
        if self.keys:
            import termios
            self._set_lflag(clear=termios.ICANON | termios.ECHO)
            try:
                yield
            finally:
                termios.tcflush(self.fd, termios.TCIFLUSH)  # keys typed during the answer are not the next message
                self._set_lflag(clear=0)
            return

        def on_sigint(signum, frame):
            if self.flag:
                raise KeyboardInterrupt
            self.flag = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def interrupted(self) -> bool:
        """Rank 0: was Ctrl-C pressed since the answer began? (checked between decode steps)"""
        if self.keys and select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 1024)
            if data.count(CTRL_C.encode()) > 1 or (self.flag and CTRL_C.encode() in data):
                raise KeyboardInterrupt
            self.flag = self.flag or CTRL_C.encode() in data
        return self.flag

    # ---- the terminal's modes ----
    def _set_lflag(self, clear: int) -> None:
        """The saved terminal settings with these local-mode bits off and no interrupt key (Ctrl-C is a byte)."""
        import termios
        attrs = [list(a) if isinstance(a, list) else a for a in self._saved]
        attrs[3] &= ~clear
        attrs[6][termios.VINTR] = os.fpathconf(self.fd, "PC_VDISABLE")
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def restore(self) -> None:
        if self._saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)


def dim(text: str) -> str:
    """Faint text on a terminal (the stats line), plain text in a pipe."""
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text
