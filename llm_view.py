"""How llm.py shows an answer: Markdown rendered in the terminal (rich), or the text exactly as it streams.

Both views are driven from one thread (the one that reads the keyboard), so after Ctrl-C (`stop`) nothing
more of the answer is shown.
"""
import sys

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.spinner import Spinner
from rich.text import Text


def settled(text: str) -> int:
    """Where the answer's finished Markdown blocks end: after the last blank line outside a code block,
    or after a closed code block. What follows may still change as more text comes."""
    end = position = 0
    inside_code = False
    for line in text.splitlines(keepends=True):
        position += len(line)
        if not line.endswith("\n"):
            break  # the line being written
        if line.lstrip().startswith("```"):
            inside_code = not inside_code
            if not inside_code:
                end = position
        elif not inside_code and not line.strip():
            end = position
    return end


class PlainView:
    """The text as it streams, byte for byte: for pipes, files and --plain."""

    def __init__(self):
        self.stopped = False
        self.shown = False

    def status(self, text: str) -> None:
        print(f"\r[{text}]", file=sys.stderr, flush=True)

    def add(self, piece: str) -> None:
        if not self.stopped:
            sys.stdout.write(piece)
            sys.stdout.flush()
            self.shown = True

    def stop(self) -> None:
        self.stopped = True

    def finish(self, footer: str | None = None) -> None:
        self.stop()
        if self.shown or footer:
            print(flush=True)
        if footer:
            print(footer, flush=True)


class MarkdownView:
    """Finished blocks are printed once, as Markdown; the block being written is redrawn below them.
    Until the first piece comes, a spinner shows what the answer waits for (the queue position)."""

    def __init__(self, console: Console):
        self.console = console
        self.text = ""
        self.printed = 0  # how much of text is printed for good
        self.stopped = False
        self.live = Live(self._spinner("waiting for the answer"), console=console, transient=True,
                         refresh_per_second=12)
        self.live.start()

    @staticmethod
    def _spinner(text: str) -> Spinner:
        return Spinner("dots", Text(text, style="dim"))

    def status(self, text: str) -> None:
        if self.stopped or self.text:
            self.console.print(Text(f"[{text}]", style="dim"))
        else:
            self.live.update(self._spinner(text), refresh=True)

    def add(self, piece: str) -> None:
        if self.stopped:
            return
        self.text += piece
        end = settled(self.text)
        if end > self.printed:
            self.live.console.print(Markdown(self.text[self.printed:end]))
            self.printed = end
        self.live.update(Markdown(self.text[self.printed:]))

    def stop(self) -> None:
        """Show nothing more: the unfinished block is printed as it stands."""
        if self.stopped:
            return
        self.stopped = True
        self.live.stop()
        if self.text[self.printed:].strip():
            self.console.print(Markdown(self.text[self.printed:]))

    def finish(self, footer: str | None = None) -> None:
        self.stop()
        if footer:
            self.console.print(Text(footer, style="dim"))


def make_view(plain: bool, console: Console | None = None):
    """Markdown on a terminal; the plain text where asked (--plain) or where stdout is a pipe or a file."""
    if plain or not sys.stdout.isatty():
        return PlainView()
    return MarkdownView(console or Console())
