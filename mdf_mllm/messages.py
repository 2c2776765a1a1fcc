"""One-line messages about what a user gave, as the CLI and dataset_builder print them."""

import argparse
import copy
import sys


def shown(text: str) -> str:
    """`text` on one line: control characters and undecodable bytes of file names as escapes (\\n, \\x01, \\udcff)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def underscored(option: str) -> str:
    """A long option in the one spelling the commands show: "--top-k" -> "--top_k" (as train_hf.py's options are,
    which come from HfArgumentParser and TrainingArguments). Anything else is returned as it is."""
    return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


class OneStyleHelpFormatter(argparse.HelpFormatter):
    """Help that lists a long option once, with underscores: HfArgumentParser registers `--data_dir` and its
    hyphenated alias `--data-dir` side by side; the alias is still accepted, only not shown."""

    def _format_action_invocation(self, action):
        aliases = {o for o in action.option_strings if o != underscored(o) and underscored(o) in action.option_strings}
        options = [o for o in action.option_strings if o not in aliases]
        if options != action.option_strings:
            action = copy.copy(action)
            action.option_strings = options
        return super()._format_action_invocation(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block), exit status 2, and whose long options have one
    spelling, with underscores (`--top_k`, as train_hf.py's), in help and errors; the hyphenated spelling (`--top-k`)
    is accepted too (`=value` and abbreviations included), in subcommands as well."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {shown(message)}\n")

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*map(underscored, names), **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._underscored(args), namespace)

    def _underscored(self, args: list[str]) -> list[str]:
        """`args` with each hyphenated long option of this parser in its underscore spelling; the rest (values, a
        subcommand's options, everything after `--`) untouched: a subcommand's parser spells its own."""
        spelled = []
        for index, arg in enumerate(args):
            if arg == "--":
                return spelled + args[index:]
            name, equals, value = arg.partition("=")
            if name.startswith("--") and "-" in name[2:]:
                candidate = underscored(name)
                if any(option.startswith(candidate) for option in self._option_string_actions):
                    arg = candidate + equals + value
            spelled.append(arg)
        return spelled


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
