"""One-line messages about what a user gave, as the CLI and dataset_builder print them."""

import argparse


def shown(text: str) -> str:
    """`text` on one line: control characters and undecodable bytes of file names as escapes (\\n, \\x01, \\udcff)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {shown(message)}\n")


def number_in(kind, low, high=None, high_open=False):
    """An argparse `type` for a `kind` (int or float) between `low` and `high` (excluded when `high_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        too_high = value is not None and high is not None and (value >= high if high_open else value > high)
        if value is None or value != value or value < low or too_high:
            if kind is int and low == 1 and high is None:
                wanted = "a positive integer"
            else:
                upper = "" if high is None else f" and {'below' if high_open else 'at most'} {high}"
                wanted = f"{'a whole number' if kind is int else 'a number'} of at least {low}{upper}"
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse
