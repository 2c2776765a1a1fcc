"""One-line messages about what a user gave, as the CLI and dataset_builder print them."""


def shown(text: str) -> str:
    """`text` on one line: control characters and undecodable bytes of file names as escapes (\\n, \\x01, \\udcff)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
